#!/usr/bin/env bash
# Installs modeling_essm and what it needs into the current Python (an active virtualenv is respected).
# A CPU build of torch is installed only when no torch is present, so an existing CUDA build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
