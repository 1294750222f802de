"""The other token-reduction methods, as pure tensor functions registered beside HiRED."""
