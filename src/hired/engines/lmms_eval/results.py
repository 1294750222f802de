"""Reading lmms-eval result folders written with the ``hired`` model: accuracy against visual tokens.

lmms-eval writes ``<output_path>/<model>/<time>_results.json`` and, with ``--log_samples``, one
``<time>_samples_<task>.jsonl`` per task beside it. :func:`read_runs` turns them into one record per
run, task and metric, with the method and budget from the run's model arguments and the visual
tokens from the per-sample log (the plugin records them for every request). Needs no lmms-eval.

A sample whose generation failed under ``on_error=record`` is counted in ``failed`` and left out
of ``value``, which is then the mean over the answered samples (for metrics lmms-eval aggregates
by a mean; others get no value, since lmms-eval's own figure would score the failure).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from statistics import fmean
from typing import Any

RESULTS_GLOB = "*_results.json"
_KEY_VALUE = re.compile(r"([^=,]+)=(\{[^}]*\}|[^,]*)")


def model_arguments(text: str) -> dict[str, str]:
    """``key=value,...`` as lmms-eval writes ``config.model_args`` (JSON objects may hold commas)."""
    return {key.strip(): value for key, value in _KEY_VALUE.findall(text or "")}


def result_files(paths: list[str | Path]) -> list[Path]:
    """Every results file in ``paths`` (files, or folders searched recursively), in a stable order.

    Raises:
        ValueError: a path that does not exist, or no results file at all.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob(RESULTS_GLOB)))
        else:
            raise ValueError(f"{path} does not exist; give lmms-eval's --output_path folders or their *_results.json files")
    if not found:
        raise ValueError(f"no lmms-eval results ({RESULTS_GLOB}) in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def read_runs(paths: list[str | Path]) -> list[dict[str, Any]]:
    """One record per run, task and metric (see the module doc), sorted by task and metric, then ``full``,
    ``hired`` and the other methods by name, each by tokens.

    Raises:
        ValueError: a file that is not lmms-eval's results JSON, or a run of another model than ``hired``.
    """
    records = []
    for file in result_files(paths):
        try:
            document = json.loads(file.read_text())
            results, config = document["results"], document["config"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{file} is not an lmms-eval results file (no 'results' and 'config')") from None
        if config.get("model") != "hired" and "hired.engines.lmms_eval" not in str(config.get("model_backend", "")):
            raise ValueError(f"{file} is a run of model {config.get('model')!r}, not of hired; its visual tokens are unknown")
        arguments = model_arguments(config.get("model_args", ""))
        stem = file.name.removesuffix("_results.json")
        for task, metrics in results.items():
            samples = _samples(file.parent / f"{stem}_samples_{task}.jsonl")
            aggregations = {m.get("metric"): m.get("aggregation") for m in document.get("configs", {}).get(task, {}).get("metric_list", [])}
            for key, value in metrics.items():
                metric, _, _ = key.partition(",")
                if metric == "alias" or "_stderr" in metric or not isinstance(value, (int, float)):
                    continue
                records.append(_record(file, task, metric, float(value), arguments, samples, aggregations.get(metric), document))
    return sorted(records, key=lambda r: (r["task"], r["metric"], r["method"] != "full", r["method"] != "hired",
                                          r["method"], r["kept_tokens"] or 0))


def _samples(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _record(file: Path, task: str, metric: str, value: float, arguments: dict[str, str],
            samples: list[dict[str, Any]] | None, aggregation: Any, document: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "task": task,
        "metric": metric,
        "pretrained": arguments.get("pretrained"),
        "method": arguments.get("method", "hired"),
        "budget": _number(arguments.get("budget")),
        "tokens": _number(arguments.get("tokens")),
        "model_args": document["config"].get("model_args", ""),
        "value": value,
        "samples": document.get("n-samples", {}).get(task, {}).get("effective"),
        "failed": 0,
        "visual_tokens": None,
        "kept_tokens": None,
        "seconds": _number(document.get("total_evaluation_time_seconds")),
        "file": str(file),
    }
    if samples is None:
        record["note"] = "no per-sample log (run lmms-eval with --log_samples): visual tokens unknown"
        return record
    answered = [s for s in samples if not any("error" in (c or {}) for c in s.get("token_counts") or [])]
    record["samples"] = len(samples)
    record["failed"] = len(samples) - len(answered)
    counts = [c for s in answered for c in (s.get("token_counts") or [])[:1] if c and "visual_tokens" in c]
    if counts:
        record["visual_tokens"] = fmean(c["visual_tokens"] for c in counts)
        record["kept_tokens"] = fmean(c.get("kept_tokens", c["visual_tokens"]) for c in counts)
    if record["failed"]:
        scores = [s.get(metric) for s in answered]
        if aggregation == "mean" and answered and all(isinstance(v, (int, float)) for v in scores):
            record["value"] = fmean(scores)
            record["note"] = f"mean over the {len(answered)} answered samples; {record['failed']} failed"
        else:
            record["value"] = None
            record["note"] = f"{record['failed']} samples failed, and {metric} is not a mean of per-sample values"
    return record


def _number(text: Any) -> float | None:
    """A finite number from lmms-eval's text (model arguments, and times it writes as strings), or None."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
