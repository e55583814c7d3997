#!/usr/bin/env bash
# The GPU figures and checks in one call (what a session lent a GPU runs; ~10 min on an H100/H200), each step's
# output under ${OUT:-gpu_check}/: the CUDA tests, the GPU benchmark (COCO-scale training today vs fast for every
# variant, extraction on the GPU vs the bare forward, batched beam search), then a real training run on the GPU
# with the fast settings against the default batch (shapes world, same epochs: validation BLEU-4 side by side).
#   bash experiments/gpu_check.sh            IMAGES=20000 for a shorter workload
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -m pytest -q -m '' -k "cuda or compile or resident" tests/ 2>&1 | tail -25 | tee "$out/tests.txt"
"$py" experiments/benchmark.py --cuda --images "${IMAGES:-100000}" --batch-size "${BATCH:-1024}" \
    --out "$out/benchmark_cuda.json" 2>&1 | grep -v "Warning\|warn(" | tee "$out/benchmark.txt"
for setting in "loader.batch_size=64" "loader.batch_size=${BATCH:-1024} compile=true"; do
    name=$(echo "$setting" | tr ' =' '_-')
    "$py" train.py model=dino_attention trainer=gpu $setting logger=csv "hydra.run.dir=$out/run_$name" 2>&1 \
        | grep "captioner\]\|resident\|learning rate" | tee -a "$out/runs.txt"
    grep -h "train_seconds\|best_val_bleu_4" "$out/run_$name/metrics.json" | tee -a "$out/runs.txt"
done
