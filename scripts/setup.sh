#!/usr/bin/env bash
# Creates the virtual environment (if missing) and installs nanomoe with its dev tools, CPU-only
# PyTorch first. Idempotent: a second run only checks that everything is installed.
#   NANOMOE_VENV=path  where the environment lives (default .venv)
#   PYTHON=python3.11  the interpreter to create it with
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${NANOMOE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip >/dev/null 2>&1 || true
# PyPI's Linux torch wheel is the CUDA build (several GB with its nvidia packages): take the CPU build
# from PyTorch's CPU index (torch 2.13.0+cpu); where that build does not exist (macOS, ARM), PyPI's
# plain torch 2.13.0 is already CPU-only.
CPU_INDEX=https://download.pytorch.org/whl/cpu
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    $PIP install --quiet "torch==2.13.0+cpu" --extra-index-url "$CPU_INDEX" 2>/dev/null \
        || $PIP install --quiet "torch==2.13.0"
fi
# -c constraints.txt keeps pip from replacing that torch while resolving the other requirements
$PIP install --quiet -c constraints.txt -e ".[dev]"
