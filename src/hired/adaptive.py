"""Inputs for methods whose token count depends on the pixels (e.g. PruMerge's native mode).

The processor cannot know such a count before the model runs, so the order is reversed: encode
the images with the patched model first, then write exactly as many placeholders as each image got,
and hand the LLM ready ``inputs_embeds``::

    model, _ = hired.apply(model, method="prumerge", method_options={"adaptive": True})
    inputs = prepare_inputs(model, processor, images=images, text=prompts)
    output = model.generate(**inputs, max_new_tokens=32)   # returns only the new tokens
    counts = [r.visual_tokens for r in hired.selections(model)]

Images are encoded once: ``generate`` sees embeddings, never pixels.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .families import family_of
from .images import image_size_of
from .methods import get_method
from .state import model_state


def prepare_inputs(model, processor, images: Any, text: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """Encode ``images`` with the patched ``model`` and build ``inputs_embeds`` for ``text``.

    Args:
        model: a model patched by ``hired.apply`` (any method; adaptive ones need this helper).
        processor: the model's stock processor (its image processor and tokenizer are used).
        images: one image or a list, in the order their ``<image>`` tokens appear across ``text``.
        text: one prompt or a batch; each ``<image>`` stands for one image.

    Returns:
        ``{"inputs_embeds", "attention_mask"}`` for ``model(**inputs)`` or ``model.generate(**inputs)``.
    """
    inner = family_of(model).inner(model)
    state = model_state(model)
    if not get_method(state.config.method).selects_before_llm:
        raise ValueError(
            f"method {state.config.method!r} prunes inside the LLM; use the processor returned by hired.apply"
        )
    prompts = [text] if isinstance(text, str) else list(text)
    image_list = list(images) if isinstance(images, (list, tuple)) else [images]
    image_token = processor.image_token
    wanted = sum(prompt.count(image_token) for prompt in prompts)
    if wanted != len(image_list):
        raise ValueError(f"the prompts hold {wanted} {image_token} tokens but {len(image_list)} images were given")

    pixels = processor.image_processor(image_list, return_tensors="pt")
    pixel_values = pixels["pixel_values"].to(inner.device, inner.dtype)
    # Image processors without AnyRes return no sizes; the records still give each image's own.
    sizes = pixels.get("image_sizes")
    if sizes is None:
        sizes = torch.tensor([image_size_of(image) for image in image_list])
    with torch.no_grad():
        encoded = inner.get_image_features(pixel_values, image_sizes=sizes)
    counts = iter(len(features) for features in encoded.pooler_output)
    expanded = []
    for prompt in prompts:
        pieces = prompt.split(image_token)
        expanded.append(pieces[0] + "".join(image_token * next(counts) + piece for piece in pieces[1:]))

    tokens = processor.tokenizer(expanded, return_tensors="pt", padding=True)
    input_ids = tokens["input_ids"].to(inner.device)
    embeds = inner.get_input_embeddings()(input_ids)
    placeholders = input_ids == inner.config.image_token_id
    features = torch.cat(encoded.pooler_output).to(embeds.device, embeds.dtype)
    if int(placeholders.sum()) != features.shape[0]:
        raise ValueError(
            f"the tokenizer turned the expanded prompts into {int(placeholders.sum())} image tokens for "
            f"{features.shape[0]} image features; {image_token!r} must be a single special token"
        )
    mask = placeholders.unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, features)
    return {"inputs_embeds": embeds, "attention_mask": tokens["attention_mask"].to(inner.device)}
