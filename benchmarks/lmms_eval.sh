#!/usr/bin/env bash
# Every method of the harness through lmms-eval, each run in lmms-eval's own output folder, then one
# table and plot of accuracy against visual tokens (hired lmms-table).
#
#   benchmarks/lmms_eval.sh table3 [OUT]    the paper's Table 3 setting: llava-hf/llava-v1.6-vicuna-7b-hf,
#                                           batch 1, greedy, on a GPU with the hub and lmms-eval's datasets
#   benchmarks/lmms_eval.sh offline [OUT]   the testbed's offline tasks (50 scenes) on any machine
#
# Needs `pip install "hired[lmms]"` (or the venv of `make test-lmms`: .venv-lmms/bin on PATH; the
# offline mode also needs the testbed, which that venv has). --verbosity DEBUG makes lmms-eval exit
# non-zero when an evaluation fails, so a broken setting stops the script instead of scoring zero.
set -euo pipefail
mode=${1:?usage: benchmarks/lmms_eval.sh table3|offline [OUT]}
out=${2:-lmms-results/$mode}
include=()
case $mode in
  table3)
    model=llava-hf/llava-v1.6-vicuna-7b-hf
    tasks=vqav2_val,scienceqa_img,textvqa_val,docvqa_val,ocrbench,mme,pope,chartqa
    device=dtype=float16,device=cuda
    ;;
  offline)
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    model=testbed
    tasks=hired_scenes,hired_scenes_choice
    device=dtype=float32,device=cpu
    hired lmms-task "$out/tasks" --seed 1000 --n 50
    include=(--include_path "$out/tasks")
    ;;
  *) echo "unknown mode $mode; use table3 or offline" >&2; exit 2 ;;
esac

run() {  # $1: the method's model arguments, $2: the run's folder
  local start=$SECONDS
  lmms-eval --model hired --model_args "pretrained=$model,$1,$device" --tasks "$tasks" --batch_size 1 \
    --log_samples --output_path "$out/$2" --verbosity DEBUG "${include[@]}"
  echo "lmms_eval.sh: $2 took $((SECONDS - start)) s" | tee -a "$out/times.txt"
}

mkdir -p "$out"
run method=full full
run method=hired,budget=0.2 hired-20
run method=hired,budget=0.4 hired-40
# Every other method at 20%; PruMerge and PruMerge+ in their fixed-budget mode (the adaptive one picks
# its count from the pixels, which lmms-eval's one-pass processing cannot feed: the plugin refuses it).
for method in fastervlm visionzip divprune prumerge prumerge+ random spatial fastv; do
  run "method=$method,budget=0.2" "$method-20"
done
hired lmms-table "$out" --out "$out/table"
