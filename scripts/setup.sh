#!/usr/bin/env bash
# Creates the virtual environment (if missing) and installs nanomoe with its dev tools, PyTorch first.
# Idempotent: a second run only checks that everything is installed.
#   bash scripts/setup.sh           keeps the torch build already installed; on a new .venv the CPU build
#   bash scripts/setup.sh --cuda    the CUDA build (Linux x86-64 with an NVIDIA GPU); same as NANOMOE_TORCH=cuda
#   bash scripts/setup.sh --cpu     back to the CPU build
#   bash scripts/setup.sh --no-dev  without the test tools (the demo's install; scripts/test.sh adds them)
#   NANOMOE_VENV=path  where the environment lives (default .venv)
#   PYTHON=python3.11  the interpreter to create it with
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_BUILD="${NANOMOE_TORCH:-}"
EXTRAS="[dev]"
for arg in "$@"; do
    case "$arg" in
        --cuda) TORCH_BUILD=cuda ;;
        --cpu) TORCH_BUILD=cpu ;;
        --no-dev) EXTRAS="" ;;
        *) echo "scripts/setup.sh: unknown option $arg (use --cpu, --cuda or --no-dev)" >&2; exit 2 ;;
    esac
done
case "$TORCH_BUILD" in
    cpu|cuda|"") ;;
    *) echo "scripts/setup.sh: NANOMOE_TORCH must be cpu or cuda, not '$TORCH_BUILD'" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
VENV="${NANOMOE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# --no-compile: Python compiles what a program imports on first use; pip would byte-compile every
# file of every package up front (most of torch's never runs), a third of a fresh install's time
PIP="$PY -m pip"
PIP_INSTALL="$PIP install --quiet --no-compile"
# Which build is installed now: none, cpu or cuda.
installed=$($PY -c "import torch; print('cuda' if torch.version.cuda else 'cpu')" 2>/dev/null || echo none)
[ -n "$TORCH_BUILD" ] || TORCH_BUILD=$([ "$installed" = none ] && echo cpu || echo "$installed")
if [ "$installed" != none ] && [ "$installed" != "$TORCH_BUILD" ]; then
    echo "replacing the $installed build of torch with the $TORCH_BUILD build"
    $PIP uninstall --quiet --yes torch
    installed=none
fi
if [ "$installed" = none ]; then
    if [ "$TORCH_BUILD" = cuda ]; then
        # PyPI's Linux x86-64 torch wheel is the CUDA build (it brings NVIDIA's libraries: several GB).
        echo "installing torch 2.13.0, CUDA build (several GB)..."
        $PIP_INSTALL "torch==2.13.0"
    else
        # PyPI's Linux torch wheel is the CUDA build: take the CPU build (torch 2.13.0+cpu) from pip's
        # own indexes and wheel folders first (a machine with a local wheelhouse; where it is not
        # there pip says so at once), then from PyTorch's CPU index (asked second: on a machine that
        # cannot reach it, pip retries it for every dependency, over a minute). Where that build does
        # not exist (macOS, ARM), PyPI's plain torch 2.13.0 is already CPU-only.
        $PIP_INSTALL "torch==2.13.0+cpu" 2>/dev/null \
            || $PIP_INSTALL "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
            || $PIP_INSTALL "torch==2.13.0"
    fi
fi
# -c constraints.txt keeps pip from replacing that torch while resolving the other requirements
$PIP_INSTALL -c constraints.txt -e ".$EXTRAS"
$PY - <<'PYEOF'
import torch
build = f"CUDA {torch.version.cuda} build, {torch.cuda.device_count()} GPU(s) visible" if torch.version.cuda else "CPU build"
print(f"torch {torch.__version__}: {build}")
PYEOF
# nanomoe's native CPU kernels (nanomoe/kernels/csrc), compiled for this machine once (cached under
# ~/.cache/torch_extensions); without a compiler it says so and training uses the torch kernels
$PY -m nanomoe.kernels.build
