#!/usr/bin/env bash
# Installs modeling_essm and what it needs into the current Python (an active virtualenv is respected).
# A CPU build of torch is installed only when no torch is present, so an existing CUDA build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch 2.13.0 (CPU build)..."
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
echo "setup: installing modeling_essm and its test dependencies (transformers, peft, onnx, ...); the first time takes a few minutes..."
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
echo "setup: done ($("$PYTHON" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
