#!/usr/bin/env bash
# The main job on a fresh machine: install, train a small MoE on the built-in story corpus
# (a few minutes on 2 CPU cores), then print sample stories.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${NANOMOE_VENV:-.venv}/bin/nanomoe" train "$@"
