"""One writer per run directory: an advisory lock held while `nanomoe train` writes into it.

`RUN/.lock` is locked with flock(2), which the kernel releases when the process ends in any way
(kill -9 included), so a lock can never outlive its holder. The file keeps the holder's pid, host
and command line: a second `train` into the same --out is refused with a message naming it, and a
file left by a process that died is reported as stale and taken over. Where flock does not exist
(Windows), runs are not locked.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".lock"
log = logging.getLogger("nanomoe.train")


class RunLock:
    """`with RunLock(run_dir):` ... holds RUN/.lock; ConfigError if another process holds it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if fcntl is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} is being written by another training ({holder}); wait for it to finish or "
                "stop it, or pass another --out"
            ) from None
        previous = _read_holder(fd)
        if previous.get("pid") and not _same_process(previous):
            log.warning("stale lock %s from %s, which is no longer running: taking it over (its checkpoints "
                        "are checked on resume)", self.path, _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                  "command": " ".join(sys.argv)}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty file: released cleanly, not stale
        except OSError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _same_process(holder: dict) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "a process that did not record itself"
    started = holder.get("started")
    when = time.strftime(" since %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else ""
    command = f": {holder['command']}" if holder.get("command") else ""
    return f"pid {holder['pid']} on {holder.get('host', '?')}{when}{command}"
