"""`prepare_data`: documents in, token files out.

A data dir holds

    train.bin, val.bin              token ids, uint16 (uint32 when the vocab has > 65536 tokens); every
                                    document is followed by <|endoftext|>: doc0 EOT doc1 EOT ... docN EOT
    train.docs.npy, val.docs.npy    int64 offset of the first token of every document (documents mode)
    tokenizer.json                  the tokenizer that made them
    meta.json                       counts, hashes and sizes; written last

meta.json is the commit marker: a data dir is trusted only when meta.json exists and every file has
the size it records. A run writes everything to hidden temporary files first and, only once all of
them are complete, removes the old meta.json, renames the files into place and writes the new
meta.json. So an interrupted or failed run never leaves a data dir that a later run or the trainer
would trust, and a failed re-run leaves the previous data untouched.

A run whose inputs (source fingerprint, tokenizer or tokenizer recipe, options) match the recorded
`inputs_key` returns at once.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic_io import TMP_MARK, fsync_dir, fsync_file, temporary_path, write_json_atomic
from ..errors import DataError
from .sources import DEFAULT_BUILTIN_MB, Source, open_source, split_documents
from .tokenizer import Tokenizer, check_vocab_size, load_tokenizer, train_bpe_tokenizer, train_word_tokenizer

FORMAT = "nanomoe-data"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
META = "meta.json"
LOCK = ".prepare.lock"
TOKENIZER = "tokenizer.json"
CHUNK_CHARS = 2_000_000  # documents are encoded in chunks of about this many characters
MAX_PIECE_CHARS = 100_000  # longer documents are tokenized in pieces cut at spaces (`pieces`)


@dataclass
class PrepareResult:
    data_dir: Path
    meta: dict
    skipped: bool  # True when the data dir was already up to date
    seconds: float
    source_bytes: int  # UTF-8 bytes of all documents encoded (0 when skipped)
    tokenizer_seconds: float = 0.0  # of `seconds`, spent training the tokenizer

    @property
    def mb_per_s(self) -> float:
        return self.source_bytes / 1e6 / max(self.seconds, 1e-9)


def prepare_data(source: str | os.PathLike | Source, out_dir: str | os.PathLike, **options) -> Path:
    """Tokenize `source` into `out_dir` (options: see `run_prepare`); returns the data dir."""
    return run_prepare(source, out_dir, **options).data_dir


def run_prepare(
    source: str | os.PathLike | Source,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    vocab_size: int = 2048,
    tokenizer_kind: str = "bpe",
    train_count: int | None = None,
    val_count: int | None = None,
    val_fraction: float = 0.05,
    separator: str = "auto",
    text_field: str = "text",
    errors: str = "strict",
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    workers: int | None = None,
) -> PrepareResult:
    """Tokenize `source` into `out_dir`, training a tokenizer on the train split when none is given.

    source: anything `open_source` accepts (a path, "builtin", "hf:NAME", ...) or a Source.
    tokenizer: a tokenizer file or object; None trains a `tokenizer_kind` one with `vocab_size` tokens.
    train_count, val_count: keep only this many documents of each split.
    val_fraction: share of documents held out for val when the source has no val split of its own.
    separator: how .txt files separate documents: "auto", "eot", "blank" or "line".
    overwrite: replace a data dir that holds data from a different tokenizer (else an error).
    workers: processes for the word tokenizer (BPE always uses every core through `tokenizers`).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    src = source if isinstance(source, Source) else open_source(
        source, separator=separator, text_field=text_field, errors=errors, seed=seed
    )
    split_options = dict(val_fraction=val_fraction, train_count=train_count, val_count=val_count, seed=seed)
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is None:
        check_vocab_size(vocab_size, tokenizer_kind)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder for the data")
    source_dir = getattr(src, "path", None)
    if source_dir is not None and source_dir.is_dir() and out.resolve().is_relative_to(source_dir.resolve()):
        # its meta.json and tokenizer.json would be read back as data by the next run
        raise DataError(f"--out {out} is inside the source folder {source_dir}; write the data dir elsewhere")

    recipe = dict(
        format_version=FORMAT_VERSION,
        source=src.fingerprint(),
        tokenizer=tokenizer.sha256 if tokenizer else dict(train=tokenizer_kind, vocab_size=vocab_size),
        split=dict(split_options, val_fraction=None if src.has_splits else val_fraction),
        separator=separator,
        text_field=text_field,
        errors=errors,
    )
    inputs_key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare_locked(src, out, tokenizer, tokenizer_kind, vocab_size, split_options, inputs_key, separator,
                               text_field, errors, progress, overwrite, workers, t0)
    except BaseException:
        if created:  # a failed first run leaves no folder behind (it holds at most the lock file now)
            (out / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _prepare_locked(src, out, tokenizer, tokenizer_kind, vocab_size, split_options, inputs_key, separator,
                    text_field, errors, progress, overwrite, workers, t0) -> PrepareResult:
    val_fraction = split_options["val_fraction"]
    with _locked(out):  # two processes preparing the same dir (e.g. several ranks) take turns
        existing = _trusted_meta(out)
        if existing is not None and existing.get("inputs_key") == inputs_key:
            return PrepareResult(out, existing, skipped=True, seconds=time.perf_counter() - t0, source_bytes=0)
        if existing is not None and tokenizer is not None:
            _check_same_tokenizer(out, existing, tokenizer, overwrite)
        _remove_temporaries(out)

        tokenizer_seconds = 0.0
        if tokenizer is None:
            t_train = time.perf_counter()
            seen = [0]

            def texts():
                for _, text in split_documents(src, only="train", **split_options):
                    seen[0] += 1
                    yield from pieces(text)

            try:
                if tokenizer_kind == "bpe":
                    # the Rust progress bars only render well on a terminal
                    tokenizer = train_bpe_tokenizer(texts(), vocab_size,
                                                    show_progress=progress and sys.stderr.isatty())
                else:
                    tokenizer = train_word_tokenizer(texts(), vocab_size)
            except DataError:
                if seen[0] == 0:  # every document went to validation: say so, not "no documents"
                    raise DataError(_empty_split_message("train", src, val_fraction)) from None
                raise
            tokenizer_seconds = time.perf_counter() - t_train
            if existing is not None:
                _check_same_tokenizer(out, existing, tokenizer, overwrite)

        dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
        tmp = {name: temporary_path(out / name) for name in _file_names()}
        try:
            stats = _encode_source(src, split_options, tokenizer, dtype, tmp, progress, workers)
            for split in SPLITS:
                if stats[split]["documents"] == 0:
                    raise DataError(_empty_split_message(split, src, val_fraction))
            tokenizer.save(tmp[TOKENIZER])
            meta = _make_meta(src, tokenizer, dtype, stats, inputs_key, split_options, separator, text_field,
                              errors, {name: tmp[name].stat().st_size for name in tmp}, time.perf_counter() - t0)
            # commit: untrust the old data, move the new files in, then write the marker
            (out / META).unlink(missing_ok=True)
            for name, path in tmp.items():
                fsync_file(path)
                os.replace(path, out / name)
            fsync_dir(out)  # the renames reach the disk before meta.json vouches for them
            write_json_atomic(out / META, meta)
        finally:
            for path in tmp.values():
                path.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return PrepareResult(out, meta, skipped=False, seconds=seconds,
                         source_bytes=sum(stats[s]["bytes"] for s in SPLITS), tokenizer_seconds=tokenizer_seconds)


# ---------------------------------------------------------------------------------------------
# Encoding


def _file_names() -> list[str]:
    return [f"{s}.bin" for s in SPLITS] + [f"{s}.docs.npy" for s in SPLITS] + [TOKENIZER]


def _chunks(src: Source, split_options: dict) -> Iterator[tuple[str, list[str], int]]:
    """(split, texts, utf-8 bytes) in chunks of about CHUNK_CHARS characters, in corpus order per split."""
    buffers: dict[str, list[str]] = {s: [] for s in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    for split, text in split_documents(src, **split_options):
        buffers[split].append(text)
        chars[split] += len(text)
        if chars[split] >= CHUNK_CHARS:
            yield split, buffers[split], _utf8_bytes(buffers[split])
            buffers[split], chars[split] = [], 0
    for split in SPLITS:
        if buffers[split]:
            yield split, buffers[split], _utf8_bytes(buffers[split])


def _utf8_bytes(texts: list[str]) -> int:
    # isascii() is O(1) on CPython strings, and most text is ASCII
    return sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)


def _encode_source(src, split_options, tokenizer, dtype, tmp, progress, workers) -> dict[str, dict]:
    from tqdm.auto import tqdm

    stats = {s: dict(tokens=0, documents=0, bytes=0) for s in SPLITS}
    doc_starts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    bar = tqdm(total=src.total_bytes, unit="B", unit_scale=True, desc="encode", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    with open(tmp["train.bin"], "wb") as train_file, open(tmp["val.bin"], "wb") as val_file, bar:
        files = {"train": train_file, "val": val_file}
        for split, tokens, lengths, n_bytes in _encoded(tokenizer, dtype, _chunks(src, split_options), workers):
            s = stats[split]
            doc_starts[split].append(s["tokens"] + np.cumsum(lengths) - lengths)
            tokens.tofile(files[split])
            s["tokens"] += len(tokens)
            s["documents"] += len(lengths)
            s["bytes"] += n_bytes
            bar.update(n_bytes)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    for split in SPLITS:
        starts = np.concatenate(doc_starts[split]) if doc_starts[split] else np.zeros(0, np.int64)
        with open(tmp[f"{split}.docs.npy"], "wb") as f:
            np.save(f, starts.astype(np.int64), allow_pickle=False)
        lengths = np.diff(np.append(starts, stats[split]["tokens"]))
        stats[split]["max_document_tokens"] = int(lengths.max()) if len(lengths) else 0
    return stats


def pieces(text: str, limit: int = MAX_PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most `limit` characters, each cut just before a space so a
    word and the space in front of it stay together (byte-level BPE sees the same words)."""
    if len(text) <= limit:
        return [text]
    out, start = [], 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + limit // 2, start + limit)
        if cut <= start:  # no space in sight: a hard cut
            cut = start + limit
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _encode_and_pack(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of `texts` with EOT after each document, and each document's length (its EOT included).
    Long documents are encoded in pieces: the tokenizer's working memory is ~100x the text it holds."""
    if any(len(t) > MAX_PIECE_CHARS for t in texts):
        return _encode_long(tokenizer, texts, dtype)
    ids_lists = tokenizer.encode_batch(texts)
    lengths = np.fromiter(map(len, ids_lists), dtype=np.int64, count=len(ids_lists)) + 1
    eot = tokenizer.eot_id
    for ids in ids_lists:
        ids.append(eot)
    tokens = np.fromiter(itertools.chain.from_iterable(ids_lists), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


def _encode_long(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """`_encode_and_pack` for texts holding a long document: its pieces are encoded a few at a time
    and kept as compact arrays, so memory stays bounded however long the document."""
    per_doc: list[list[np.ndarray]] = [[] for _ in texts]
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    group: list[tuple[int, str]] = []

    def flush() -> None:
        for (i, _), ids in zip(group, tokenizer.encode_batch([piece for _, piece in group])):
            per_doc[i].append(np.asarray(ids, dtype=dtype))
        group.clear()

    chars = 0
    for i, text in enumerate(texts):
        for piece in pieces(text):
            group.append((i, piece))
            chars += len(piece)
            if chars >= MAX_PIECE_CHARS:
                flush()
                chars = 0
    flush()
    docs = [np.concatenate(arrays + [eot]) for arrays in per_doc]
    return np.concatenate(docs), np.array([len(d) for d in docs], dtype=np.int64)


def _encoded(tokenizer: Tokenizer, dtype: np.dtype, chunks, workers: int | None):
    """(split, tokens, lengths, n_bytes) for each chunk, in order."""
    import concurrent.futures as cf

    if tokenizer.kind == "bpe":
        # `tokenizers` spreads each batch over all cores and releases the GIL meanwhile: encode the
        # next chunk in a thread while this one is read and written
        pool = cf.ThreadPoolExecutor(1)
        submit = lambda texts: pool.submit(_encode_and_pack, tokenizer, texts, dtype)  # noqa: E731
        in_flight = 1
    else:
        workers = workers or os.cpu_count() or 1
        if workers == 1:
            for split, texts, n_bytes in chunks:
                yield split, *_encode_and_pack(tokenizer, texts, dtype), n_bytes
            return
        # the word tokenizer is pure Python: one process per core; they send back compact arrays
        import multiprocessing as mp

        context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                      initargs=(tokenizer.to_json_str(),))
        submit = lambda texts: pool.submit(_worker_encode, texts, dtype.str)  # noqa: E731
        in_flight = 2 * workers
    try:
        pending = []
        for split, texts, n_bytes in chunks:
            pending.append((split, submit(texts), n_bytes))
            if len(pending) > in_flight:
                split0, future, bytes0 = pending.pop(0)
                yield split0, *future.result(), bytes0
        for split0, future, bytes0 in pending:
            yield split0, *future.result(), bytes0
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, drop the chunks not started yet


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_json_str(tokenizer_json)


def _worker_encode(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return _encode_and_pack(_worker_tokenizer, texts, np.dtype(dtype))


# ---------------------------------------------------------------------------------------------
# meta.json


def _make_meta(src, tokenizer, dtype, stats, inputs_key, split_options, separator, text_field, errors,
               file_sizes, seconds) -> dict:
    from .. import __version__

    splits = {}
    for split in SPLITS:
        s = stats[split]
        splits[split] = dict(
            tokens=s["tokens"],
            documents=s["documents"],
            bytes=s["bytes"],
            bytes_per_token=s["bytes"] / s["tokens"],
            mean_document_tokens=s["tokens"] / s["documents"],
            max_document_tokens=s["max_document_tokens"],
            file=f"{split}.bin",
            docs_file=f"{split}.docs.npy",
        )
    total_bytes = sum(s["bytes"] for s in stats.values())
    total_tokens = sum(s["tokens"] for s in stats.values())
    return dict(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        source=src.description,
        inputs_key=inputs_key,
        tokenizer_file=TOKENIZER,
        tokenizer_sha256=tokenizer.sha256,
        tokenizer_kind=tokenizer.kind,
        vocab_size=tokenizer.vocab_size,
        eot_id=tokenizer.eot_id,
        special_tokens=tokenizer.special_tokens,
        dtype=dtype.name,
        splits=splits,
        bytes_per_token=total_bytes / total_tokens,
        files=file_sizes,
        options=dict(split_options, separator=separator, text_field=text_field, errors=errors,
                     has_own_val_split=src.has_splits),
        seconds=round(seconds, 3),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        nanomoe_version=__version__,
    )


def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a complete, unmodified data dir, else a DataError that says what to run."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"data dir {data_dir} not found; create it with `nanomoe prepare --source ... --out {data_dir}`"
        )
    path = data_dir / META
    if not path.is_file():
        raise DataError(
            f"{data_dir} has no {META}: it is not a prepared data dir, or a prepare was interrupted; "
            f"run `nanomoe prepare --out {data_dir} ...` (again)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupt ({e}); run `nanomoe prepare` again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a nanomoe data meta.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{data_dir} was prepared in data format {meta.get('format_version')}, this nanomoe reads "
            f"{FORMAT_VERSION}; run `nanomoe prepare` again"
        )
    try:
        for name, size in meta["files"].items():
            f = data_dir / name
            if not f.is_file() or f.stat().st_size != size:
                raise DataError(
                    f"{f} is missing or has a different size than {META} records: the data dir is incomplete "
                    "or was modified; run `nanomoe prepare` again"
                )
        with open(data_dir / meta["tokenizer_file"], "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != meta["tokenizer_sha256"]:
                raise DataError(f"{f.name} does not match {META}; run `nanomoe prepare` again")
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} lacks field {e}; it is damaged: run `nanomoe prepare` again") from None
    return meta


def load_data_tokenizer(data_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer a data dir was prepared with."""
    meta = read_meta(data_dir)
    return load_tokenizer(Path(data_dir) / meta["tokenizer_file"])


def check_compatible(data_dir: str | os.PathLike, *, tokenizer: Tokenizer | None = None,
                     vocab_size: int | None = None) -> dict:
    """Raise DataError unless the data was made by `tokenizer` and fits a model with `vocab_size`."""
    meta = read_meta(data_dir)
    if tokenizer is not None and tokenizer.sha256 != meta["tokenizer_sha256"]:
        raise DataError(
            f"{data_dir} was prepared with a different tokenizer (sha256 {meta['tokenizer_sha256'][:12]}, "
            f"vocab {meta['vocab_size']}) than this one (sha256 {tokenizer.sha256[:12]}, vocab "
            f"{tokenizer.vocab_size}); use the data dir's tokenizer.json, or prepare the data with this tokenizer"
        )
    if vocab_size is not None and vocab_size < meta["vocab_size"]:
        raise DataError(
            f"{data_dir} has token ids up to {meta['vocab_size'] - 1} but the model's vocab_size is {vocab_size}; "
            f"use --set vocab_size={meta['vocab_size']} or more, or prepare the data with a smaller tokenizer"
        )
    return meta


def _trusted_meta(data_dir: Path) -> dict | None:
    try:
        return read_meta(data_dir)
    except (DataError, OSError):
        return None


def _check_same_tokenizer(out: Path, existing: dict, tokenizer: Tokenizer, overwrite: bool) -> None:
    if overwrite or existing["tokenizer_sha256"] == tokenizer.sha256:
        return
    raise DataError(
        f"{out} already holds data from a different tokenizer (sha256 {existing['tokenizer_sha256'][:12]}, "
        f"vocab {existing['vocab_size']}; this one: sha256 {tokenizer.sha256[:12]}, vocab {tokenizer.vocab_size}); "
        f"choose another --out, pass --overwrite to replace it, or --tokenizer {out / TOKENIZER} to reuse its tokenizer"
    )


def _empty_split_message(split: str, src: Source, val_fraction: float) -> str:
    if split == "val" and not src.has_splits:
        return (
            f"the validation split is empty: {src.description} has too few documents for val fraction "
            f"{val_fraction}; raise --val-fraction, or give a folder with train/ and valid/ subfolders"
        )
    if split == "train" and not src.has_splits:
        return (
            f"the train split is empty: {src.description} has too few documents to hold out a validation split "
            f"(val fraction {val_fraction}) and still train on something; give more documents (at least 2), or a "
            "folder with train/ and valid/ subfolders"
        )
    return f"the {split} split of {src.description} holds no documents"


def _remove_temporaries(out: Path) -> None:
    """Leftovers of killed runs (never trusted, since meta.json does not list them)."""
    for path in out.glob(f".*{TMP_MARK}*"):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(out: Path):
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent prepares of one dir are not supported
        yield
        return
    with open(out / LOCK, "a") as f:  # "a": never truncates, so a skipped run changes nothing
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# The built-in corpus, prepared once per machine


def cache_root() -> Path:
    """$NANOMOE_CACHE, else ~/.cache/nanomoe."""
    return Path(os.environ.get("NANOMOE_CACHE") or Path.home() / ".cache" / "nanomoe").expanduser()


def builtin_corpus_dir(
    cache_dir: str | os.PathLike | None = None,
    size_mb: float = DEFAULT_BUILTIN_MB,
    seed: int = 0,
    *,
    vocab_size: int = 2048,
    progress: bool = False,
) -> Path:
    """A data dir of the built-in stories with a BPE tokenizer, made on first use and reused after.

    Safe to call from several processes at once (e.g. every rank): they wait on a lock and all but
    the first find the data ready.
    """
    from .builtin_corpus import GENERATOR_VERSION

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / f"builtin-v{GENERATOR_VERSION}-{size_mb:g}mb-seed{seed}-bpe{vocab_size}"
    return prepare_data(f"builtin:{size_mb:g}", out, vocab_size=vocab_size, seed=seed, progress=progress)
