#!/usr/bin/env sh
# The runs behind docs/benchmarks.md: sweep, batch, full, repeats, fastv, shapes, families, qwen, vllm, early-drop
# (default: all).
# Each writes bench.json, bench.md and bench.png under
# benchmarks/results/<name>/. Run from the repository root with the package installed
# (pip install -e ".[cli]"); HF_HUB_OFFLINE keeps transformers off the network.
set -eu
export HF_HUB_OFFLINE=1
which="${1:-all}"

# 1. Methods x budgets on the LLaVA-NeXT-7B (Vicuna) shape, 2 of 32 decoder layers, batch 1.
if [ "$which" = all ] || [ "$which" = sweep ]; then
  hired bench --model llava-v1.6-vicuna-7b-hf --layers 2 --dtype bfloat16 \
    --methods hired fastervlm --budgets 0.1 0.2 0.4 1.0 \
    --image-size 672x672 --batch 1 --new-tokens 6 --warmup 1 --repeats 3 \
    --output benchmarks/results/sweep
fi

# 2. Batch sizes 1, 2, 4: where the stock model's memory goes.
if [ "$which" = all ] || [ "$which" = batch ]; then
  hired bench --model llava-v1.6-vicuna-7b-hf --layers 2 --dtype bfloat16 \
    --methods hired --budgets 0.2 \
    --image-size 672x672 --batch 1 2 4 --new-tokens 6 --warmup 1 --repeats 1 \
    --output benchmarks/results/batch
fi

# 3. The whole 7B model (32 decoder layers, about 16 GB in bfloat16): stock against HiRED 20%.
if [ "$which" = all ] || [ "$which" = full ]; then
  hired bench --model llava-v1.6-vicuna-7b-hf --dtype bfloat16 \
    --methods hired --budgets 0.2 \
    --image-size 672x672 --batch 1 --new-tokens 4 --warmup 0 --repeats 1 \
    --output benchmarks/results/full-depth
fi

# 4. Five interleaved rounds of HiRED and FasterVLM at 20% and at full budget (2 of 32 layers).
if [ "$which" = all ] || [ "$which" = repeats ]; then
  hired bench --model llava-v1.6-vicuna-7b-hf --layers 2 --dtype bfloat16 \
    --methods hired fastervlm --budgets 0.2 1.0 \
    --image-size 672x672 --batch 1 --new-tokens 6 --warmup 1 --repeats 5 --seed 0 \
    --output benchmarks/results/priority
fi

# 5. FastV beside HiRED at 20%: FastV prunes after decoder layer 2, so 3 of the 32 layers.
if [ "$which" = all ] || [ "$which" = fastv ]; then
  hired bench --model llava-v1.6-vicuna-7b-hf --layers 3 --dtype bfloat16 \
    --methods hired fastv --budgets 0.2 \
    --image-size 672x672 --batch 1 --new-tokens 6 --warmup 1 --repeats 3 --seed 0 \
    --output benchmarks/results/fastv
fi

# 6. The other two shapes at 20%, 2 of 32 layers: LLaVA-NeXT (Mistral) and LLaVA-1.5 (576 tokens, one view).
if [ "$which" = all ] || [ "$which" = shapes ]; then
  hired bench --model llava-v1.6-mistral-7b-hf --layers 2 --dtype bfloat16 \
    --methods hired --budgets 0.2 \
    --image-size 672x672 --batch 1 --new-tokens 6 --warmup 1 --repeats 3 --seed 0 \
    --output benchmarks/results/mistral
  hired bench --model llava-1.5-7b-hf --layers 2 --dtype bfloat16 \
    --methods hired --budgets 0.2 \
    --image-size 672x672 --batch 1 --new-tokens 6 --warmup 1 --repeats 3 --seed 0 \
    --output benchmarks/results/llava-1.5
fi

# 7. InternVL3-8B and LLaVA-OneVision-7B shapes (2 of 28 decoder layers), HiRED at 20% against stock, a
#    1280x960 image (InternVL: 12 tiles and the thumbnail; OneVision: 3x4 tiles, downsampled).
if [ "$which" = all ] || [ "$which" = families ]; then
  hired bench --model internvl3-8b-hf --layers 2 --dtype bfloat16 --methods hired --budgets 0.2 \
    --image-size 1280x960 --batch 1 --new-tokens 8 --warmup 1 --repeats 3 --seed 0 \
    --output benchmarks/results/internvl3-8b
  hired bench --model llava-onevision-qwen2-7b-ov-hf --layers 2 --dtype bfloat16 --methods hired --budgets 0.2 \
    --image-size 1280x960 --batch 1 --new-tokens 8 --warmup 1 --repeats 3 --seed 0 \
    --output benchmarks/results/llava-onevision-7b
fi

# 8. Qwen2.5-VL-7B shape (2 of 28 decoder layers), HiRED at 20% against stock at native resolution: a
#    1280x960 image (34x46 = 1564 tokens) and a document page, A4 at 150 dpi (1240x1754: 63x44 = 2772 tokens).
if [ "$which" = all ] || [ "$which" = qwen ]; then
  hired bench --model qwen2.5-vl-7b-instruct --layers 2 --dtype bfloat16 --methods hired --budgets 0.2 \
    --image-size 1280x960 1240x1754 --batch 1 --new-tokens 8 --warmup 1 --repeats 3 --seed 0 \
    --output benchmarks/results/qwen2.5-vl-7b
fi

# 9. Serving with vLLM (the venv of `make test-vllm`): one stock vLLM server per shape with dummy weights, 2 of
#    the decoder layers, `vllm bench serve` against it at budgets 10/20/40% per request and stock, interleaved.
if [ "$which" = all ] || [ "$which" = vllm ]; then
  .venv-vllm/bin/python benchmarks/vllm_serving.py --model llava-v1.6-vicuna-7b-hf --layers 2 \
    --budgets 0.1 0.2 0.4 --image-size 1280x960 --prompts 6 --concurrency 3 --rounds 2 \
    --output benchmarks/results/vllm-llava-next
  .venv-vllm/bin/python benchmarks/vllm_serving.py --model llava-1.5-7b-hf --layers 2 \
    --budgets 0.1 0.2 0.4 --image-size 1280x960 --prompts 12 --concurrency 4 --rounds 2 \
    --output benchmarks/results/vllm-llava-1.5
  # InternVL3-8B: one 448 px tile, float32 (this CPU build's bf16 InternViT did not answer one request in 4.5 min)
  .venv-vllm/bin/python benchmarks/vllm_serving.py --model internvl3-8b-hf --layers 2 --dtype float32 \
    --budgets 0.1 0.2 0.4 --image-size 448x448 --prompts 3 --concurrency 3 --rounds 2 \
    --output benchmarks/results/vllm-internvl3
fi

# 10. The early drop (docs/early-drop.md): the Qwen2.5-VL-7B shape, stock against HiRED 20% without and with the
#     selection at each full-attention block before the last; the LLaVA-NeXT-7B and InternVL3-8B shapes with the
#     selection after a quarter, a half and three quarters of their 24-layer towers; float32 (this machine's CPU has
#     no bf16 instructions); and its fidelity on the testbed's real DINOv2 encoder at each layer, two seeds.
if [ "$which" = all ] || [ "$which" = early-drop ]; then
  python benchmarks/early_drop.py --model qwen2.5-vl-7b-instruct --layers 2 --dtype float32 --budget 0.2 \
    --drop-layers 7 15 23 --image-size 1280x960 --rounds 3 --output benchmarks/results/early-drop-qwen2.5-vl-7b
  python benchmarks/early_drop.py --model llava-v1.6-vicuna-7b-hf --layers 2 --dtype float32 --budget 0.2 \
    --drop-layers 5 11 17 --image-size 672x672 --rounds 3 --output benchmarks/results/early-drop-llava-next-7b
  python benchmarks/early_drop.py --model internvl3-8b-hf --layers 2 --dtype float32 --budget 0.2 \
    --drop-layers 5 11 17 --image-size 896x448 --rounds 3 --output benchmarks/results/early-drop-internvl3-8b
  python benchmarks/early_drop_fidelity.py --drop-layers 2 5 8 --budget 0.2 --seeds 0 1 --images 24 --questions 60 \
    --output benchmarks/results/early-drop-fidelity
fi
