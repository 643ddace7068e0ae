"""Shared pieces of the hostile-input tests: the CLI in a subprocess, a tiny run made once per
session and copied per test, and a pickle that leaves a marker file if it is ever unpickled."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def expect(self, *needles: str, code: int = 1) -> None:
        """Exit `code`, no traceback, and output containing every needle (what to change)."""
        text = self.out + self.err
        assert "Traceback" not in text, text
        assert self.code == code, (self.code, text)
        for needle in needles:
            assert needle in text, (needle, text)


def cli(*args: str, stdin: str | bytes | None = None, timeout: float = 300, env: dict | None = None) -> Result:
    """`python -m nanomoe ARGS` in a subprocess with this checkout first on the path."""
    environment = {**cli_env(), **(env or {})}
    data = stdin.encode() if isinstance(stdin, str) else stdin
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    proc = subprocess.run([sys.executable, "-m", "nanomoe", *argv], input=data, capture_output=True,
                          timeout=timeout, env=environment, cwd=REPO)
    return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def cli_env() -> dict[str, str]:
    """This checkout first on the path; no native kernels (nothing here is about speed, and a build
    per test process would cost minutes on a busy machine)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "NANOMOE_TRACEBACK": "", "NANOMOE_NATIVE": "0"}


class RunsCode:
    """Unpickling this creates `marker`: the proof that a loader executed code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(RunsCode(marker)))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes, to assert a refused command changed nothing."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
