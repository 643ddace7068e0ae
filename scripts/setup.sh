#!/usr/bin/env bash
# Creates .venv (if missing) and installs nanomoe with its dev tools, CPU-only PyTorch first.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${NANOMOE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip >/dev/null 2>&1 || true
# The CPU wheel: on this project's machines it lies on disk; elsewhere use PyTorch's CPU index.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    $PIP install --quiet "torch==2.13.0" \
        || $PIP install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
$PIP install --quiet -c constraints.txt -e ".[dev]"
