"""hired bench: cost formulas against hand counts and torch's FLOP counter, an end-to-end run, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hired import compat
from hired.bench import (
    BenchSpec,
    ModelShape,
    build_model,
    build_processor,
    kv_cache_bytes,
    llm_prefill_flops,
    load_model_spec,
    parameter_count,
    run_benchmark,
    vision_flops,
)
from hired.bench.cost import native_vision_flops, projector_flops
from hired.bench.measure import generate_kwargs, prepare_inputs
from hired.bench.models import PROMPT, known_models, synthetic_image
from hired.cli import main

RECORD_FIELDS = {
    "model", "layers", "full_layers", "dtype", "batch", "image_size", "grid", "method", "budget",
    "visual_tokens", "stock_visual_tokens", "prompt_tokens", "new_tokens", "warmup", "repeats",
    "ttft_s", "ttft_s_min", "ttft_s_max", "preprocess_s", "vision_s", "selection_s", "projector_s", "prefill_s",
    "other_s", "selection_share_of_vision", "ttft_speedup", "ttft_speedup_min", "ttft_speedup_max",
    "ttft_speedup_ideal", "ttft_speedup_of_ideal", "decode_tok_s", "e2e_tok_s", "e2e_s", "prefill_flops",
    "vision_flops", "llm_prefill_flops", "kv_cache_mb", "peak_rss_mb", "model_rss_mb",
}

# A shape small enough to count by hand: 4 px tiles of 2 px patches (4 patches + CLS = 5 tokens).
SMALL = ModelShape(
    vision_width=4, vision_mlp=8, vision_layers=2, vision_layers_used=1, vision_heads=2, tile=4, patch=2,
    text_width=8, text_mlp=16, text_layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10, newline=True,
)


def test_flops_of_a_small_shape_match_a_hand_count():
    # patch embedding 2*4*(3*2*2)*4 = 384; per layer: q,k,v,o 2*5*4*4*4 = 640, scores and
    # attention-weighted values 2*2*5*5*4 = 400, MLP 2*2*5*4*8 = 640.
    assert vision_flops(SMALL, tiles=1, layers_run=2) == 384 + 2 * (640 + 400 + 640)
    assert vision_flops(SMALL, tiles=3, layers_run=1) == 3 * (384 + 640 + 400 + 640)
    # dropping after layer 0 of 2 tiles that keep 4 patches: layer 1 runs over each tile's CLS and 2 patches,
    # q,k,v,o 2*3*4*4*4 = 384, attention 2*2*3*3*4 = 144, MLP 2*2*3*4*8 = 384.
    assert vision_flops(SMALL, tiles=2, layers_run=2, drop=(0, 4)) == 2 * (384 + 640 + 400 + 640 + 384 + 144 + 384)
    # two linears 4->8 and 8->8 on 3 tokens
    assert projector_flops(SMALL, tokens=3) == 2 * 3 * (4 * 8 + 8 * 8)
    # 3 tokens: q,o 2*3*8*8 each, k,v 2*3*8*4 each = 1152; causal attention over 6 visible pairs,
    # 2*2*8*6 = 192; gated MLP 2*3*3*8*16 = 2304; LM head on the last position 2*8*10 = 160.
    assert llm_prefill_flops(SMALL, sequence=3, batch=1) == 2 * (1152 + 192 + 2304) + 160
    assert llm_prefill_flops(SMALL, sequence=3, batch=2) == 2 * (2 * (1152 + 192 + 2304) + 160)


def test_kv_cache_of_a_small_shape_matches_a_hand_count():
    # keys and values, 2 layers, 1 kv head of width 4, 5 positions, batch 2, 2 bytes each
    assert kv_cache_bytes(SMALL, cached_tokens=5, batch=2, bytes_per_value=2) == 2 * 2 * 1 * 4 * 5 * 2 * 2


def test_seven_billion_shape_has_the_checkpoint_parameter_count():
    shape = ModelShape.from_config(load_model_spec("llava-hf/llava-v1.6-vicuna-7b-hf").config())
    # Llama-2-7B (6,738,415,616) with 64 more vocabulary rows in embedding and head, CLIP ViT-L/14-336's
    # vision model (303,507,456), the projector 1024->4096->4096 with biases, the newline vector.
    llm = 6_738_415_616 + 2 * 64 * 4096
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert parameter_count(shape) == llm + 303_507_456 + projector + 4096
    assert ModelShape.from_config(load_model_spec("llava-v1.6-mistral-7b-hf").config()).kv_heads == 8


@pytest.fixture(scope="module")
def tiny_next():
    spec = load_model_spec("tiny-random-llava-next")
    processor = build_processor(spec)
    model = build_model(spec, None, "float32", processor)
    return spec, model, processor


@pytest.mark.parametrize("name", ["tiny-random-llava-next", "tiny-random-llava"])
def test_built_model_has_the_analytic_parameter_count(name):
    spec = load_model_spec(name)
    model = build_model(spec, None, "bfloat16", build_processor(spec))
    assert sum(p.numel() for p in model.parameters()) == parameter_count(ModelShape.from_config(model.config))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny-random-internvl", "tiny-random-llava-onevision", "tiny-random-qwen2.5-vl"])
def test_new_families_parameter_count_is_close_to_the_analytic_one(name):
    # InternViT's layer scales and the projector's norm, SigLIP's missing pre-norm: a few hundred of ~90k.
    spec = load_model_spec(name)
    model = build_model(spec, None, "float32", build_processor(spec))
    built = sum(p.numel() for p in model.parameters())
    assert abs(built - parameter_count(ModelShape.from_config(model.config))) < 0.02 * built


@pytest.mark.parametrize("name", ["tiny-random-llava-next", "tiny-random-internvl", "tiny-random-llava-onevision"])
def test_vision_flops_match_torch_flop_counter(name):
    spec = load_model_spec(name)
    model = build_model(spec, None, "float32", build_processor(spec))
    shape = ModelShape.from_config(model.config)
    model.set_attn_implementation("eager")  # the counter sees attention only as explicit matmuls
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.vision_tower(pixel_values=torch.randn(2, 3, shape.tile, shape.tile))
    assert counter.get_total_flops() == vision_flops(shape, tiles=2, layers_run=shape.vision_layers)


def test_native_vision_flops_of_a_small_shape_match_a_hand_count():
    # 2x2 patches per LLM token, windows of 2x2 LLM tokens; a 3x3-token image has windows of 2x2, 2x1,
    # 1x2 and 1x1 tokens (16, 8, 8 and 4 patches of its 36); layer 1 of 2 attends over all 36.
    shape = ModelShape(vision_width=4, vision_mlp=8, vision_layers=2, vision_layers_used=2, vision_heads=2, tile=0,
                       patch=2, text_width=8, text_mlp=16, text_layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10,
                       newline=False, cls=False, merge=4, projector_hidden=16, temporal_patch=2, window=2,
                       full_attention_layers=(1,), gated_mlp=True)
    embedding = 2 * 36 * (3 * 2 * 2 * 2) * 4
    linear = 2 * 36 * 4 * 4 * 4 + 2 * 3 * 36 * 4 * 8
    windowed = 2 * 2 * 4 * (16**2 + 8**2 + 8**2 + 4**2)
    assert native_vision_flops(shape, (3, 3), layers_run=2) == embedding + 2 * linear + windowed + 2 * 2 * 4 * 36**2
    assert native_vision_flops(shape, (3, 3), layers_run=1) == embedding + linear + windowed
    # dropping after layer 0, keeping 3 of the 9 tokens: layer 1 attends over their 12 patches
    kept_linear = 2 * 12 * 4 * 4 * 4 + 2 * 3 * 12 * 4 * 8
    assert native_vision_flops(shape, (3, 3), layers_run=2, drop=(0, 3)) == (embedding + linear + windowed + kept_linear
                                                                            + 2 * 2 * 4 * 12**2)
    assert projector_flops(shape, tokens=9) == 2 * 9 * (16 * 16 + 16 * 8)  # merger: 16 -> 16 -> 8


def test_native_vision_flops_match_torch_flop_counter():
    # 21x29 tokens: windows of 4x4 tokens with a ragged last row and column, as the real tower cuts them.
    spec = load_model_spec("tiny-random-qwen2.5-vl")
    processor = build_processor(spec)
    model = build_model(spec, None, "float32", processor)
    shape = ModelShape.from_config(model.config)
    inputs = processor(images=[synthetic_image(800, 600, 0)], text=[spec.prompt], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 42, 58]]
    model.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.visual(inputs["pixel_values"], grid_thw=grid)
    tokens = (21, 29)
    assert counter.get_total_flops() == (native_vision_flops(shape, tokens, layers_run=shape.vision_layers)
                                         + projector_flops(shape, tokens[0] * tokens[1]))


@pytest.mark.parametrize(("name", "stock", "kept"), [("tiny-random-internvl", 3328, 666),
                                                     ("tiny-random-llava-onevision", 4725, 934),
                                                     ("tiny-random-qwen2.5-vl", 609, 122)])
def test_new_families_run_through_the_benchmark(name, stock, kept):
    records = run_benchmark(BenchSpec(model=name, methods=["hired"], budgets=[0.2], image_sizes=[(800, 600)],
                                      new_tokens=2, warmup=0, repeats=1, peak_memory=False))
    assert {r["method"]: r["visual_tokens"] for r in records} == {"stock": stock, "hired": kept}
    assert records[1]["ttft_speedup_ideal"] > 1


def test_methods_that_need_cls_are_left_out_on_siglip_and_refused_when_asked():
    with pytest.warns(UserWarning) as caught:
        bench = BenchSpec(model="tiny-random-llava-onevision")
        bench.validate()
    left_out = {str(w.message).split(" out of ")[0].removeprefix("leaving ") for w in caught}
    assert left_out == {"fastervlm", "prumerge", "prumerge+", "fastv"}  # fastv: the tiny model has 2 layers
    assert all("has no CLS token" in str(w.message) for w in caught if "fastv " not in str(w.message))
    assert not left_out & set(bench.methods) and "hired" in bench.methods
    with pytest.raises(ValueError, match="has no CLS token"):
        BenchSpec(model="tiny-random-llava-onevision", methods=["prumerge"]).validate()


def test_llm_prefill_flops_match_torch_flop_counter_up_to_causality(tiny_next):
    _, model, _ = tiny_next
    shape = ModelShape.from_config(model.config)
    sequence = 30
    model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            hidden = model.model.language_model(inputs_embeds=torch.randn(1, sequence, shape.text_width))
            model.lm_head(hidden.last_hidden_state[:, -1:])
    finally:
        model.set_attn_implementation("sdpa")
    # eager attention multiplies the full square; the formula counts only the causal triangle
    width = shape.heads * shape.head_dim
    masked_half = 2 * 2 * width * (sequence * sequence - sequence * (sequence + 1) // 2) * shape.text_layers
    assert counter.get_total_flops() == llm_prefill_flops(shape, sequence) + masked_half


def test_kv_cache_formula_matches_the_real_cache(tiny_next):
    _, model, processor = tiny_next
    images = [synthetic_image(672, 672, 0), synthetic_image(672, 672, 1)]
    new_tokens = 4
    with torch.inference_mode():
        inputs = prepare_inputs(processor, images, PROMPT, model.dtype)
        output = model.generate(**inputs, **generate_kwargs(new_tokens), return_dict_in_generate=True)
    cache = compat.cache_of(output)
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    shape = ModelShape.from_config(model.config)
    assert output.sequences.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    assert measured == kv_cache_bytes(shape, inputs["input_ids"].shape[1] + new_tokens - 1, 2, 4)


def test_weights_fill_fast_and_are_not_constant(tiny_next):
    _, model, _ = tiny_next
    weight = model.model.language_model.layers[0].mlp.up_proj.weight.detach()
    assert 0.01 < float(weight.std()) < 0.03
    assert float(model.model.language_model.norm.weight.detach().min()) == 1.0


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    status = main(["bench", "--model", "tiny-random-llava-next", "--methods", "hired", "--budgets", "0.2", "1.0",
                   "--image-size", "672x672", "--new-tokens", "3", "--warmup", "1", "--repeats", "2",
                   "--output", str(folder), "--quiet"])
    return status, folder


def test_bench_writes_every_field_and_the_report(cli_run):
    status, folder = cli_run
    assert status == 0
    document = json.loads((folder / "bench.json").read_text())
    assert document["command"].startswith("hired bench --model tiny-random-llava-next")
    assert {"cpu", "cores", "memory_gb", "torch", "transformers"} <= set(document["machine"])
    records = {(r["method"], r["budget"]): r for r in document["records"]}
    assert set(records) == {("stock", 1.0), ("hired", 0.2), ("hired", 1.0)}
    for record in records.values():
        assert set(record) == RECORD_FIELDS
        assert record["layers"] == record["full_layers"] == 2
        assert record["image_size"] == "672x672" and record["grid"] == "2x2" and record["repeats"] == 2
        assert record["ttft_s_min"] <= record["ttft_s"] <= record["ttft_s_max"]
        assert 0 < record["vision_s"] and 0 < record["prefill_s"] < record["ttft_s"]
        assert record["peak_rss_mb"] >= record["model_rss_mb"] > 0
        assert record["decode_tok_s"] > 0 and record["e2e_tok_s"] > 0
    stock, reduced, full = records["stock", 1.0], records["hired", 0.2], records["hired", 1.0]
    assert stock["visual_tokens"] == full["visual_tokens"] == 2880 + 48  # 5 tiles, 48 newline tokens
    assert reduced["visual_tokens"] == 576  # 20% of the 2880 stock tokens
    assert stock["ttft_speedup"] == stock["ttft_speedup_ideal"] == 1.0
    assert full["ttft_speedup_ideal"] == 1.0 and reduced["ttft_speedup_ideal"] > 1.5
    assert reduced["kv_cache_mb"] < stock["kv_cache_mb"] == full["kv_cache_mb"]
    assert reduced["prefill_flops"] < stock["prefill_flops"]
    assert (folder / "bench.png").stat().st_size > 0
    table = (folder / "bench.md").read_text()
    assert "2 of 2 decoder layers" in table and "| hired | 0.2 | 576 |" in table


def test_single_partition_model_runs_through_the_api():
    records = run_benchmark(BenchSpec(model="tiny-random-llava", methods=["hired"], budgets=[0.25],
                                      new_tokens=2, warmup=0, repeats=1, peak_memory=False))
    tokens = {r["method"]: r["visual_tokens"] for r in records}
    assert tokens == {"stock": 576, "hired": 144}
    assert records[0]["grid"] == "0x0" and records[1]["peak_rss_mb"] is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "llava-hf/llava-9b"], "unknown benchmark model 'llava-hf/llava-9b'; known models: "),
        (["--budgets", "1.5"], "argument --budgets: expected a fraction in (0, 1], got 1.5"),
        (["--methods", "nope"], "unknown method 'nope'; available methods: "),
        (["--methods", "full"], "'full' is the reference every run measures"),
        (["--layers", "40"], "--layers must be between 1 and 32"),
        (["--new-tokens", "1"], "argument --new-tokens: expected a whole number >= 2, got 1"),
        (["--batch", "4", "--max-memory-gb", "16"], "this run would need about"),
    ],
)
def test_bad_input_gets_a_clear_error(arguments, message, capsys, tmp_path):
    assert main(["bench", *arguments, "--output", str(tmp_path), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error
    assert not (tmp_path / "bench.json").exists()


def test_memory_refusal_names_the_parts_and_the_fix(capsys, tmp_path):
    main(["bench", "--batch", "4", "--max-memory-gb", "16", "--output", str(tmp_path), "--quiet"])
    error = capsys.readouterr().err
    assert "weights 13.2 GiB" not in error and "weights 13.2," in error and "32 decoder layers at batch 4" in error and "use fewer --layers" in error


def test_image_size_must_be_width_by_height(capsys):
    assert main(["bench", "--image-size", "672"]) == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_known_models_include_the_checkpoints():
    assert {"llava-v1.6-vicuna-7b-hf", "llava-v1.6-mistral-7b-hf", "llava-1.5-7b-hf", "internvl3-8b-hf",
            "llava-onevision-qwen2-7b-ov-hf", "qwen2.5-vl-7b-instruct"} <= set(known_models())
    assert load_model_spec("Qwen/Qwen2.5-VL-7B-Instruct").family == "qwen2.5-vl"
    assert load_model_spec("OpenGVLab/InternVL3-8B-hf").family == "internvl"
