"""The benchmarked architectures: real configurations stored with the package, random weights.

Each JSON file under ``configs/`` holds a checkpoint's model configuration, its image-processor
settings and its processor settings. The figures of the real checkpoints are recalled from their
model cards (the hub is not needed to run a benchmark); the tiny ones exist for tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from PIL import Image

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# "<image>" stands for the processor's own image token (InternVL's is <IMG_CONTEXT>).
PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\nWhat is shown in this image? ASSISTANT:"
)
# Spread of the random weights; the real checkpoints were trained from this initialiser range.
WEIGHT_STD = 0.02
# Length of the random bank the weights are tiled from: prime, so that rows of any width see shifted values.
_BANK_LENGTH = 1_048_583


def known_models() -> list[str]:
    """Names accepted by :func:`load_model_spec` (the stem of each stored configuration)."""
    folder = resources.files(__package__) / "configs"
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


@dataclass(frozen=True)
class ModelSpec:
    """A stored architecture: which checkpoint it copies and the settings to rebuild it."""

    name: str
    checkpoint: str
    family: str
    note: str
    model: dict[str, Any]
    image_processor: dict[str, Any]
    processor: dict[str, Any]
    tokens: dict[str, str]
    image_text: str = "<image>"

    @property
    def prompt(self) -> str:
        """The benchmark's prompt with this model's text for one image (``<image>``: the processor's token)."""
        return PROMPT.replace("<image>", self.image_text)

    @property
    def full_layers(self) -> int:
        """Decoder layers of the real checkpoint."""
        return int(self.model["text_config"]["num_hidden_layers"])

    def config(self, layers: int | None = None, token_ids: dict[str, int] | None = None):
        """The transformers configuration, optionally with only ``layers`` decoder layers.

        ``token_ids`` replace the ids of the special tokens by role (``{"image_token": 4}``) where the
        configuration names them (``image_token_id``; LLaVA's ``image_token_index``).
        """
        from transformers import AutoConfig

        data = json.loads(json.dumps(self.model))
        if layers is not None:
            data["text_config"]["num_hidden_layers"] = layers
        for role, token_id in (token_ids or {}).items():
            if role == "image_token" and "image_token_id" not in data:
                data["image_token_index"] = token_id
            elif f"{role}_id" in data:
                data[f"{role}_id"] = token_id
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)


def load_model_spec(name: str) -> ModelSpec:
    """Read a stored architecture by name; a hub id's organisation prefix (``llava-hf/``) is accepted.

    Raises:
        ValueError: the name is not one of :func:`known_models`.
    """
    stem = name.rsplit("/", 1)[-1].lower()
    if stem not in known_models():
        raise ValueError(f"unknown benchmark model {name!r}; known models: {', '.join(known_models())}")
    data = json.loads((resources.files(__package__) / "configs" / f"{stem}.json").read_text())
    return ModelSpec(
        name=stem,
        checkpoint=data["checkpoint"],
        family=data["family"],
        note=data["note"],
        model=data["model"],
        image_processor=data["image_processor"],
        processor=data["processor"],
        tokens=data.get("tokens", {}),
        image_text=data.get("image_text", "<image>"),
    )


def build_processor(spec: ModelSpec):
    """The real processor classes, configured as the checkpoint's, with the offline test tokenizer.

    InternVL's and LLaVA-OneVision's processors hold a video processor, which needs torchvision.
    """
    import transformers

    from ..testing import tiny_tokenizer

    image_settings, settings = dict(spec.image_processor), dict(spec.processor)
    image_processor = getattr(transformers, image_settings.pop("class"))(**image_settings)
    processor_class = getattr(transformers, settings.pop("class"))
    video = settings.pop("video_processor", None)
    if video is not None:
        settings["video_processor"] = getattr(transformers, video)()
    return processor_class(image_processor=image_processor, tokenizer=tiny_tokenizer(named_tokens=spec.tokens),
                           **settings)


def build_model(spec: ModelSpec, layers: int | None, dtype: str, processor, seed: int = 0):
    """The architecture with random weights, built without running any initialiser.

    Parameters are allocated uninitialised in ``dtype`` and filled by tiling a small random bank
    (about a second per GB instead of minutes for a normal draw over seven billion values); norm
    weights are one and biases zero, as a trained model's statistics roughly are. Timings do not
    depend on the values, only on the shapes.
    """
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    tokenizer = processor.tokenizer
    roles = {**spec.tokens, "image_token": processor.image_token}
    config = spec.config(layers, token_ids={role: tokenizer.convert_tokens_to_ids(token) for role, token in roles.items()})
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        with no_init_weights():
            model = AutoModelForImageTextToText.from_config(config)
    finally:
        torch.set_default_dtype(default_dtype)
    _fill_random(model, seed)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


@torch.no_grad()
def _fill_random(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn(2 * _BANK_LENGTH, generator=generator) * WEIGHT_STD
    banks: dict[torch.dtype, torch.Tensor] = {}
    for index, (name, parameter) in enumerate(model.named_parameters()):
        if name.endswith("bias"):
            parameter.zero_()
        else:
            source = banks.setdefault(parameter.dtype, bank.to(parameter.dtype))
            offset = (index * 7919) % _BANK_LENGTH
            _tile(parameter.view(-1), source[offset : offset + _BANK_LENGTH])
    for module in model.modules():
        if "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            module.weight.fill_(1.0)


def _tile(flat: torch.Tensor, pattern: torch.Tensor) -> None:
    size, period = flat.numel(), pattern.numel()
    rows = size // period
    if rows:
        flat[: rows * period].view(rows, period).copy_(pattern.expand(rows, period))
    flat[rows * period :].copy_(pattern[: size - rows * period])


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random colour field of the given size: content varies, the cost does not."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))
