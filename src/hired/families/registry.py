"""The registered model families, and which one a model belongs to."""

from __future__ import annotations

from .adapter import FamilyAdapter

_FAMILIES: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make ``hired.apply`` patch models of ``adapter``'s classes.

    An adapter that lacks a required hook or class attribute never gets here: making it
    (``register_family(MyAdapter())``) raises a ``TypeError`` naming the family and what it lacks
    (:func:`hired.families.adapter.missing_parts`).

    Raises:
        TypeError: ``adapter`` is not a :class:`FamilyAdapter`.
        ValueError: a family of that name, or one claiming the same model class, is registered already.
    """
    if not isinstance(adapter, FamilyAdapter):
        raise TypeError(f"register_family takes a FamilyAdapter instance, got {type(adapter).__name__}")
    for existing in _FAMILIES.values():
        if existing.name == adapter.name or existing.inner_class is adapter.inner_class:
            raise ValueError(f"family {adapter.name!r} clashes with the registered family {existing.name!r}")
    _FAMILIES[adapter.name] = adapter
    return adapter


def registered_families() -> list[FamilyAdapter]:
    return list(_FAMILIES.values())


def family_of(model) -> FamilyAdapter:
    """The family whose classes ``model`` (an outer or inner model, stock or patched) belongs to."""
    for adapter in _FAMILIES.values():
        inner = getattr(model, "model", None) if isinstance(model, adapter.outer_class) else model
        if type(inner) in (adapter.inner_class, adapter.hired_inner_class):
            return adapter
    names = ", ".join(f"{a.outer_class.__name__} ({a.name})" for a in _FAMILIES.values())
    raise TypeError(f"hired supports {names} and their inner models, got {type(model).__name__}")
