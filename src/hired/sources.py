"""Where a model comes from: a local folder or a hub id, checked before transformers reads it.

transformers reports a missing local folder as a malformed hub id, and an uncached hub id under
``HF_HUB_OFFLINE=1`` as a connection problem; this names the actual problem first.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
EXAMPLE = "llava-hf/llava-v1.6-vicuna-7b-hf"


def check_model_source(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a saved model folder or a hub id that can be loaded.

    A hub id is only checked against the local cache when downloads are off.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without config.json, so not a saved model; give a folder written "
                             f"by save_pretrained, or a hub id such as {EXAMPLE}")
        return
    if path.exists():
        raise ValueError(f"{path} is a file; give a model folder (written by save_pretrained) or a hub id")
    if not _HUB_ID.fullmatch(name) or name.startswith((".", "~")):
        raise ValueError(f"no model folder at {path}; check the path, or give a hub id such as {EXAMPLE}")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ValueError(f"model {name!r} is neither a local folder nor in the local Hugging Face cache, and downloads "
                         f"are off (HF_HUB_OFFLINE=1); download it on a connected machine (hf download {name}) or give "
                         "a local folder")
