#!/usr/bin/env bash
# Sets up (the package, and Chromium for the browser tests), then runs the test suite (slow tests excluded; run
# them with `python -m pytest -m slow`; the browser tests alone with `python -m pytest -m browser`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_browser.sh
"${PYTHON:-python3}" -m pytest -q "$@"
