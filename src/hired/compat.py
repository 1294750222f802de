"""The transformers internals hired relies on, checked when a model is patched.

hired patches public model classes, but a few of the things it reads are not public API (hook
keyword arguments, private processor methods, generate's bookkeeping, cache classes). Each release
may move them. Rather than running the stock model under hired's name when one is gone, ``apply``
checks them up front and raises :class:`IncompatibleTransformers`, naming the installed release and
the range the test suite passed on.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# The releases the whole test suite passed on; keep in step with pyproject.toml.
SUPPORTED_TRANSFORMERS = SpecifierSet(">=5.19,<5.26")

# transformers 5.24 renamed the KV-cache keyword of every forward from ``past_key_values`` to ``cache``.
CACHE_ARGUMENTS = ("cache", "past_key_values")


class IncompatibleTransformers(RuntimeError):
    """An internal of transformers that hired needs is missing from the installed release."""


def installed_transformers() -> str:
    return transformers.__version__


def _supported_range() -> str:
    return ", ".join(sorted(str(s) for s in SUPPORTED_TRANSFORMERS))


def incompatible(what: str, needed_for: str) -> IncompatibleTransformers:
    """The error for a missing internal: what is missing, what needs it, the versions."""
    return IncompatibleTransformers(
        f"{what} is missing from the installed transformers {installed_transformers()}; hired needs it for "
        f"{needed_for}. hired is tested on transformers {_supported_range()}: install a release in that range "
        "(pip install 'transformers>=5.19,<5.26')"
    )


def require_attribute(owner: Any, name: str, needed_for: str) -> None:
    """Raise :class:`IncompatibleTransformers` unless ``owner`` has ``name``."""
    if not hasattr(owner, name):
        label = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        raise incompatible(f"{label}.{name}", needed_for)


def require_arguments(function: Any, names: tuple[str, ...], needed_for: str) -> None:
    """Raise unless ``function`` takes each of the keyword arguments ``names``."""
    parameters = inspect.signature(function).parameters
    missing = [name for name in names if name not in parameters]
    if missing:
        raise incompatible(f"the argument(s) {', '.join(missing)} of {function.__qualname__}", needed_for)


def cache_argument_name(function: Any) -> str:
    """Which of :data:`CACHE_ARGUMENTS` ``function`` takes (the newest name first)."""
    parameters = inspect.signature(function).parameters
    for name in CACHE_ARGUMENTS:
        if name in parameters:
            return name
    raise incompatible(f"a KV-cache argument ({' or '.join(CACHE_ARGUMENTS)}) of {function.__qualname__}",
                       "reading the cache in decoder hooks")


def cache_from_kwargs(kwargs: dict) -> Any:
    """The KV cache a forward was given, under either name (callers may still pass the old one)."""
    for name in CACHE_ARGUMENTS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def cache_of(output: Any) -> Any:
    """The KV cache a model output carries, read under the name this release gives it."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    for name in CACHE_ARGUMENTS:
        if name in fields:
            return getattr(output, name)
    return None


def warn_if_untested() -> None:
    """A warning (not an error) when the installed release is outside the tested range."""
    version = Version(installed_transformers())
    if version not in SUPPORTED_TRANSFORMERS:
        warnings.warn(
            f"hired is tested on transformers {_supported_range()}, found {version}; the internals it needs are "
            "present, but results on this release are unverified",
            stacklevel=3,
        )


def save_under_stock_names(stock_class: type, swapped_class: type) -> None:
    """Make a swapped class save its weights under the names the stock class saves them under.

    ``save_pretrained`` renames weights by conversion mappings that transformers looks up by class
    name, so a swapped inner model would otherwise skip its class's mapping and write a checkpoint
    whose names differ from a stock save (which other loaders, vLLM among them, do not read).
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

    mapping = get_checkpoint_conversion_mapping(stock_class.__name__)
    if mapping is not None and get_checkpoint_conversion_mapping(swapped_class.__name__) is None:
        register_checkpoint_conversion_mapping(swapped_class.__name__, mapping)
