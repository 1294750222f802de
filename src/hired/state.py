"""What a patched model knows: its configuration, its tower probe, and the records of its last call.

The public accessors (:func:`selections`, :func:`stored_config`, :func:`share_tower_runs`,
:func:`pruning_plan`) are how the CLI, the benchmarks, the evaluation and the engines read a
patched model; nothing outside :mod:`hired.families` touches the state object's fields directly.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig

from .config import HiredConfig
from .deprecation import warn_renamed

CONFIG_KEY = "hired"


@dataclass
class SelectionRecord:
    """What the method did to one image in the last call.

    Attributes:
        image_size: the image's original ``(height, width)``; ``None`` when the model was not told
            (LLaVA-1.5 inputs prepared by a stock processor rather than the one ``hired.apply`` returns).
        grid: tile grid ``(rows, cols)``; ``(0, 0)`` for single-partition models.
        method: the method that chose the tokens.
        visual_tokens: features fed to the LLM for this image (newline tokens included when the
            stock model ran).
        stock_tokens: what the stock model would feed, newline tokens not counted.
        partition_tokens: ``(P,)`` tokens kept per partition (base view first; ``budgets`` before hired 0.3).
        kept: kept indices per partition, in that partition's ``s*s`` numbering.
        distribution_scores: ``(s*s,)`` distribution-layer CLS attention of the base view.
        selection_scores: ``(P, s*s)`` selection-layer CLS attention of every partition.
        extras: method-specific fields.
    """

    image_size: tuple[int, int] | None
    grid: tuple[int, int]
    method: str
    visual_tokens: int
    stock_tokens: int
    partition_tokens: torch.Tensor
    kept: list[torch.Tensor]
    distribution_scores: torch.Tensor | None
    selection_scores: torch.Tensor | None
    extras: dict

    @property
    def budgets(self) -> torch.Tensor:
        warn_renamed("SelectionRecord.budgets", "SelectionRecord.partition_tokens")
        return self.partition_tokens

    @property
    def kept_tokens(self) -> int:
        """Visual tokens the method kept in the end: those fed to the LLM, or, for a method that prunes
        inside the LLM, those left after its pruning layer."""
        return int(self.extras.get("llm_kept", self.visual_tokens))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no score maps)."""
        return {
            "kept_tokens": self.kept_tokens,
            "image_size": None if self.image_size is None else list(self.image_size),
            "grid": list(self.grid),
            "method": self.method,
            "visual_tokens": self.visual_tokens,
            "stock_tokens": self.stock_tokens,
            "partition_tokens": [int(count) for count in self.partition_tokens],
            **{k: v for k, v in self.extras.items() if isinstance(v, (int, float, str, bool, list))},
        }


@dataclass
class ModelState:
    """Per-model state, held by the patched inner model.

    Attributes:
        family: the family adapter that patched the model.
        config: the configuration it was patched with.
        probe: the :class:`~hired.signals.VisionProbe` of its vision tower.
        records: one :class:`SelectionRecord` per image of the last call that encoded images.
        llm_pruning: the decoder-side state of an LLM-side method, if one is installed.
        handles: the hooks ``apply`` registered on the model (removed by ``remove``).
        call_data: what a family's hooks hand on within one forward call (Qwen2.5-VL's image slots).
    """

    family: Any
    config: HiredConfig
    probe: Any
    processor: weakref.ref | None = None
    records: list[SelectionRecord] = field(default_factory=list)
    llm_pruning: Any = None
    handles: list = field(default_factory=list)
    call_data: dict = field(default_factory=dict)

    def paired_processor(self):
        """The processor patched together with the model, if it is still alive and unchanged."""
        processor = self.processor() if self.processor is not None else None
        if processor is not None and getattr(processor, "hired_config", None) is self.config:
            return processor
        return None

    def __getstate__(self) -> dict:
        # A weak reference cannot be pickled (torch.save of a patched model); the pairing is dropped.
        return {**self.__dict__, "processor": None}


def model_state(model) -> ModelState:
    """The state of a patched model (outer or inner); a clear error for a stock one."""
    for candidate in (model, getattr(model, "model", None)):
        state = getattr(candidate, "_hired", None) if candidate is not None else None
        if isinstance(state, ModelState):
            return state
    raise ValueError("this model is not patched; call hired.apply(model, processor) first")


def selections(model) -> list[SelectionRecord]:
    """Records of the images in the last call of a patched model that encoded images."""
    return list(model_state(model).records)


def pruning_plan(model):
    """The plan of the last prefill of an LLM-side method (``None`` before one, or when nothing was pruned)."""
    pruning = model_state(model).llm_pruning
    if pruning is None:
        raise ValueError(f"method {model_state(model).config.method!r} does not prune inside the language model")
    return pruning.plan


def stored_config(model) -> HiredConfig | None:
    """The configuration saved on the model config by a previous ``apply``, if any.

    ``model`` may also be a model configuration itself (a ``config.json`` loaded as a ``PretrainedConfig``,
    as serving engines hold it).

    Raises:
        ValueError: the stored entry is not a valid configuration.
    """
    holder = model if isinstance(model, PretrainedConfig) else model.config
    data = getattr(holder, CONFIG_KEY, None)
    return None if data is None else HiredConfig.from_dict(data)


def share_tower_runs(model, runs: dict) -> None:
    """Make the patched ``model`` reuse the vision-tower runs kept in ``runs``.

    The tower's output for given pixels and layers does not depend on the method or the budget, so
    a caller that sweeps settings over the same images passes the same dict after each
    ``hired.apply``, and the tower runs once per distinct pixel batch. The selection itself still
    runs for every setting.
    """
    model_state(model).probe.shared_runs = runs
