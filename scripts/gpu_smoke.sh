#!/usr/bin/env bash
# Smoke run of the recipes on a GPU (under 8 minutes on one GPU; the tiny model, a few steps per stage):
# SFT with the judge filter, GRPO with a KL term, DPO; prints where each stage sampled and trained, and its time.
#   scripts/gpu_smoke.sh                        # on CUDA
#   DEVICE=cpu STEPS=1 scripts/gpu_smoke.sh     # the same on the CPU
#   scripts/gpu_smoke.sh --dry-run              # CPU, 1 step, 16 problems: a check of the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python scripts/gpu_smoke.py --device "${DEVICE:-cuda}" --steps "${STEPS:-4}" \
    --problems "${PROBLEMS:-64}" --output_dir "${OUT:-outputs/gpu_smoke}" "$@"
