"""Inputs the tests build: random images and one-turn prompts (a module of its own: ``conftest`` names more than one
file in this tree)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image of the given size (content does not matter to the geometry)."""
    pixels = np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_prompt(image_token: str, images: int = 1) -> str:
    """A one-turn prompt holding ``images`` image placeholders ``image_token``."""
    return "USER: " + " ".join([image_token] * images) + " what is in the image ? ASSISTANT:"
