"""Loading a model of a supported family by name, and writing the prompt it expects.

Shared by every client that starts from a name rather than from model objects (the CLI, the
lmms-eval plugin), so that a name means the same model everywhere:

- ``tiny-random`` (a small random LLaVA-NeXT) or ``tiny-random-<family>``;
- a name another distribution registers in the ``hired.models`` entry-point group (the testbed
  registers ``offline``, the real pretrained encoder in LLaVA-NeXT geometry, and ``testbed``, its
  trained small VLM);
- a hub id or a folder written by ``save_pretrained``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import torch

from .sources import check_model_source

# Entry-point group through which other distributions name models (e.g. the testbed's "offline").
MODEL_ENTRY_POINTS = "hired.models"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_MARKER = "<image>"


def load_model(name: str, dtype: str = "float32"):
    """The stock model and processor that ``name`` stands for (see the module doc), in eval mode.

    Raises:
        ValueError: an unknown dtype, an unknown tiny family, or a name that is neither a registered
            model, a saved model folder nor a loadable hub id; the message says which.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if name == "tiny-random" or name.startswith("tiny-random-"):
        from .testing import TINY_MODELS

        family = name.removeprefix("tiny-random").removeprefix("-") or "llava-next"
        if family not in TINY_MODELS:
            raise ValueError(f"no tiny random model of family {family!r}; choose one of "
                             + ", ".join(f"tiny-random-{f}" for f in TINY_MODELS))
        model, processor = TINY_MODELS[family]()
        return model.to(DTYPES[dtype]).eval(), processor
    named = {point.name: point for point in entry_points(group=MODEL_ENTRY_POINTS)}
    if name in named:
        try:
            model, processor = named[name].load()()
        except ImportError as error:
            raise ValueError(f"model {name!r} cannot be built: {error}") from None
        return model.to(DTYPES[dtype]).eval(), processor
    if name in ("offline", "testbed"):
        raise ValueError(f"model {name!r} comes with the testbed distribution: pip install -e testbed (make install does)")
    check_model_source(name)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)  # first: it is quick, and a folder may lack it
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=DTYPES[dtype])
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load model {name!r}: {_first_line(error)}") from None
    return model.eval(), processor


def resolve_device(device: str | None) -> torch.device:
    """The torch device ``device`` names, checked to be usable here; ``None``: CUDA when present, else the CPU.

    Raises:
        ValueError: ``device`` names no torch device, or one this torch or machine lacks (CUDA on a
            torch built without it or on a machine without a GPU, a GPU index past those present);
            the message says what was asked, what is missing and what to pass instead.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} names no torch device ({_first_line(error)}); pass device=cpu, cuda or "
                         "cuda:N") from None
    if resolved.type == "cpu":
        return resolved
    try:
        torch.empty(0, device=resolved)
    except (AssertionError, RuntimeError) as error:  # a torch without CUDA fails with a bare AssertionError
        raise ValueError(f"device={device!r} is not available: {_missing_device(resolved, error)}; pass "
                         "device=cpu") from None
    return resolved


def _missing_device(device: torch.device, error: BaseException) -> str:
    """Why ``device`` cannot be used, in a user's words (``error``: what allocating on it raised)."""
    if device.type != "cuda":
        return _first_line(error)
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA (install a CUDA build of torch to use a GPU)"
    count = torch.cuda.device_count()
    if count == 0:
        return "this torch has CUDA but finds no GPU (check the driver and CUDA_VISIBLE_DEVICES)"
    return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1} ({_first_line(error)})"


def chat_prompt(processor, text: str, images: int) -> str:
    """The prompt for ``text`` about ``images`` images, with the processor's own image token.

    ``text`` that already holds ``<image>`` markers is used as it is (one marker per image).
    Otherwise the processor's chat template is applied, with the images before the text; a
    processor without one gets LLaVA-1.5's prompt, ``USER: <image>\\n... ASSISTANT:``.

    Raises:
        ValueError: the markers in ``text`` do not match the number of images.
    """
    if IMAGE_MARKER not in text and getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        text = text.replace(processor.image_token, IMAGE_MARKER)
    elif IMAGE_MARKER not in text:
        text = "USER: " + f"{IMAGE_MARKER}\n" * images + text + " ASSISTANT:"
    if text.count(IMAGE_MARKER) != images:
        raise ValueError(f"the prompt has {text.count(IMAGE_MARKER)} {IMAGE_MARKER} markers for {images} images")
    return text.replace(IMAGE_MARKER, processor.image_token)  # InternVL's is <IMG_CONTEXT>


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
