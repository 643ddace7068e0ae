"""Where documents come from: local files, the Hugging Face hub, or the built-in story generator.

`open_source(spec)` turns a `--source` value into a Source:

    builtin, builtin:MB          the built-in story generator (nanomoe.data.builtin_corpus)
    hf:NAME_OR_DIR               a dataset loaded with `datasets.load_dataset` (hub name or local folder)
    tinystories                  shorthand for hf:roneneldan/TinyStories
    owner/name                   a hub dataset, when no such local path exists
    PATH                         a .txt / .jsonl / .json / .parquet file, or a folder of them

A folder with `train/` and `valid/` (or `val/`, `validation/`) subfolders gives the two splits;
any other source has a validation split held out by `split_documents`. A source only yields
document texts; tokenizing is prepare.py's job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError
from .special_tokens import EOT

SEPARATORS = ("auto", "eot", "blank", "line")
ERRORS = ("strict", "replace")
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
VAL_DIR_NAMES = ("valid", "val", "validation")
HUB_VAL_SPLITS = ("validation", "valid", "val")
HUB_ALIASES = {"tinystories": "roneneldan/TinyStories"}
DEFAULT_BUILTIN_MB = 10.0
BUILTIN_VAL_FRACTION = 0.05  # val size of the built-in corpus, relative to train

_READ_BLOCK = 8 << 20  # text files are read in blocks of this many bytes (then cut at a newline)
_SPLITTERS = {
    "eot": re.compile(re.escape(EOT)),
    "blank": re.compile(r"\n[^\S\n]*\n\s*"),  # one or more blank (or whitespace-only) lines
    "line": re.compile(r"\n"),
}


class Source:
    """Documents of one corpus. `has_splits`: the corpus brings its own validation split."""

    description: str  # shown to the user and stored in meta.json
    has_splits: bool
    total_bytes: int | None = None  # for the progress bar; None when unknown

    def fingerprint(self) -> str:
        """Changes whenever the documents could change (used to skip work already done)."""
        raise NotImplementedError

    def raw_documents(self, split: str | None) -> Iterator[str]:
        """split "train"/"val" when has_splits, else None for the whole corpus."""
        raise NotImplementedError

    def documents(self, split: str = "train", **split_options) -> Iterator[str]:
        for _, text in split_documents(self, only=split, **split_options):
            yield text


def split_documents(
    source: Source,
    *,
    val_fraction: float = 0.05,
    train_count: int | None = None,
    val_count: int | None = None,
    seed: int = 0,
    only: str | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield (split, text) with split "train" or "val", stopping once both counts are reached.

    A source with its own splits: its first `train_count` train and `val_count` val documents.
    Otherwise every k-th document (k = round(1 / val_fraction), starting at seed % k) goes to val
    until `val_count` is reached, and the rest to train: deterministic, spread over the whole corpus,
    and the same whether or not `only` restricts what is yielded.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val fraction must be in [0, 1), got {val_fraction}")
    for name, count in (("train count", train_count), ("val count", val_count)):
        if count is not None and count < 1:
            raise DataError(f"{name} must be >= 1, got {count}")
    if only not in (None, "train", "val"):
        raise ValueError(f"only must be None, 'train' or 'val', got {only!r}")

    def full(n: int, count: int | None) -> bool:
        return count is not None and n >= count

    if source.has_splits:
        for split, count in (("train", train_count), ("val", val_count)):
            if only not in (None, split):
                continue
            n = 0
            for text in source.raw_documents(split):
                if full(n, count):
                    break
                n += 1
                yield split, text
        return

    k = max(1, round(1 / val_fraction)) if val_fraction > 0 else 0
    offset = seed % k if k else 0
    n_train = n_val = 0
    for i, text in enumerate(source.raw_documents(None)):
        if k and i % k == offset and not full(n_val, val_count):
            n_val += 1
            if only in (None, "val"):
                yield "val", text
        elif not full(n_train, train_count):
            n_train += 1
            if only in (None, "train"):
                yield "train", text
        if full(n_train, train_count) and (not k or full(n_val, val_count)):
            break


# ---------------------------------------------------------------------------------------------
# Opening a --source value


def builtin_size_mb(spec: str) -> float | None:
    """MB of built-in stories that `spec` asks for ("builtin" or "builtin:MB"); None for other specs."""
    if spec != "builtin" and not spec.startswith("builtin:"):
        return None
    size = spec.partition(":")[2]
    try:
        size_mb = float(size) if size else DEFAULT_BUILTIN_MB
    except ValueError:
        raise DataError(f"builtin source size must be a number of MB, as in builtin:10, got {spec!r}") from None
    if not size_mb > 0:
        raise DataError(f"builtin source size must be more than 0 MB, as in builtin:10, got {spec!r}")
    return size_mb


def open_source(
    spec: str | os.PathLike,
    *,
    separator: str = "auto",
    text_field: str = "text",
    errors: str = "strict",
    seed: int = 0,
) -> Source:
    if separator not in SEPARATORS:
        raise DataError(f"separator must be one of {SEPARATORS}, got {separator!r}")
    if errors not in ERRORS:
        raise DataError(f"errors must be one of {ERRORS}, got {errors!r}")
    if isinstance(spec, os.PathLike):
        return LocalSource(Path(spec), separator=separator, text_field=text_field, errors=errors)
    spec = str(spec)
    size_mb = builtin_size_mb(spec)
    if size_mb is not None:
        return BuiltinSource(size_mb=size_mb, seed=seed)
    if spec.startswith("hf:"):
        return HubSource(spec[3:], text_field=text_field)
    path = Path(spec).expanduser()
    if path.exists():
        return LocalSource(path, separator=separator, text_field=text_field, errors=errors)
    if spec.lower() in HUB_ALIASES:
        return HubSource(HUB_ALIASES[spec.lower()], text_field=text_field)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not Path(spec).suffix:
        return HubSource(spec, text_field=text_field)
    raise DataError(
        f"source {spec!r} not found: give an existing file or folder, 'builtin', 'tinystories', "
        "or a Hugging Face dataset as hf:NAME"
    )


# ---------------------------------------------------------------------------------------------
# Built-in stories


class BuiltinSource(Source):
    has_splits = True

    def __init__(self, size_mb: float = DEFAULT_BUILTIN_MB, seed: int = 0) -> None:
        if not size_mb > 0:
            raise DataError(f"builtin corpus size must be > 0 MB, got {size_mb}")
        from .builtin_corpus import GENERATOR_VERSION

        self.size_mb, self.seed, self.version = size_mb, seed, GENERATOR_VERSION
        self.description = f"builtin:{size_mb:g} (nanomoe story generator v{GENERATOR_VERSION}, seed {seed})"
        self.total_bytes = int(size_mb * 1e6 * (1 + BUILTIN_VAL_FRACTION))

    def fingerprint(self) -> str:
        return f"builtin/v{self.version}/{self.size_mb!r}/{self.seed}"

    def raw_documents(self, split: str | None) -> Iterator[str]:
        from .builtin_corpus import generate_stories

        size = self.size_mb * 1e6 * (1 if split == "train" else BUILTIN_VAL_FRACTION)
        yield from generate_stories(seed=self.seed, size_bytes=max(1, int(size)), split=split)


# ---------------------------------------------------------------------------------------------
# Local files


class LocalSource(Source):
    def __init__(self, path: Path, *, separator: str, text_field: str, errors: str) -> None:
        self.path, self.separator, self.text_field, self.errors = path, separator, text_field, errors
        if not path.exists():
            raise DataError(f"{path} not found; give an existing file or folder")
        if path.is_file():
            self.files = {None: [_check_file(path)]}
        else:
            train_dir = path / "train"
            val_dir = next((path / n for n in VAL_DIR_NAMES if (path / n).is_dir()), None)
            if train_dir.is_dir() and val_dir is not None:
                self.files = {"train": _data_files(train_dir), "val": _data_files(val_dir)}
            else:
                self.files = {None: _data_files(path)}
        self.has_splits = None not in self.files
        all_files = [f for fs in self.files.values() for f in fs]
        self.total_bytes = sum(f.stat().st_size for f in all_files)
        layout = " (train/ and val/ splits)" if self.has_splits else ""
        self.description = f"{path}{layout}: {len(all_files)} file(s), {self.total_bytes / 1e6:.1f} MB"

    def fingerprint(self) -> str:
        # size and modification time of every file, like make and rsync: cheap, and a change to
        # any file (or the set of files) changes it
        h = hashlib.sha256()
        for split, files in sorted(self.files.items(), key=lambda kv: str(kv[0])):
            for f in files:
                st = f.stat()
                h.update(f"{split}|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def raw_documents(self, split: str | None) -> Iterator[str]:
        for f in self.files[split]:
            n = 0
            for text in read_documents(f, separator=self.separator, text_field=self.text_field, errors=self.errors):
                n += 1
                yield text
            if n == 0:
                raise DataError(f"{f} holds no documents (it is empty or only whitespace); remove it or fix it")


def _check_file(path: Path) -> Path:
    if path.suffix.lower() not in FORMATS:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r}; nanomoe reads {', '.join(FORMATS)}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; remove it or give a file with text")
    return path


def _data_files(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in FORMATS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)  # hidden files and folders
    )
    if not files:
        raise DataError(f"{folder} holds no {', '.join(FORMATS)} files")
    return [_check_file(f) for f in files]


def read_documents(path: Path, *, separator: str = "auto", text_field: str = "text",
                   errors: str = "strict") -> Iterator[str]:
    """Documents of one file, stripped of surrounding whitespace, empty ones skipped."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt == "txt":
        yield from _read_txt(path, separator, errors)
    elif fmt == "jsonl":
        yield from _read_jsonl(path, text_field, errors)
    elif fmt == "json":
        yield from _read_json(path, text_field, errors)
    elif fmt == "parquet":
        yield from _read_parquet(path, text_field)
    else:
        _check_file(path)


def _decode(data: bytes, path: Path, offset: int, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: invalid UTF-8 at byte offset {offset + e.start} ({data[e.start:e.start + 4]!r}); "
            "fix the file, or pass --errors replace to turn bad bytes into U+FFFD"
        ) from None


def _read_txt(path: Path, separator: str, errors: str) -> Iterator[str]:
    # "auto": <|endoftext|> separators if the first block holds one, else blank lines
    splitter = None if separator == "auto" else _SPLITTERS[separator]
    pending = ""
    for text in _text_blocks(path, errors):
        if splitter is None:
            splitter = _SPLITTERS["eot" if EOT in text else "blank"]
        parts = splitter.split(pending + text)
        pending = parts.pop()  # the last part may continue in the next block
        for part in parts:
            part = part.strip()
            if part:
                yield part
    pending = pending.strip()
    if pending:
        yield pending


def _text_blocks(path: Path, errors: str) -> Iterator[str]:
    """The file's text in blocks of about _READ_BLOCK bytes, each cut just after a newline.

    A newline byte never occurs inside a multi-byte UTF-8 character, so each block decodes on its
    own and the byte offset in an error message is exact.
    """
    offset = 0
    carry = b""
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            data = carry + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no newline yet: keep reading
                carry = data
                continue
            data, carry = data[:cut], data[cut:]
            text = _decode(data, path, offset, errors)
            yield text[1:] if offset == 0 and text.startswith("\ufeff") else text  # drop a byte order mark
            offset += len(data)
    if carry:
        text = _decode(carry, path, offset, errors)
        yield text[1:] if offset == 0 and text.startswith("\ufeff") else text


def _read_jsonl(path: Path, field: str, errors: str) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, offset, errors).strip()
            offset += len(raw)
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            text = _text_of(record, field, f"{path}:{lineno}")
            if text:
                yield text


def _read_json(path: Path, field: str, errors: str) -> Iterator[str]:
    text = _decode(path.read_bytes(), path, 0, errors)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values, one per line: JSON lines named .json
            yield from _read_jsonl(path, field, errors)
            return
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get(field), list):
        data = data[field]  # {"text": ["doc", ...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects with a {field!r} field (or of strings)")
    for i, record in enumerate(data):
        doc = record.strip() if isinstance(record, str) else _text_of(record, field, f"{path}: item {i}")
        if doc:
            yield doc


def _text_of(record, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        raise DataError(
            f"{where}: no {field!r} field (fields: {', '.join(map(str, record)) or 'none'}); "
            "pass --text-field NAME to read another field"
        )
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
    return text.strip()


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError variants
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: no {field!r} column (columns: {', '.join(names)}); pass --text-field NAME")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=8192):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise DataError(f"{path}: row {row} has no text in column {field!r} (got {text!r})")
            row += 1
            text = text.strip()
            if text:
                yield text


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (the hub, or a local folder in the same layout)


class HubSource(Source):
    def __init__(self, name: str, *, text_field: str = "text", cache_dir: str | None = None) -> None:
        import datasets

        self.name, self.text_field = name, text_field
        try:
            loaded = datasets.load_dataset(name, cache_dir=cache_dir)
        except (ConnectionError, OSError) as e:
            raise DataError(
                f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "on an offline machine, copy the text here and prepare it (nanomoe prepare --source FOLDER --out "
                "DATA_DIR, then train with --data DATA_DIR), or use the built-in stories (prepare --source builtin, "
                "train --data builtin)"
            ) from None
        except Exception as e:  # datasets raises many kinds: DatasetNotFoundError, ValueError...
            raise DataError(f"could not load dataset {name!r}: {type(e).__name__}: {e}") from None
        if not isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.DatasetDict({"train": loaded})
        if "train" not in loaded:
            raise DataError(f"dataset {name!r} has no train split (splits: {', '.join(loaded)})")
        val_name = next((s for s in HUB_VAL_SPLITS if s in loaded), None)
        self.splits = {"train": loaded["train"]}
        if val_name is not None:
            self.splits["val"] = loaded[val_name]
        self.has_splits = val_name is not None
        for split, ds in self.splits.items():
            if text_field not in ds.column_names:
                raise DataError(
                    f"dataset {name!r} split {split!r} has no {text_field!r} column "
                    f"(columns: {', '.join(ds.column_names)}); pass --text-field NAME"
                )
        rows = ", ".join(f"{s} {len(ds):,} rows" for s, ds in self.splits.items())
        self.description = f"hf:{name} ({rows})"

    def fingerprint(self) -> str:
        # datasets fingerprints each split from its cached files
        parts = [f"{s}:{getattr(ds, '_fingerprint', '')}:{len(ds)}" for s, ds in sorted(self.splits.items())]
        return f"hf:{self.name}:" + ",".join(parts)

    def raw_documents(self, split: str | None) -> Iterator[str]:
        ds = self.splits["train" if split is None else split].select_columns([self.text_field])
        row = 0
        for batch in ds.iter(batch_size=4096):
            for text in batch[self.text_field]:
                if not isinstance(text, str):
                    raise DataError(f"hf:{self.name} {split or 'train'} row {row}: no text (got {text!r})")
                row += 1
                text = text.strip()
                if text:
                    yield text
