"""Names that hired renamed or moved: the old one keeps working for a while, with a warning that names the new one.

Every such warning ends with :data:`NOTICE`, which the test suite turns into an error so that hired's own
code and tests use no old name (``pyproject.toml``).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Mapping

# The release that removes the old names.
REMOVAL = "0.4"
NOTICE = f"the old name stops working in hired {REMOVAL}"


def warn_renamed(old: str, new: str) -> None:
    """Warn (``DeprecationWarning``, at the caller's caller) that ``old`` is now called ``new``."""
    warnings.warn(f"{old} is renamed {new}; {NOTICE}", DeprecationWarning, stacklevel=3)


def moved_attribute(module: str, name: str, moved: Mapping[str, str]) -> Any:
    """A module ``__getattr__``'s answer for ``name``: the object from the module it moved to, with a warning.

    ``moved`` maps each moved name to its new module, imported only when the old name is used (an old
    place may not import the new one: ``hired.geometry`` knows no family).

    Raises:
        AttributeError: ``name`` never lived in ``module``.
    """
    if name not in moved:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} moved to {moved[name]}; import it from there; {NOTICE}", DeprecationWarning,
                  stacklevel=3)
    return getattr(importlib.import_module(moved[name]), name)
