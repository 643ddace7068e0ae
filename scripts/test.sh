#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${NANOMOE_VENV:-.venv}
# The suite starts a few hundred Python processes (the CLI tests). setup.sh installs without
# byte-compiling, so where PYTHONDONTWRITEBYTECODE is set each process would compile torch's modules
# again (seconds apiece, half the suite's time): let them share bytecode, kept in the venv so that
# nothing is written beside the sources.
if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ]; then
    unset PYTHONDONTWRITEBYTECODE
    export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-$(cd "$VENV" && pwd)/pycache}"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
