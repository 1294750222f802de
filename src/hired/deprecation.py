"""Names that hired renamed: the old one keeps working for a while, with a warning that names the new one."""

from __future__ import annotations

import warnings

# The release that removes the old names.
REMOVAL = "0.4"


def warn_renamed(old: str, new: str) -> None:
    """Warn (``DeprecationWarning``, at the caller's caller) that ``old`` is now called ``new``."""
    warnings.warn(f"{old} is renamed {new}; {old} stops working in hired {REMOVAL}", DeprecationWarning, stacklevel=3)
