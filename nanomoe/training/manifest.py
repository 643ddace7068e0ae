"""Checkpoint manifests: the size and sha256 of every file of a checkpoint directory.

`manifest.json` is written last (atomically) into a checkpoint directory before the directory is
published. Loading checks it: the sizes always (one stat per file), the hashes on resume and on
`nanomoe checkpoint verify`. Flipped bytes, a truncated file, a deleted or swapped-in file are
then reported by name instead of becoming a silently wrong model. Checkpoints written before
manifests existed carry none and are read unverified.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..atomic_io import write_json_atomic
from ..errors import CheckpointError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | Path) -> None:
    """Record every file now under `directory`; call it after the last file is written."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(directory)
    }
    write_json_atomic(directory / MANIFEST, {"format": MANIFEST_FORMAT, "files": files})


def read_manifest(directory: str | Path) -> dict[str, dict] | None:
    """The files recorded in `directory`'s manifest; None when it has none (an older checkpoint)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        ):
            raise ValueError("malformed file list")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}); the checkpoint cannot be verified") from None
    return files


def problems(directory: str | Path, *, hashes: bool) -> list[str]:
    """What is wrong with checkpoint `directory` compared to its manifest ([] when it verifies or
    has no manifest). Sizes always; sha256 too when `hashes`."""
    directory = Path(directory)
    try:
        files = read_manifest(directory)
    except CheckpointError as e:
        return [str(e)]
    if files is None:
        return []
    found: list[str] = []
    for name, info in files.items():
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            found.append(f"{MANIFEST} names {name!r}, outside the checkpoint")
        elif not path.is_file():
            found.append(f"{name} is missing")
        elif path.stat().st_size != info["size"]:
            found.append(f"{name} has {path.stat().st_size} bytes, the manifest says {info['size']} (truncated or replaced)")
        elif hashes and sha256_file(path) != info["sha256"]:
            found.append(f"{name} does not match its sha256 in {MANIFEST} (damaged or replaced)")
    for path in _files(directory):
        if path.relative_to(directory).as_posix() not in files:
            found.append(f"{path.relative_to(directory).as_posix()} was not written with the checkpoint (added later)")
    return found


def has_manifest(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()
