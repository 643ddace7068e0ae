"""The code passes the lint rules in pyproject.toml ([tool.ruff.lint]): unused names, undefined
names, import order, likely bugs. Skipped when ruff is not installed (it is a dev dependency)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    cmd = [sys.executable, "-m", "ruff", "check", "--output-format", "concise", "nanomoe", "tests", "research"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
