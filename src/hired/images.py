"""Reading user images: the one reader every command uses.

Any file Pillow reads, in any mode, comes back as an upright RGB image (the EXIF orientation of
phone photos applied, as transformers' own ``load_image`` does) or is rejected with a reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (1, L, LA, P, RGBA, CMYK, I;16, F, ...) to RGB; transparency goes on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode.startswith("I") or image.mode == "F":
        # 16/32-bit and float images: scale the 16-bit range to 8 bits instead of clipping at 255.
        wide = image.convert("I") if image.mode.startswith("I;") else image
        return wide.point(lambda value: value / 256).convert("L").convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an upright RGB image.

    The EXIF orientation tag is applied, so a portrait photo stored sideways comes back portrait.
    Of an animated file (GIF, APNG, WebP) the first frame is read, with a warning.

    Raises:
        ValueError: the path is missing or a folder, or the file is not an image, is truncated or
            corrupt, or has more pixels than Pillow's decompression-bomb guard allows.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give an image file")
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
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
