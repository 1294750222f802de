"""FastV (arXiv 2403.06764) inside the LLM of LLaVA / LLaVA-NeXT, under any batch and the KV cache.

Decoder layers ``0..K-1`` see every token. Before layer ``K`` (option ``layer``, default 2), each
image keeps the ``K_j`` of its placeholder positions that receive the most attention from the last
prompt token in layer ``K-1`` (heads averaged); layers ``K..`` see only the kept tokens, at their
original rotary positions. ``K_j`` is the budget a vision-side method would get for the image (a
fraction or count of its stock tokens, newlines not counted); ``newline`` embeddings are
candidates like the other placeholders. An image whose budget covers its stock count keeps all its
placeholders, so ``budget=1.0`` is exactly the stock model.

How it is wired, without copying any forward function:

- a forward pre-hook on the ``LlavaNextModel``/``LlavaModel`` notes where the image placeholders are;
- hooks on layer ``K-1``'s attention capture its query/key projections and rotary tables, from
  which the last token's attention row is computed (O(N d); no attention maps are requested, so
  SDPA runs as usual);
- in the prefill, a pre-hook on layer ``K`` drops the tokens and swaps in the matching causal mask,
  rotary tables and positions; pre-hooks on the later layers pass the same swapped tensors on. The
  KV cache of layers ``K..`` therefore holds only the kept positions, that of layers ``0..K-1``
  the whole prompt, as in the paper;
- in decoding steps, the same pre-hooks give layers ``K..`` a mask over their shorter cache; the
  first layers, the positions and ``generate``'s bookkeeping see the unpruned sequence unchanged.
  A new token thus attends to every prompt token in layers ``0..K-1`` and to the kept ones after.
  (Without a cache, ``generate`` re-runs the prefill at each step and FastV re-scores with the
  newest token as the last one, as the paper's uncached code does.)

In a batch, rows drop different numbers of tokens; shorter rows are left-filled with masked slots,
and padding is dropped with the image tokens. Limits: a DynamicCache (the ``generate`` default)
without sliding windows, the ``sdpa`` or ``eager`` attention implementations, and images only in
the first forward of a sequence (a prefill into an empty cache). The prefill returns logits for
the kept positions only, so ``labels`` (training) are not supported.
"""

from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import compat
from ..algorithm import token_budget
from ..methods import Method, register

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
class FastVState:
    """Per-model FastV state: the configuration, the hooks, the plan of the last prefill."""

    layer: int
    config: Any
    apply_rotary: Callable
    handles: list = field(default_factory=list)
    image_mask: torch.Tensor | None = None
    images_given: bool = False
    prefill: bool = False
    captured: _Captured = field(default_factory=_Captured)
    plan: PrunePlan | None = None
    decided: bool = False  # the first pruned layer ran in this prefill and decided the plan
    dynamic_layer: type | None = None


# --------------------------------------------------------------------------------------------
# Pure pieces


def last_token_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    apply_rotary: Callable,
    head_dim: int,
    scaling: float,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of each row's last real token over all positions, heads averaged: ``(B, L)``.

    Args:
        query: ``(B, L, H * d)`` query projection output.
        key: ``(B, L, Hkv * d)`` key projection output.
        rotary: ``(cos, sin)`` of the layer, ``(B or 1, L, d)``.
        apply_rotary: the decoder's ``apply_rotary_pos_emb(q, k, cos, sin)``.
        head_dim: ``d``.
        scaling: the softmax scale (``d ** -0.5`` for Llama).
        attention_mask: ``(B, L)`` 2D padding mask or ``None``.
    """
    batch, length, _ = key.shape
    cos, sin = (t.expand(batch, -1, -1) for t in rotary)
    if attention_mask is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=key.device)
    else:
        valid = attention_mask[:, -length:].bool().to(key.device)
    positions = torch.arange(length, device=key.device)
    last = torch.where(valid, positions, -1).amax(dim=1)  # (B,)
    rows = torch.arange(batch, device=key.device)
    q = query[rows, last].view(batch, -1, 1, head_dim)  # (B, H, 1, d)
    k = key.view(batch, length, -1, head_dim).transpose(1, 2)  # (B, Hkv, L, d)
    q, _ = apply_rotary(q, q, cos[rows, last][:, None], sin[rows, last][:, None])
    k, _ = apply_rotary(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * scaling  # (B, H, L)
    allowed = valid & (positions[None] <= last[:, None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def image_budget(config, stock_tokens: int) -> int:
    """Image tokens FastV keeps for an image of ``stock_tokens`` (the vision methods' budget)."""
    return token_budget(stock_tokens, fraction=config.budget, tokens=config.tokens)


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


def _image_spans(state: FastVState, inner, image_mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, ``(placeholders, keep)`` for each image, from the adapter's records of this call."""
    records = inner._hired.records
    per_row = image_mask.sum(dim=1).tolist()
    total = sum(r.visual_tokens for r in records)
    if not records or sum(per_row) % total:
        raise ValueError(
            f"FastV found {sum(per_row)} image placeholders but the images of this call produced {total} "
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
                raise ValueError("FastV could not match the image placeholders of each prompt to its images")
            record = records[pointer]
            keep = image_budget(state.config, record.stock_tokens)
            keep = record.visual_tokens if keep >= record.stock_tokens else keep
            record.extras.update(fastv_layer=state.layer, fastv_kept=keep)
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


def _on_model(inner, state: FastVState):
    def hook(module, args, kwargs):
        state.image_mask = _placeholder_mask(inner, args, kwargs)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        state.images_given = kwargs.get("pixel_values") is not None or encoded.get("image") is not None

    return hook


def _on_language_model(state: FastVState):
    def before(module, args, kwargs):
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
                        "FastV needs the images in the same call as their placeholders (pixel_values), to know "
                        "each image's budget"
                    )
                state.prefill = True
                state.captured.attention_mask = kwargs.get("attention_mask")
        elif has_images:
            raise ValueError(
                "FastV prunes images in the prefill of a sequence; this call adds images to a filled cache"
            )
        elif state.plan is not None:
            state.captured.pruned_keys = _pruned_keys(state.plan, past, kwargs)

    def after(module, args, kwargs, output):
        try:
            _check_pruned(state, compat.cache_from_kwargs(kwargs) or compat.cache_of(output))
        finally:
            state.captured = _Captured()
            state.prefill = False
            state.image_mask = None

    return before, after


def _check_pruned(state: FastVState, cache) -> None:
    """Raise when FastV was asked to prune this forward and did not (a hook that never ran)."""
    if state.prefill and not state.decided:
        raise RuntimeError(
            f"FastV was to prune the image tokens before decoder layer {state.layer}, but that layer's hook never "
            f"ran (transformers {compat.installed_transformers()} may call its layers differently); the stock model "
            "ran instead"
        )
    plan = state.plan
    if plan is None or cache is None or not (state.decided or state.captured.pruned_keys is not None):
        return
    if state.captured.swapped is None:
        raise RuntimeError("FastV had a plan for this sequence, but the pruned layers did not receive its mask")
    full = cache.get_seq_length(0)
    pruned = cache.get_seq_length(state.layer)
    expected = plan.length + full - plan.original_length
    if pruned != expected:
        raise RuntimeError(
            f"FastV pruned the prompt from {plan.original_length} to {plan.length} positions, but decoder layer "
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
        raise ValueError(f"FastV expects a 2D attention mask of {past + new} positions, got shape {tuple(mask.shape)}")
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


def _on_scored_layer(state: FastVState):
    def query(module, args, output):
        if state.prefill:
            state.captured.query = output

    def key(module, args, output):
        if state.prefill:
            state.captured.key = output

    def attention(module, args, kwargs):
        if state.prefill:
            state.captured.rotary = kwargs["position_embeddings"]

    return query, key, attention


def _on_first_pruned_layer(inner, state: FastVState, attention_module):
    language_model = inner.language_model

    def hook(module, args, kwargs):
        captured = state.captured
        if not state.prefill and captured.pruned_keys is None:
            return args, kwargs
        implementation = language_model.config._attn_implementation
        if implementation not in _IMPLEMENTATIONS:
            raise ValueError(
                f"FastV supports the {' and '.join(_IMPLEMENTATIONS)} attention implementations; this model uses "
                f"{implementation!r} (model.set_attn_implementation('sdpa'))"
            )
        cache = compat.cache_from_kwargs(kwargs)
        if cache is not None and not hasattr(cache, "layers"):
            raise compat.incompatible(f"{type(cache).__name__}.layers", "FastV's pruned cache")
        if cache is not None and any(type(layer) is not state.dynamic_layer for layer in cache.layers):
            raise ValueError("FastV prunes a DynamicCache (the generate default); this call uses another cache")
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

    return hook


def _plan(inner, state: FastVState, attention_module) -> PrunePlan | None:
    """Score the image tokens with layer ``K-1``'s captured q/k and decide what each row keeps."""
    captured = state.captured
    scores = last_token_attention(
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
    return plan_pruning(scores, image_mask, _image_spans(state, inner, image_mask), captured.attention_mask)


def _on_later_layer(state: FastVState):
    def hook(module, args, kwargs):
        if state.captured.swapped is not None:
            kwargs.update(state.captured.swapped)
        return args, kwargs

    return hook


# --------------------------------------------------------------------------------------------
# install / uninstall


def _rotary_function(attention_module) -> Callable:
    function = getattr(sys.modules[type(attention_module).__module__], "apply_rotary_pos_emb", None)
    if function is None:
        raise ValueError(
            f"FastV needs a rotary decoder whose module defines apply_rotary_pos_emb (Llama, Mistral, ...); "
            f"{type(attention_module).__name__} does not"
        )
    return function


def _check_internals(language_model, pruned_layer, scored_attention) -> type:
    """Check the decoder internals FastV's hooks read; return the cache layer class it supports."""
    needed = "FastV's decoder hooks"
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


def install(inner, config) -> None:
    """Hook FastV into ``inner.language_model`` (see the module docstring)."""
    language_model = inner.language_model
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"FastV cannot find the decoder layers of {type(language_model).__name__}")
    layer = FASTV.option(config, "layer")
    if layer >= len(layers):
        raise ValueError(
            f"FastV cannot prune after layer {layer}: the decoder has only {len(layers)} layers "
            f"(use method_options={{'layer': k}} with 1 <= k <= {len(layers) - 1})"
        )
    if getattr(language_model.config, "sliding_window", None) is not None:
        raise ValueError("FastV does not support sliding-window attention (the pruned cache has no window)")
    scored = layers[layer - 1].self_attn
    projections = [getattr(scored, name, None) for name in ("q_proj", "k_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in projections):
        raise ValueError(f"FastV needs separate q_proj/k_proj projections in {type(scored).__name__}")
    state = FastVState(layer=layer, config=config, apply_rotary=_rotary_function(scored),
                       dynamic_layer=_check_internals(language_model, layers[layer], scored))
    query, key, attention = _on_scored_layer(state)
    before, after = _on_language_model(state)
    state.handles = [
        inner.register_forward_pre_hook(_on_model(inner, state), with_kwargs=True),
        language_model.register_forward_pre_hook(before, with_kwargs=True),
        language_model.register_forward_hook(after, with_kwargs=True),
        projections[0].register_forward_hook(query),
        projections[1].register_forward_hook(key),
        scored.register_forward_pre_hook(attention, with_kwargs=True),
        layers[layer].register_forward_pre_hook(_on_first_pruned_layer(inner, state, scored), with_kwargs=True),
        *(later.register_forward_pre_hook(_on_later_layer(state), with_kwargs=True) for later in layers[layer + 1 :]),
    ]
    inner._fastv = state


def uninstall(inner) -> None:
    """Remove FastV's hooks from ``inner``."""
    state = inner.__dict__.pop("_fastv", None)
    if state is not None:
        for handle in state.handles:
            handle.remove()


def _check_options(method: str, options: dict) -> None:
    layer = options["layer"]
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 1:
        raise ValueError(
            f"method {method!r}: option 'layer' must be an integer >= 1 (the attention of layer - 1 decides), "
            f"got {layer!r}"
        )


FASTV = register(
    Method(
        "fastv",
        None,
        "FastV (arXiv 2403.06764): after decoder layer K, keep the image tokens the last prompt token attends to most",
        partition_policy="per image, over all its placeholders (base view, tiles and newlines alike)",
        options={"layer": 2},
        stage="llm",
        install=install,
        uninstall=uninstall,
        check_options=_check_options,
    )
)
