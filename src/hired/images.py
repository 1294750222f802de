"""Reading user images: any file Pillow reads, any mode, returned as RGB or rejected with a reason."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (L, LA, P, RGBA, CMYK, I;16, ...) to RGB; transparency goes on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode.startswith("I") or image.mode == "F":
        return image.point(lambda value: value / 256).convert("L").convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an RGB image.

    Raises:
        ValueError: the file is missing, not an image, truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read {path} as an image ({error}); give a PNG, JPEG or other file Pillow reads") from None
