"""``hired lmms-task``: the testbed's scenes as local lmms-eval tasks, written on demand.

The folder holds two tasks over the same scenes, questions and answers as ``hired eval`` (the same
seed gives the same split):

- ``hired_scenes`` (``generate_until``, exact match on the greedy answer of at most 2 tokens);
- ``hired_scenes_choice`` (``multiple_choice``, the answers a question of that type can have,
  scored by lmms-eval from the model's ``loglikelihood``).

Run them with ``lmms-eval --model hired --model_args pretrained=testbed,... --tasks hired_scenes
--include_path FOLDER``. Only scenes: the trained model never saw documents.

Each folder is self-contained (images, ``data/metadata.jsonl``, the YAML files and a ``utils.py``
that binds the hooks below to the folder), so it can be moved or copied to a GPU machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from .scenes import COLOURS, PATTERNS, SHAPES

GENERATE_TASK = "hired_scenes"
CHOICE_TASK = "hired_scenes_choice"
DATA_FILE = "data/metadata.jsonl"
CHOICES = {"pattern": PATTERNS, "colour": tuple(COLOURS), "shape": SHAPES}

_COMMON = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA_FILE}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
metadata:
  version: 1
"""

TASKS = {
    GENERATE_TASK: f"""task: {GENERATE_TASK}
output_type: generate_until
{_COMMON}generation_kwargs:
  max_new_tokens: 2
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    CHOICE_TASK: f"""task: {CHOICE_TASK}
output_type: multiple_choice
{_COMMON}doc_to_choice: !function utils.doc_to_choice
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
}

UTILS = '''"""Hooks of the tasks in this folder, written by `hired lmms-task` (see hired_testbed.lmms_task)."""

from pathlib import Path

from hired_testbed.lmms_task import hooks

doc_to_visual, doc_to_text, doc_to_choice, process_results = hooks(Path(__file__).parent)
'''


def write_tasks(folder: str | Path, seed: int = 1000, n: int = 90) -> list[Path]:
    """Write both tasks over ``n`` scenes of ``hired eval``'s split ``seed`` into ``folder``.

    Returns:
        The YAML files written.
    """
    from .vlm import question_split

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / DATA_FILE).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, sample in enumerate(question_split(seed, n)):
        image = f"images/{index:05d}.png"
        sample.image.save(folder / image)
        rows.append({"id": index, "image": image, "question": sample.question, "answer": sample.answer,
                     "question_type": sample.question_type})
    (folder / DATA_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "utils.py").write_text(UTILS)
    written = []
    for name, text in TASKS.items():
        path = folder / f"{name}.yaml"
        path.write_text(f"# Written by `hired lmms-task --seed {seed} --n {n}`.\n" + text)
        written.append(path)
    return written


def hooks(folder: Path) -> tuple[Callable, ...]:
    """``(doc_to_visual, doc_to_text, doc_to_choice, process_results)`` for the tasks in ``folder``."""

    def doc_to_visual(doc: dict[str, Any]) -> list:
        from PIL import Image

        with Image.open(folder / doc["image"]) as image:
            return [image.convert("RGB")]

    def doc_to_text(doc: dict[str, Any]) -> str:
        return doc["question"]

    def doc_to_choice(doc: dict[str, Any]) -> list[str]:
        return list(CHOICES[doc["question_type"]])

    def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
        return {"exact_match": float(results[0].strip() == doc["answer"])}

    return doc_to_visual, doc_to_text, doc_to_choice, process_results


def _run(args: argparse.Namespace) -> None:
    paths = write_tasks(args.out, args.seed, args.n)
    print(f"wrote {len(paths)} tasks over {args.n} scenes (seed {args.seed}) into {args.out}:")
    for path in paths:
        print(f"  {path.stem}")
    print(f"run: lmms-eval --model hired --model_args pretrained=testbed,budget=0.2 --tasks {GENERATE_TASK} "
          f"--include_path {args.out} --output_path lmms-results --log_samples --verbosity DEBUG")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from hired.cli.common import integer, output_folder

    parser = subparsers.add_parser(
        "lmms-task", help="write the testbed's scenes as local lmms-eval tasks",
        description="Write the scenes of `hired eval` (same seed, same split) as two local lmms-eval tasks: "
        f"{GENERATE_TASK} (greedy answer, exact match) and {CHOICE_TASK} (multiple choice by log-likelihood). "
        "Pass the folder to lmms-eval with --include_path; the trained testbed model is --model_args pretrained=testbed.",
    )
    parser.add_argument("out", type=output_folder, help="folder to write the tasks into (created if missing)")
    parser.add_argument("--seed", type=integer(0), default=1000, help="seed of the scene split (default 1000, as hired eval)")
    parser.add_argument("--n", type=integer(1), default=90, help="scenes (default 90, as hired eval)")
    parser.set_defaults(run=_run)
