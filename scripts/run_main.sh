#!/usr/bin/env bash
# Sets up, then runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Train a small ES-SSM with budget dropout on generated ListOps, then evaluate it at every budget.
# Extra arguments go to the training command (e.g. --set training.max_steps=100).
OUTPUT_DIR="${ESSM_OUTPUT_DIR:-outputs/listops}"
"${PYTHON:-python3}" scripts/train.py configs/listops.yaml --set "training.output_dir=$OUTPUT_DIR" "$@"
"${PYTHON:-python3}" scripts/eval_budgets.py "$OUTPUT_DIR"
