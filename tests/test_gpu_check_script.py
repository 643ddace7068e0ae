"""scripts/gpu_check.sh on a machine without a GPU: one line saying why, exit 1, nothing written.
(On a GPU machine the script itself is the test: it runs tests/test_cuda.py and more.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "scripts" / "gpu_check.sh"


def run(*args, path_prefix: str | None = None):
    env = {**os.environ, "PYTHON": sys.executable}
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2"], "unknown option --gpus (use --nproc N, --out DIR)"),
    (["--nproc", "3"], "--nproc must be 1 or 2, not '3'"),
    (["--nproc"], "--nproc must be 1 or 2, not ''"),
])
def test_bad_options_are_one_line(args, message, tmp_path):
    proc = run("--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2
    assert not (tmp_path / "out").exists()
    assert proc.stderr.strip() == f"scripts/gpu_check.sh: {message}"


@pytest.mark.parametrize("fake_driver", [False, True])
def test_without_a_usable_gpu_it_says_so_in_one_line_and_writes_nothing(tmp_path, fake_driver):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here: the script would run the check")
    prefix = None
    if fake_driver:  # an NVIDIA driver in sight, torch the CPU build
        if torch.version.cuda is not None:
            pytest.skip("torch here is a CUDA build")
        prefix = tmp_path / "bin"
        prefix.mkdir()
        (prefix / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
        (prefix / "nvidia-smi").chmod(0o755)
    proc = run("--out", str(tmp_path / "out"), path_prefix=str(prefix) if prefix else None)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and not proc.stdout, proc.stderr
    if fake_driver:
        assert "is the CPU build; install the CUDA build with: bash scripts/setup.sh --cuda" in lines[0]
    else:
        assert lines[0].startswith("scripts/gpu_check.sh: no CUDA GPU is visible to torch")
    assert not (tmp_path / "out").exists()
