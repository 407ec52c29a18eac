#!/usr/bin/env bash
# Sets up, then runs the test suite (slow tests excluded; run them with `python -m pytest -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m pytest -q "$@"
