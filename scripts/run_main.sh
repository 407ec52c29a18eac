#!/usr/bin/env bash
# Sets up, then runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Train a small ES-SSM with budget dropout on generated ListOps, then evaluate it at every budget.
# Extra arguments go to the training command (e.g. --set training.max_steps=100).
# One thread: this model's ops are small, and two threads on a busy 2-core machine stall each other
# (about 3x slower in our measurements); torchrun makes the same choice per process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
OUTPUT_DIR="${ESSM_OUTPUT_DIR:-outputs/listops}"
"${PYTHON:-python3}" scripts/train.py configs/listops.yaml --set "training.output_dir=$OUTPUT_DIR" "$@"
"${PYTHON:-python3}" scripts/eval_budgets.py "$OUTPUT_DIR"
