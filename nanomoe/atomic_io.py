"""Atomic file writes: one implementation for checkpoints, prepared data, tokenizers and reports.

A file is written next to its destination under a temporary name (`.NAME.tmp-PID`), flushed to
disk, then renamed over the destination with os.replace, and the directory entry is flushed too.
A crash (even kill -9 or a power cut) at any moment leaves either the old file or the new one,
never half of one. Temporary names share TMP_MARK so leftovers of killed runs can be found.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def temporary_path(path: Path) -> Path:
    """Where `path` is written before the rename (same directory, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def temporary_dir(path: Path) -> Path:
    """Where a directory (a checkpoint, an export) is assembled before it is renamed to `path`."""
    path = Path(path)
    return path.with_name(f".tmp-{path.name}-{os.getpid()}")


def usual_permissions(path: Path) -> None:
    """rw for the owner, r for others as the umask allows: what open() gives, and not the 0600 some
    writers (safetensors' save_file) leave."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Flush `tmp`, rename it over `path`, flush the directory."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
