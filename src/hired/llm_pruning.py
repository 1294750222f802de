"""Pruning inside the language model of a transformers VLM, under any batch and the KV cache.

An LLM-side method (``stage="llm"``, e.g. FastV) supplies a score of every position, computed in
decoder layer ``K-1`` (its option ``layer`` is ``K``); these hooks do the rest. Decoder layers
``0..K-1`` see every token. Before layer ``K``, each image keeps the ``K_j`` of its placeholder
positions that score highest (``K_j`` the budget a vision-side method would get for it); layers
``K..`` see only the kept tokens, at their original rotary positions. An image whose budget covers
its stock count keeps all its placeholders, so ``budget=1.0`` is exactly the stock model.

How it is wired, without copying any forward function:

- a forward pre-hook on the inner model notes where the image placeholders are;
- hooks on layer ``K-1``'s attention capture its query/key projections and rotary tables, from
  which the method's score is computed (no attention maps are requested, so SDPA runs as usual);
- in the prefill, a pre-hook on layer ``K`` drops the tokens and swaps in the matching causal mask,
  rotary tables and positions; pre-hooks on the later layers pass the same swapped tensors on. The
  KV cache of layers ``K..`` therefore holds only the kept positions, that of layers ``0..K-1``
  the whole prompt;
- in decoding steps, the same pre-hooks give layers ``K..`` a mask over their shorter cache; the
  first layers, the positions and ``generate``'s bookkeeping see the unpruned sequence unchanged.
  (Without a cache, ``generate`` re-runs the prefill at each step and the method re-scores with the
  newest token as the last one.)
- after each forward, the pruning is checked: a prefill that was to prune and did not, or a cache
  whose pruned layers are not shorter, raises instead of passing the stock model off as pruned.

In a batch, rows drop different numbers of tokens; shorter rows are left-filled with masked slots,
and padding is dropped with the image tokens. Limits: a DynamicCache (the ``generate`` default)
without sliding windows, the ``sdpa`` or ``eager`` attention implementations, and images only in
the first forward of a sequence (a prefill into an empty cache). The prefill returns logits for
the kept positions only, so ``labels`` (training) are not supported.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import compat

_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class PrunePlan:
    """Which original positions each row keeps, decided in a prefill.

    Attributes:
        index: ``(B, T)`` original positions, in order; filler slots point at position 0.
        valid: ``(B, T)`` False for filler slots that left-fill rows that kept fewer tokens.
        original_length: ``L``, the prefill length before pruning.
        image_kept: ``(B,)`` image positions kept per row.
    """

    index: torch.Tensor
    valid: torch.Tensor
    original_length: int
    image_kept: torch.Tensor

    @property
    def length(self) -> int:
        return self.index.shape[1]


@dataclass
class _Captured:
    """Tensors of the current forward of the language model, dropped when it ends."""

    attention_mask: torch.Tensor | None = None  # 2D, as given to the language model
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    pruned_keys: torch.Tensor | None = None  # decoding: (B, T + new) keys the pruned layers may attend to
    swapped: dict[str, Any] | None = None  # mask (and in the prefill rotary, positions) for layers K..


@dataclass
class PruningState:
    """Per-model state of an LLM-side method: what it needs, its hooks, the plan of the last prefill."""

    method: Any
    layer: int
    apply_rotary: Callable
    dynamic_layer: type
    config: Any = None
    records: Callable[[], list] | None = None
    handles: list = field(default_factory=list)
    image_mask: torch.Tensor | None = None
    images_given: bool = False
    prefill: bool = False
    captured: _Captured = field(default_factory=_Captured)
    plan: PrunePlan | None = None
    decided: bool = False  # the first pruned layer ran in this prefill and decided the plan


# --------------------------------------------------------------------------------------------
# Pure pieces


def plan_pruning(
    scores: torch.Tensor,
    image_mask: torch.Tensor,
    image_spans: list[list[tuple[int, int]]],
    attention_mask: torch.Tensor | None = None,
) -> PrunePlan | None:
    """Keep, per image, the top positions by score (ties to the earlier position), and the text.

    Padding positions (``attention_mask == 0``) are dropped with the image tokens: they are masked
    anyway, and rows that shrink the most would otherwise carry them along.

    Args:
        scores: ``(B, L)`` attention of each row's last token.
        image_mask: ``(B, L)`` True at image placeholders.
        image_spans: per row, ``(placeholders, keep)`` for each of its images, in order.
        attention_mask: ``(B, L)`` 2D padding mask, or ``None``.

    Returns:
        The plan, or ``None`` when every image keeps all its placeholders.
    """
    batch, length = image_mask.shape
    keep = ~image_mask
    if attention_mask is not None:
        keep &= attention_mask.bool().to(keep.device)
    image_kept = torch.zeros(batch, dtype=torch.long)
    for row, spans in enumerate(image_spans):
        positions = image_mask[row].nonzero().flatten()
        start = 0
        for placeholders, kept in spans:
            span = positions[start : start + placeholders]
            start += placeholders
            best = scores[row, span].float().sort(descending=True, stable=True).indices[:kept]
            keep[row, span[best]] = True
            image_kept[row] += kept
    if int(image_kept.sum()) == int(image_mask.sum()):
        return None
    counts = keep.sum(dim=1)
    width = int(counts.max())
    index = torch.zeros(batch, width, dtype=torch.long, device=image_mask.device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=image_mask.device)
    for row in range(batch):
        fill = width - int(counts[row])
        index[row, fill:] = keep[row].nonzero().flatten()
        valid[row, fill:] = True
    return PrunePlan(index, valid, length, image_kept)


def _gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence (dim 1) with a ``(B, T)`` index, broadcasting a batch of 1."""
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    expanded = index.view(*index.shape, *[1] * (tensor.dim() - 2)).expand(-1, -1, *tensor.shape[2:])
    return tensor.gather(1, expanded)


# --------------------------------------------------------------------------------------------
# Hooks


def _image_spans(state: PruningState, image_mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, ``(placeholders, keep)`` for each image, from the records of this call."""
    records = state.records()
    name = state.method.name
    per_row = image_mask.sum(dim=1).tolist()
    total = sum(r.visual_tokens for r in records)
    if not records or sum(per_row) % total:
        raise ValueError(
            f"{name} found {sum(per_row)} image placeholders but the images of this call produced {total} "
            "features; prepare inputs with the processor returned by hired.apply"
        )
    copies = sum(per_row) // total  # generate repeats each row for beams / num_return_sequences
    spans, pointer = [], 0
    for row, count in enumerate(per_row):
        if row % copies:
            spans.append(spans[-1])
            continue
        row_spans = []
        while count > 0:
            if pointer >= len(records) or records[pointer].visual_tokens > count:
                raise ValueError(f"{name} could not match the image placeholders of each prompt to its images")
            record = records[pointer]
            keep = state.config.kept_for(record.stock_tokens)
            keep = record.visual_tokens if keep >= record.stock_tokens else keep
            record.extras.update(llm_layer=state.layer, llm_kept=keep)
            row_spans.append((record.visual_tokens, keep))
            count -= record.visual_tokens
            pointer += 1
        spans.append(row_spans)
    return spans


def _placeholder_mask(inner, args, kwargs) -> torch.Tensor | None:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is not None:
        return input_ids == inner.config.image_token_id
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        return None
    image = inner.get_input_embeddings()(torch.tensor(inner.config.image_token_id, device=embeds.device))
    return (embeds == image).all(dim=-1)


# Every hook is a module-level function bound with functools.partial, never a closure, so that a
# hooked model can be pickled (torch.save) and deep-copied, the copy's hooks bound to the copy.


def _note_placeholders(inner, state: PruningState, module, args, kwargs) -> None:
    state.image_mask = _placeholder_mask(inner, args, kwargs)
    encoded = kwargs.get("mm_encoder_outputs") or {}
    state.images_given = kwargs.get("pixel_values") is not None or encoded.get("image") is not None


def _before_language_model(state: PruningState, module, args, kwargs) -> None:
    cache = compat.cache_from_kwargs(kwargs)
    past = cache.get_seq_length() if cache is not None else 0
    has_images = state.image_mask is not None and bool(state.image_mask.any())
    state.captured = _Captured()
    state.prefill = False
    state.decided = False
    if past == 0:
        state.plan = None
        if has_images:
            if not state.images_given:
                raise ValueError(
                    f"{state.method.name} needs the images in the same call as their placeholders (pixel_values), to know "
                    "each image's budget"
                )
            state.prefill = True
            state.captured.attention_mask = kwargs.get("attention_mask")
    elif has_images and state.images_given:
        raise ValueError(
            f"{state.method.name} prunes images in the prefill of a sequence; this call adds images to a filled cache"
        )
    elif state.plan is not None:
        state.captured.pruned_keys = _pruned_keys(state.plan, past, kwargs)


def _after_language_model(state: PruningState, module, args, kwargs, output) -> None:
    try:
        _check_pruned(state, compat.cache_from_kwargs(kwargs) or compat.cache_of(output))
    finally:
        state.captured = _Captured()
        state.prefill = False
        state.image_mask = None


def _check_pruned(state: PruningState, cache) -> None:
    """Raise when the method was to prune this forward and did not (a hook that never ran, a cache left whole)."""
    if state.prefill and not state.decided:
        raise RuntimeError(
            f"{state.method.name} was to prune the image tokens before decoder layer {state.layer}, but that layer's hook never "
            f"ran (transformers {compat.installed_transformers()} may call its layers differently); the stock model "
            "ran instead"
        )
    plan = state.plan
    if plan is None or cache is None or not (state.decided or state.captured.pruned_keys is not None):
        return
    if state.captured.swapped is None:
        raise RuntimeError(f"{state.method.name} had a plan for this sequence, but the pruned layers did not receive its mask")
    full = cache.get_seq_length(0)
    pruned = cache.get_seq_length(state.layer)
    expected = plan.length + full - plan.original_length
    if pruned != expected:
        raise RuntimeError(
            f"{state.method.name} pruned the prompt from {plan.original_length} to {plan.length} positions, but decoder layer "
            f"{state.layer}'s cache holds {pruned} (expected {expected}, the unpruned layers {full}); the pruning "
            "did not reach the cache"
        )


def _pruned_keys(plan: PrunePlan, past: int, kwargs: dict) -> torch.Tensor:
    """``(B, T + new)``: which keys of the pruned layers a decoding step may attend to.

    ``past`` counts the unpruned sequence (the first layers' cache); the 2D attention mask, if
    given, has that length plus the new tokens.
    """
    embeds = kwargs.get("inputs_embeds")
    new = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
    mask = kwargs.get("attention_mask")
    device = plan.valid.device
    if mask is None:
        later = torch.ones(plan.valid.shape[0], past + new - plan.original_length, dtype=torch.bool, device=device)
    elif mask.dim() != 2 or mask.shape[1] != past + new:
        raise ValueError(f"pruning inside the language model expects a 2D attention mask of {past + new} positions, got shape {tuple(mask.shape)}")
    else:
        later = mask[:, plan.original_length :].bool().to(device)
    return torch.cat([plan.valid, later], dim=1)


def pruned_attention_mask(allowed_keys: torch.Tensor, queries: int, implementation: str, dtype) -> torch.Tensor:
    """The 4D mask of the pruned layers: causal over the kept sequence, masked filler slots.

    Args:
        allowed_keys: ``(B, T)`` False at filler slots (and padding).
        queries: how many of the last positions are queries.
        implementation: ``"sdpa"`` (boolean mask, True attends) or ``"eager"`` (additive float mask).
        dtype: the float dtype of an eager mask.
    """
    length = allowed_keys.shape[1]
    device = allowed_keys.device
    query_position = torch.arange(length - queries, length, device=device)[:, None]
    causal = torch.arange(length, device=device)[None] <= query_position
    allowed = allowed_keys[:, None, None, :] & causal[None, None]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def _capture_query(state: PruningState, module, args, output) -> None:
    if state.prefill:
        state.captured.query = output


def _capture_key(state: PruningState, module, args, output) -> None:
    if state.prefill:
        state.captured.key = output


def _capture_rotary(state: PruningState, module, args, kwargs) -> None:
    if state.prefill:
        state.captured.rotary = kwargs["position_embeddings"]


def _prune_before_layer(inner, state: PruningState, attention_module, module, args, kwargs):
    captured = state.captured
    if not state.prefill and captured.pruned_keys is None:
        return args, kwargs
    implementation = inner.language_model.config._attn_implementation
    _check_implementation(state.method.name, implementation)  # again here: it may be switched after apply
    cache = compat.cache_from_kwargs(kwargs)
    if cache is not None and not hasattr(cache, "layers"):
        raise compat.incompatible(f"{type(cache).__name__}.layers", f"{state.method.name}'s pruned cache")
    if cache is not None and any(type(layer) is not state.dynamic_layer for layer in cache.layers):
        raise ValueError(f"{state.method.name} prunes a DynamicCache (the generate default); this call uses another cache")
    hidden = args[0]
    if captured.pruned_keys is not None:  # decoding: the new tokens attend to the kept keys
        mask = pruned_attention_mask(captured.pruned_keys, hidden.shape[1], implementation, hidden.dtype)
        captured.swapped = {"attention_mask": mask}
    else:
        plan = _plan(inner, state, attention_module)
        state.decided = True
        if plan is None:
            state.prefill = False
            return args, kwargs
        state.plan = plan
        index = plan.index.to(hidden.device)
        hidden = _gather_rows(hidden, index)
        positions = kwargs.get("position_ids")
        cos, sin = kwargs["position_embeddings"]
        captured.swapped = {
            "attention_mask": pruned_attention_mask(
                plan.valid.to(hidden.device), plan.length, implementation, hidden.dtype
            ),
            "position_embeddings": (_gather_rows(cos, index), _gather_rows(sin, index)),
            "position_ids": None if positions is None else _gather_rows(positions, index),
        }
    kwargs.update(captured.swapped)
    return (hidden, *args[1:]), kwargs


def _check_implementation(name: str, implementation: str | None) -> None:
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"{name} supports the {' and '.join(_IMPLEMENTATIONS)} attention implementations; this model uses "
            f"{implementation!r} (model.set_attn_implementation('sdpa'))"
        )


def _plan(inner, state: PruningState, attention_module) -> PrunePlan | None:
    """Score the image tokens with layer ``K-1``'s captured q/k and decide what each row keeps."""
    captured = state.captured
    scores = state.method.score(
        captured.query,
        captured.key,
        captured.rotary,
        state.apply_rotary,
        attention_module.head_dim,
        attention_module.scaling,
        captured.attention_mask,
    )
    captured.query = captured.key = None
    image_mask = state.image_mask.to(scores.device)
    return plan_pruning(scores, image_mask, _image_spans(state, image_mask), captured.attention_mask)


def _pass_swapped(state: PruningState, module, args, kwargs):
    if state.captured.swapped is not None:
        kwargs.update(state.captured.swapped)
    return args, kwargs


# --------------------------------------------------------------------------------------------
# install / uninstall


def _rotary_function(attention_module) -> Callable:
    function = getattr(sys.modules[type(attention_module).__module__], "apply_rotary_pos_emb", None)
    if function is None:
        raise ValueError(
            f"pruning inside the language model needs a rotary decoder whose module defines apply_rotary_pos_emb (Llama, Mistral, ...); "
            f"{type(attention_module).__name__} does not"
        )
    return function


def _check_internals(language_model, pruned_layer, scored_attention) -> type:
    """Check the decoder internals these hooks read; return the cache layer class they support."""
    needed = "pruning inside the language model"
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        raise compat.incompatible("transformers.cache_utils.DynamicLayer", needed) from None
    compat.require_attribute(language_model.config, "_attn_implementation", needed)
    compat.cache_argument_name(type(language_model).forward)
    compat.cache_argument_name(type(pruned_layer).forward)
    compat.require_arguments(type(pruned_layer).forward, ("attention_mask", "position_ids", "position_embeddings"),
                             needed)
    compat.require_arguments(type(scored_attention).forward, ("position_embeddings",), needed)
    return DynamicLayer


def prepare(inner, method, options) -> PruningState:
    """Check that ``method`` can prune ``inner``'s decoder; nothing is hooked yet (see :func:`install`)."""
    language_model = inner.language_model
    name = method.name
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{name} cannot find the decoder layers of {type(language_model).__name__}")
    layer = options.layer
    if layer >= len(layers):
        raise ValueError(
            f"{name} cannot prune after layer {layer}: the decoder has only {len(layers)} layers "
            f"(use method_options={{'layer': k}} with 1 <= k <= {len(layers) - 1})"
        )
    _check_implementation(name, getattr(language_model.config, "_attn_implementation", None))
    if getattr(language_model.config, "sliding_window", None) is not None:
        raise ValueError(f"{name} does not support sliding-window attention (the pruned cache has no window)")
    scored = layers[layer - 1].self_attn
    projections = [getattr(scored, attribute, None) for attribute in ("q_proj", "k_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in projections):
        raise ValueError(f"{name} needs separate q_proj/k_proj projections in {type(scored).__name__}")
    return PruningState(method=method, layer=layer, apply_rotary=_rotary_function(scored),
                        dynamic_layer=_check_internals(language_model, layers[layer], scored))


def install(inner, state: PruningState, config, records: Callable[[], list]) -> None:
    """Hook the prepared method into ``inner.language_model`` (see the module docstring).

    ``records`` returns the selection records of the current call (one per image, in order).
    """
    state.config = config
    state.records = records
    language_model = inner.language_model
    layers = language_model.layers
    layer = state.layer
    scored = layers[layer - 1].self_attn
    bound = functools.partial
    state.handles = [
        inner.register_forward_pre_hook(bound(_note_placeholders, inner, state), with_kwargs=True),
        language_model.register_forward_pre_hook(bound(_before_language_model, state), with_kwargs=True),
        language_model.register_forward_hook(bound(_after_language_model, state), with_kwargs=True),
        scored.q_proj.register_forward_hook(bound(_capture_query, state)),
        scored.k_proj.register_forward_hook(bound(_capture_key, state)),
        scored.register_forward_pre_hook(bound(_capture_rotary, state), with_kwargs=True),
        layers[layer].register_forward_pre_hook(bound(_prune_before_layer, inner, state, scored), with_kwargs=True),
        *(later.register_forward_pre_hook(bound(_pass_swapped, state), with_kwargs=True) for later in layers[layer + 1 :]),
    ]


def uninstall(state: PruningState) -> None:
    """Remove the hooks of :func:`install`."""
    for handle in state.handles:
        handle.remove()
    state.handles = []
