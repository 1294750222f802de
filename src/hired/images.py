"""Reading user images: the one reader every command uses.

Any file Pillow reads, in any mode, comes back as an upright RGB image (the EXIF orientation of
phone photos applied, as transformers' own ``load_image`` does) or is rejected with a reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB.

    Transparency goes on white; 16-bit, 32-bit and float greyscale are scaled to 8 bits by the
    range they hold (see :func:`_wide_to_8_bits`); other modes (CMYK, LAB, YCbCr, ...) go through
    Pillow's conversion.
    """
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # alpha, or a palette / colour key
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _wide_to_8_bits(image).convert("RGB")
    return image.convert("RGB")


def _wide_to_8_bits(image: Image.Image) -> Image.Image:
    """Greyscale of more than 8 bits as 8 bits.

    Integers are 16-bit data (what ``I;16`` files declare; 32-bit ``I`` images within 0..65535 too).
    Floats within 0..1 are fractions of white, within 0..255 8-bit values. Anything else (negative
    values, HDR floats, 32-bit counts) is stretched from its minimum to its maximum, with a warning,
    since no fixed scale fits it. Pixels that are not numbers (NaN) become black, with a warning.
    """
    values = np.asarray(image, dtype=np.float64)
    missing = ~np.isfinite(values)
    if missing.any():
        warnings.warn(f"{int(missing.sum())} pixels of a {image.mode} image are not finite numbers; reading them as black",
                      stacklevel=3)
        values = np.where(missing, 0.0, values)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    floating = image.mode == "F"
    if floating and low >= 0 and high <= 1.0:
        scaled = values * 255
    elif low >= 0 and high <= (255 if floating else 65535):
        scaled = values if floating else values / 257
    else:
        warnings.warn(f"a {image.mode} image with values from {low:g} to {high:g} has no fixed 8-bit scale; "
                      "stretching that range to 0..255", stacklevel=3)
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def open_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an upright RGB image.

    The EXIF orientation tag is applied, so a portrait photo stored sideways comes back portrait.
    Of an animated file (GIF, APNG, WebP) the first frame is read, with a warning.

    Raises:
        ValueError: the path is missing or a folder, or the file is not an image, is truncated or
            corrupt, or has more pixels than Pillow's decompression-bomb guard allows.
    """
    if not str(path):
        raise ValueError("no image path given (an empty string); give an image file")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give an image file")
    if not path.exists():
        raise ValueError(f"image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file (a pipe or a device); give an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if getattr(image, "n_frames", 1) > 1:
                    warnings.warn(f"{path} has {image.n_frames} frames; reading the first one", stacklevel=2)
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(
            f"{path} has more pixels than Pillow reads safely (limit {Image.MAX_IMAGE_PIXELS} pixels, a guard against "
            "decompression bombs); downscale it first: the model resizes every image to at most a few megapixels anyway"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read {path} as an image ({error}); give a PNG, JPEG or other file Pillow reads") from None


def image_size_of(image: Any) -> tuple[int, int]:
    """``(height, width)`` of an image as processors take it: a PIL image, or an array / tensor.

    PIL images give their size directly: transformers infers the channel axis of an array from its
    shape, which is ambiguous for images 1 or 3 pixels tall.
    """
    if isinstance(image, Image.Image):
        return image.height, image.width
    from transformers.image_utils import get_image_size, to_numpy_array

    height, width = get_image_size(to_numpy_array(image))
    return int(height), int(width)
