#!/usr/bin/env bash
# The main job on a fresh machine: install, train a small MoE on the built-in story corpus
# (2 minutes of training steps: the default recipe's time budget), then print sample stories.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-dev
exec "${NANOMOE_VENV:-.venv}/bin/nanomoe" train "$@"
