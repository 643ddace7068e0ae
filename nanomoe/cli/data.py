"""`nanomoe tokenizer ...` and `nanomoe prepare`: text in, tokenizer and token files out."""

from __future__ import annotations

import argparse
import itertools
import json

from ..checked import arg
from . import add_command

SOURCE_HELP = (
    "'builtin' or 'builtin:MB' (generated stories), a .txt/.jsonl/.json/.parquet file or a folder of them "
    "(train/ + valid/ subfolders are used as the splits), 'tinystories' or hf:NAME (Hugging Face datasets)"
)


def _add_reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--separator", default="auto", choices=["auto", "eot", "blank", "line"],
                   help="how .txt files separate documents: <|endoftext|> lines (eot), blank lines, every line, "
                        "or auto (eot if the file has any, else blank) [auto]")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.json/.parquet [text]")
    p.add_argument("--errors", default="strict", choices=["strict", "replace"],
                   help="non-UTF-8 bytes: stop with an error (strict) or replace them with U+FFFD [strict]")


def cmd_tokenizer(args) -> int:
    """Train and inspect tokenizers (byte-level BPE, or word level with character fallback).

    Examples:
      nanomoe tokenizer train --input data/stories.txt --vocab-size 2048 --out tokenizer.json
      nanomoe tokenizer info tokenizer.json
      nanomoe tokenizer encode --tokenizer tokenizer.json "Once upon a time"
    """
    args._parser.print_help()
    return 2


def cmd_tokenizer_train(args) -> int:
    """Train a tokenizer on the train split of one or more sources and save it as JSON.

    The special tokens <|endoftext|>, <|unknown|>, <|im_start|>, <|im_end|> get ids 0..3.
    BPE is byte level: it encodes any text and decode(encode(x)) == x.

    Examples:
      nanomoe tokenizer train --input ../shared/data/tinystories --out tokenizer.json
      nanomoe tokenizer train --input stories.jsonl --kind word --vocab-size 4096 --out word.json
    """
    from ..data.sources import open_source
    from ..data.tokenizer import train_bpe_tokenizer, train_word_tokenizer

    sources = [open_source(spec, separator=args.separator, text_field=args.text_field, errors=args.errors,
                           seed=args.seed) for spec in args.input]
    texts = itertools.chain.from_iterable(s.documents("train", seed=args.seed) for s in sources)
    if args.kind == "bpe":
        tok = train_bpe_tokenizer(texts, args.vocab_size, show_progress=not args.no_progress)
    else:
        tok = train_word_tokenizer(texts, args.vocab_size)
    path = tok.save(args.out)
    print(f"saved {tok.kind} tokenizer to {path}: vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}")
    if tok.vocab_size < args.vocab_size:
        print(f"note: the input has too few distinct words for {args.vocab_size} tokens")
    return 0


def cmd_tokenizer_info(args) -> int:
    """Show a tokenizer's kind, vocab size, special tokens and hash (PATH: a tokenizer.json or a data dir)."""
    from ..data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.path)
    info = dict(kind=tok.kind, vocab_size=tok.vocab_size, special_tokens=tok.special_tokens, sha256=tok.sha256)
    print(json.dumps(info, indent=2))
    return 0


def cmd_tokenizer_encode(args) -> int:
    """Show how a text is split into tokens."""
    from ..data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text)
    print(f"{len(ids)} tokens for {len(args.text.encode('utf-8'))} bytes")
    print(" ".join(f"{tok.decode([i])!r}:{i}" for i in ids))
    return 0


def cmd_prepare(args) -> int:
    """Tokenize a corpus into train.bin / val.bin (+ meta.json) for training.

    Trains a tokenizer on the train split unless --tokenizer is given, encodes on all cores, and writes
    every file atomically: an interrupted run leaves nothing that looks complete. Re-running with the
    same inputs does nothing.

    Examples:
      nanomoe prepare --source builtin --out data/stories
      nanomoe prepare --source ../shared/data/tinystories --out data/tinystories --vocab-size 2048
      nanomoe prepare --source tinystories --out data/ts --train-count 100000 --val-count 5000
      nanomoe prepare --source stories.jsonl --out data/mine --tokenizer data/tinystories/tokenizer.json
    """
    from ..data.prepare import run_prepare
    from ..errors import DataError

    if args.tokenizer is not None and args.vocab_size is not None:
        raise DataError("pass either --tokenizer (use that tokenizer) or --vocab-size (train one), not both")
    result = run_prepare(
        args.source,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=2048 if args.vocab_size is None else args.vocab_size,
        tokenizer_kind=args.kind,
        train_count=args.train_count,
        val_count=args.val_count,
        val_fraction=args.val_fraction,
        separator=args.separator,
        text_field=args.text_field,
        errors=args.errors,
        seed=args.seed,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        workers=args.workers,
    )
    meta = result.meta
    if args.json:
        print(json.dumps(dict(data_dir=str(result.data_dir), skipped=result.skipped, seconds=result.seconds,
                              tokenizer_seconds=result.tokenizer_seconds, mb_per_s=result.mb_per_s, meta=meta),
                         indent=2))
        return 0
    if result.skipped:
        print(f"{result.data_dir} is up to date (same source, tokenizer and options); nothing to do")
    else:
        trained = ""
        if result.tokenizer_seconds:
            trained = f", of which {result.tokenizer_seconds:.2f} s training the tokenizer"
        print(f"prepared {result.data_dir} in {result.seconds:.2f} s{trained}: "
              f"{result.source_bytes / 1e6:.1f} MB of text at {result.mb_per_s:.1f} MB/s")
    print(f"  source     {meta['source']}")
    print(f"  tokenizer  {meta['tokenizer_kind']}, vocab {meta['vocab_size']}, sha256 {meta['tokenizer_sha256'][:12]}, "
          f"{meta['dtype']} tokens")
    for split, s in meta["splits"].items():
        print(f"  {split:5s}      {s['tokens']:>12,} tokens  {s['documents']:>9,} documents  "
              f"{s['bytes'] / 1e6:8.2f} MB  {s['bytes_per_token']:.3f} bytes/token  "
              f"longest document {s['max_document_tokens']:,} tokens")
    return 0


def register(subparsers) -> None:
    tok = add_command(subparsers, "tokenizer", cmd_tokenizer)
    tok.set_defaults(_parser=tok)
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="COMMAND")

    p = add_command(tok_sub, "train", cmd_tokenizer_train)
    p.add_argument("--input", nargs="+", required=True, metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    p.add_argument("--vocab-size", type=arg(int, "--vocab-size", minimum=1), default=2048, help="tokens, special tokens included [2048]")
    p.add_argument("--kind", default="bpe", choices=["bpe", "word"], help="byte-level BPE or word level [bpe]")
    p.add_argument("--seed", type=arg(int, "--seed", minimum=0), default=0, help="which documents are held out for val [0]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_reading_options(p)

    p = add_command(tok_sub, "info", cmd_tokenizer_info)
    p.add_argument("path", help="tokenizer.json, or a data dir")

    p = add_command(tok_sub, "encode", cmd_tokenizer_encode)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, or a data dir")
    p.add_argument("text")

    p = add_command(subparsers, "prepare", cmd_prepare)
    p.add_argument("--source", required=True, help=SOURCE_HELP)
    p.add_argument("--out", required=True, help="data dir to write")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer.json instead of training one")
    p.add_argument("--vocab-size", type=arg(int, "--vocab-size", minimum=1), default=None, help="vocab of the tokenizer to train [2048]")
    p.add_argument("--kind", default="bpe", choices=["bpe", "word"], help="kind of tokenizer to train [bpe]")
    p.add_argument("--train-count", type=arg(int, "--train-count", minimum=1), default=None, help="keep only the first N train documents")
    p.add_argument("--val-count", type=arg(int, "--val-count", minimum=1), default=None, help="keep only the first N val documents")
    p.add_argument("--val-fraction", type=arg(float, "--val-fraction", minimum=0, maximum=1), default=0.05,
                   help="share held out for val when the source has no val split [0.05]")
    p.add_argument("--seed", type=arg(int, "--seed", minimum=0), default=0, help="built-in corpus seed; which documents are held out [0]")
    p.add_argument("--overwrite", action="store_true", help="replace data made with a different tokenizer")
    p.add_argument("--workers", type=arg(int, "--workers", minimum=1), default=None, help="processes for the word tokenizer [all cores]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_reading_options(p)
