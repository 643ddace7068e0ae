#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${NANOMOE_VENV:-.venv}/bin/python" -m pytest -q "$@"
