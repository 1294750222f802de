"""The memory probe: ``python -m hired.bench.probe '<json request>'``.

It builds the model, serves one request of one variant and prints its peak resident set size as
JSON. The high-water mark of a process never goes down, so each variant is measured in a fresh
process of its own; and because building the model can briefly need more than serving it, the mark
is reset once the model is built (Linux), so the peak is that of the request: weights plus working
memory.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

import hired
from hired.bench.measure import generate_kwargs, prepare_inputs
from hired.bench.models import build_model, build_processor, load_model_spec, synthetic_image


def _status_bytes(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` (Linux, in KiB there) in bytes; ``None`` elsewhere."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set since the last :func:`reset_peak`."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # since the process started
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    current = _status_bytes("VmRSS")
    return peak_rss_bytes() if current is None else current


def reset_peak() -> None:
    """Restart the high-water mark from the current resident set (Linux; elsewhere a no-op)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def probe_memory(request: dict[str, Any]) -> dict[str, float]:
    """Build the model, run one request of a variant, report the process's peak and resident memory."""
    spec = load_model_spec(request["model"])
    processor = build_processor(spec)
    model = build_model(spec, request["layers"], request["dtype"], processor, seed=request["seed"])
    if request["method"] != "stock":
        hired.apply(model, processor, method=request["method"], budget=request["budget"],
                    drop_layer=request.get("drop_layer"))
    after_build = current_rss_bytes()
    reset_peak()
    width, height = request["image_size"]
    images = [synthetic_image(width, height, seed) for seed in range(request["batch"])]
    with torch.inference_mode():
        inputs = prepare_inputs(processor, images, request["prompt"], model.dtype)
        model.generate(**inputs, **generate_kwargs(request["new_tokens"]))
    return {"peak_rss_mb": peak_rss_bytes() / 2**20, "model_rss_mb": after_build / 2**20}


if __name__ == "__main__":
    print(json.dumps(probe_memory(json.loads(sys.argv[1]))))
