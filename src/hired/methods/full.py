"""The stock model: every visual token, separator tokens included."""

from .base import Method, register_method

FULL = register_method(
    Method(
        "full",
        "the stock model: every token, with newline tokens",
        stage="none",
        partition_policy="every token, with newline tokens",
    )
)
