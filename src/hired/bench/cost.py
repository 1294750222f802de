"""Analytic cost of a tiled VLM's forward pass: parameters, prefill FLOPs, KV cache, memory estimate.

The shape covers LLaVA-1.5 / LLaVA-NeXT (CLIP), LLaVA-OneVision (SigLIP, no CLS token) and InternVL
(InternViT with CLS, 2x2 patches merged into one LLM token before the projector).

FLOPs count the matrix products only (two FLOPs per multiply-add); norms, activations, softmax
and rotary embeddings are left out (under 1% of the total at these widths).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..geometry import square_side

# Process overhead that does not scale with the model: interpreter, torch, transformers, kernels.
RUNTIME_BYTES = 700 * 2**20


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a tiled VLM that its cost depends on.

    ``vision_layers_used`` is the depth up to the feature layer (23 of CLIP-L's 24 for layer -2): what
    a reducing method runs, while the stock model runs every layer. ``cls``: the tower prepends a CLS
    token; ``merge``: patches per LLM token (4 for InternVL's pixel shuffle), which also widens the
    projector's input.
    """

    vision_width: int
    vision_mlp: int
    vision_layers: int
    vision_layers_used: int
    vision_heads: int
    tile: int
    patch: int
    text_width: int
    text_mlp: int
    text_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    newline: bool
    cls: bool = True
    merge: int = 1

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Read a transformers ``LlavaNextConfig``, ``LlavaConfig``, ``LlavaOnevisionConfig`` or ``InternVLConfig``."""
        vision, text = config.vision_config, config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        ratio = getattr(config, "downsample_ratio", None)
        return cls(
            vision_width=vision.hidden_size,
            vision_mlp=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            vision_layers_used=config.vision_feature_layer % (vision.num_hidden_layers + 1),
            vision_heads=vision.num_attention_heads,
            tile=square_side(vision.image_size),
            patch=square_side(vision.patch_size),
            text_width=text.hidden_size,
            text_mlp=text.intermediate_size,
            text_layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=head_dim,
            vocab=text.vocab_size,
            newline=config.model_type in ("llava_next", "llava_onevision"),
            cls="siglip" not in vision.model_type,
            merge=1 if ratio is None else round(1 / ratio**2),
        )

    @property
    def patches_per_tile(self) -> int:
        return (self.tile // self.patch) ** 2

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one tile gives (patches, or merged groups of them)."""
        return self.patches_per_tile // self.merge

    @property
    def tower_tokens(self) -> int:
        """Tokens in the tower's sequence for one tile (the patches, and the CLS token where there is one)."""
        return self.patches_per_tile + (1 if self.cls else 0)


def parameter_count(shape: ModelShape) -> int:
    """Parameters of the ViT tower + projector (+ newline) + Llama/Mistral/Qwen2 decoder with untied head."""
    dv, mv, d, m = shape.vision_width, shape.vision_mlp, shape.text_width, shape.text_mlp
    vision_layer = 4 * (dv * dv + dv) + (dv * mv + mv) + (mv * dv + dv) + 2 * 2 * dv
    vision = 3 * shape.patch**2 * dv + dv + shape.tower_tokens * dv + 2 * 2 * dv
    vision += shape.vision_layers * vision_layer
    projector = shape.merge * dv * d + d + d * d + d + (d if shape.newline else 0)
    attention = d * shape.heads * shape.head_dim * 2 + d * shape.kv_heads * shape.head_dim * 2
    text_layer = attention + 3 * d * m + 2 * d
    text = 2 * shape.vocab * d + shape.text_layers * text_layer + d
    return vision + projector + text


def vision_flops(shape: ModelShape, tiles: int, layers_run: int) -> int:
    """FLOPs of the ViT tower on ``tiles`` tiles through ``layers_run`` layers (patch embedding included)."""
    dv, mv = shape.vision_width, shape.vision_mlp
    tokens = shape.tower_tokens
    embedding = 2 * shape.patches_per_tile * 3 * shape.patch**2 * dv
    per_layer = 2 * tokens * 4 * dv * dv + 2 * 2 * tokens * tokens * dv + 2 * 2 * tokens * dv * mv
    return tiles * (embedding + layers_run * per_layer)


def projector_flops(shape: ModelShape, tokens: int) -> int:
    """FLOPs of the two-layer projector on ``tokens`` LLM tokens (each of ``merge`` patches' width)."""
    return 2 * tokens * (shape.merge * shape.vision_width * shape.text_width + shape.text_width * shape.text_width)


def llm_prefill_flops(shape: ModelShape, sequence: int, batch: int = 1) -> int:
    """FLOPs of the decoder's prefill of ``batch`` sequences of ``sequence`` tokens.

    Causal attention counts the ``S(S+1)/2`` visible query-key pairs; the LM head runs on the last
    position only, as ``generate`` does.
    """
    d, m, s = shape.text_width, shape.text_mlp, sequence
    query_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    projections = 2 * s * d * (2 * query_width + 2 * kv_width)
    attention = 2 * 2 * query_width * (s * (s + 1) // 2)
    mlp = 2 * s * 3 * d * m
    head = 2 * d * shape.vocab
    return batch * (shape.text_layers * (projections + attention + mlp) + head)


def kv_cache_bytes(shape: ModelShape, cached_tokens: int, batch: int, bytes_per_value: int) -> int:
    """Size of the keys and values of every decoder layer for ``cached_tokens`` positions."""
    return 2 * shape.text_layers * shape.kv_heads * shape.head_dim * cached_tokens * batch * bytes_per_value


def memory_estimate(
    shape: ModelShape, sequence: int, batch: int, tiles: int, new_tokens: int, bytes_per_value: int
) -> dict[str, int]:
    """Bytes a run is expected to need at its peak, by part (an upper bound, not a measurement).

    Activations take the larger of the vision phase and the prefill, assuming attention scores are
    materialised (the math kernel); the fused kernels need less.
    """
    dv, d, m = shape.vision_width, shape.text_width, shape.text_mlp
    vision_tokens = shape.tower_tokens
    vision = tiles * batch * (
        (2 * vision_tokens * shape.vision_mlp + 6 * vision_tokens * dv) * bytes_per_value
        + shape.vision_heads * vision_tokens**2 * 4
    )
    prefill = batch * (
        sequence * (3 * m + 6 * d) * bytes_per_value + shape.heads * sequence**2 * bytes_per_value + shape.vocab * 4
    )
    parts = {
        "weights": parameter_count(shape) * bytes_per_value,
        "kv_cache": kv_cache_bytes(shape, sequence + new_tokens, batch, bytes_per_value),
        "activations": max(vision, prefill),
        "runtime": RUNTIME_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts


def available_memory_bytes() -> int:
    """Memory the system can give a new process now (``MemAvailable``), or the physical total."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
