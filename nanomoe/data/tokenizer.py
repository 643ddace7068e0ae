"""Tokenizers: byte-level BPE (Hugging Face `tokenizers`) and a simple word-level one, one interface.

Both have the same four special tokens, in this order, with ids 0..3 when trained here:

    <|endoftext|>  separates documents in the token files (and starts generation)
    <|unknown|>    word tokenizer: a character never seen in training (BPE never needs it)
    <|im_start|>   chat turns, for fine-tuning later
    <|im_end|>

BPE works on bytes, so decode(encode(text)) == text for any Unicode text. The word tokenizer keeps
whole frequent words (with their leading space) and falls back to single characters, then to
<|unknown|> for characters it never saw.

A tokenizer serializes to one JSON string (`to_json_str`), which is also what `save` writes and what
checkpoints embed; `sha256` is the hash of that string, so equal hashes mean equal tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..atomic_io import write_text_atomic
from ..errors import DataError
from .sources import open_source
from .special_tokens import EOT, SPECIAL_TOKENS, UNKNOWN

N_BYTES = 256  # a byte-level BPE always holds one token per byte
MIN_BPE_VOCAB = N_BYTES + len(SPECIAL_TOKENS)
WORD_FORMAT = "nanomoe-word-tokenizer"


class Tokenizer:
    """The interface every tokenizer implements (see BPETokenizer and WordTokenizer)."""

    kind: str  # "bpe" | "word"
    vocab_size: int
    special_tokens: dict[str, int]  # the SPECIAL_TOKENS this tokenizer has, by id

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_json_str(self) -> str:
        raise NotImplementedError

    @property
    def eot_id(self) -> int:
        return self.special_tokens[EOT]

    @property
    def sha256(self) -> str:
        if getattr(self, "_sha256", None) is None:
            self._sha256 = hashlib.sha256(self.to_json_str().encode("utf-8")).hexdigest()
        return self._sha256

    def save(self, path: str | Path) -> Path:
        """Write `to_json_str()` to `path` atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, self.to_json_str())
        return path

    @staticmethod
    def from_json_str(text: str) -> Tokenizer:
        return tokenizer_from_json_str(text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


# ---------------------------------------------------------------------------------------------
# Byte-level BPE


class BPETokenizer(Tokenizer):
    """Byte-level BPE; `.hf` is the underlying `tokenizers.Tokenizer` (for Hugging Face export)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        self._json = hf_tokenizer.to_str()
        self._sha256 = None
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        ids = {tok: hf_tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
        self.special_tokens = {tok: i for tok, i in ids.items() if i is not None}
        if EOT not in self.special_tokens:
            raise DataError(
                f"this tokenizer has no {EOT} token, which nanomoe needs to separate documents; "
                "train one with `nanomoe tokenizer train`"
            )
        # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets we never use
        self._encode_batch = getattr(hf_tokenizer, "encode_batch_fast", hf_tokenizer.encode_batch)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # runs on all cores (Rust threads, without the GIL)
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def to_json_str(self) -> str:
        return self._json


def train_bpe_tokenizer(
    texts_or_paths: Iterable[str | os.PathLike] | os.PathLike,
    vocab_size: int = 2048,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> BPETokenizer:
    """Train a byte-level BPE with the four special tokens at ids 0..3.

    `texts_or_paths` holds texts (`str`, each one a document) or files/folders (`pathlib.Path`,
    read like `nanomoe prepare --source`, train split only). The vocabulary can come out smaller
    than `vocab_size` when the text has fewer distinct words than that.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size, "bpe")
    hf = HFTokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x; the GPT-2 regex splits words, numbers, spaces
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so nothing is ever unknown
        show_progress=show_progress,
    )
    counter = _CountingIterator(_training_texts(texts_or_paths))
    hf.train_from_iterator(counter, trainer)
    if counter.n == 0:
        raise DataError("no text to train the tokenizer on: the input holds no documents")
    return BPETokenizer(hf)


# ---------------------------------------------------------------------------------------------
# Word level with character fallback

# Every character of a text lands in exactly one piece, so joining the pieces gives the text back:
# a word or number with its leading space, a run of punctuation with its leading space, one space char.
WORD_PIECE_RE = re.compile(r" ?\w+| ?[^\w\s]+|\s")


class WordTokenizer(Tokenizer):
    """Whole frequent words, else single characters, else <|unknown|>.

    Vocabulary layout: the special tokens, then characters (most frequent first), then multi-character
    pieces (most frequent first). Decoding joins the pieces, so decode(encode(x)) == x whenever every
    character of x was seen in training.
    """

    kind = "word"

    def __init__(self, vocab: list[str], special_tokens: Iterable[str] = SPECIAL_TOKENS) -> None:
        self.vocab = list(vocab)
        self._sha256 = None
        self.vocab_size = len(self.vocab)
        self.token_to_id = {tok: i for i, tok in enumerate(self.vocab)}
        if len(self.token_to_id) != len(self.vocab):
            raise DataError("word tokenizer vocabulary has duplicate entries; the file is corrupt")
        special_tokens = list(special_tokens)
        missing = [t for t in special_tokens if t not in self.token_to_id]
        if missing or EOT not in special_tokens:
            raise DataError(f"word tokenizer is missing special token(s) {missing or [EOT]}; the file is corrupt")
        self.special_tokens = {t: self.token_to_id[t] for t in special_tokens}
        self._unknown_id = self.special_tokens.get(UNKNOWN)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in special_tokens) + ")")
        self._cache: dict[str, list[int]] = {}

    def _encode_piece(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is None:
            i = self.token_to_id.get(piece)
            if i is not None:
                ids = [i]
            else:
                ids = [self.token_to_id.get(ch, self._unknown_id) for ch in piece]
                if None in ids:
                    raise DataError(f"character not in vocabulary and this tokenizer has no {UNKNOWN} token")
            if len(self._cache) < 1_000_000:
                self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2 == 1:  # a special token (split keeps the separators at odd positions)
                out.append(self.special_tokens[part])
                continue
            for piece in WORD_PIECE_RE.findall(part):
                out.extend(self._encode_piece(piece))
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        vocab = self.vocab
        return "".join(vocab[i] for i in ids)

    def to_json_str(self) -> str:
        special = [t for t in self.vocab if t in self.special_tokens]
        return json.dumps(
            {"type": WORD_FORMAT, "version": 1, "special_tokens": special, "vocab": self.vocab},
            ensure_ascii=False,
        )


def train_word_tokenizer(
    texts_or_paths: Iterable[str | os.PathLike] | os.PathLike, vocab_size: int = 2048
) -> WordTokenizer:
    """Train a word-level tokenizer with character fallback (inputs as in `train_bpe_tokenizer`).

    Characters come first so that, while the vocabulary has room, every character seen in training
    can be encoded; the rest of the vocabulary goes to the most frequent words and punctuation runs.
    """
    check_vocab_size(vocab_size, "word")
    pieces: Counter[str] = Counter()
    n_docs = 0
    for text in _training_texts(texts_or_paths):
        n_docs += 1
        for part in re.split("|".join(re.escape(t) for t in SPECIAL_TOKENS), text):
            pieces.update(WORD_PIECE_RE.findall(part))
    if n_docs == 0:
        raise DataError("no text to train the tokenizer on: the input holds no documents")
    chars: Counter[str] = Counter()
    for piece, n in pieces.items():
        for ch in piece:
            chars[ch] += n
    room = vocab_size - len(SPECIAL_TOKENS)
    # most frequent first, ties broken by the string itself so training is deterministic
    by_freq = lambda c: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))  # noqa: E731
    kept_chars = [ch for ch, _ in by_freq(chars)][:room]
    words = [p for p, n in by_freq(pieces) if len(p) > 1 and n >= 2][: room - len(kept_chars)]
    return WordTokenizer(list(SPECIAL_TOKENS) + kept_chars + words)


# ---------------------------------------------------------------------------------------------
# Loading and helpers


def check_vocab_size(vocab_size: int, kind: str) -> None:
    if kind not in ("bpe", "word"):
        raise DataError(f"unknown tokenizer kind {kind!r}; use 'bpe' or 'word'")
    smallest = MIN_BPE_VOCAB if kind == "bpe" else len(SPECIAL_TOKENS) + 1
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        why = (
            f"{N_BYTES} byte tokens + {len(SPECIAL_TOKENS)} special tokens"
            if kind == "bpe"
            else f"{len(SPECIAL_TOKENS)} special tokens + at least one character"
        )
        raise DataError(
            f"vocab size {vocab_size} is too small for a {kind} tokenizer: it needs {why} = {smallest}; "
            f"use --vocab-size {smallest} or more (2048 is the default)"
        )
    if vocab_size > 2**32 - 1:
        raise DataError(f"vocab size {vocab_size} does not fit in uint32 token files")


def tokenizer_from_json_str(text: str) -> Tokenizer:
    """Rebuild a tokenizer from `to_json_str()` output (BPE or word, detected from the content)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"tokenizer is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError("tokenizer JSON must be an object")
    if data.get("type") == WORD_FORMAT:
        if data.get("version") != 1 or not isinstance(data.get("vocab"), list):
            raise DataError(f"unsupported word tokenizer version {data.get('version')!r}")
        return WordTokenizer(data["vocab"], data.get("special_tokens", SPECIAL_TOKENS))
    if isinstance(data.get("model"), dict):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception
            raise DataError(f"cannot read Hugging Face tokenizer: {e}") from None
        return BPETokenizer(hf)
    raise DataError("not a tokenizer file: expected a Hugging Face tokenizer.json or a nanomoe word tokenizer")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer file written by `save` (or any Hugging Face tokenizer.json with <|endoftext|>)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"  # a data dir or a checkpoint dir
    if not path.is_file():
        raise DataError(f"tokenizer file {path} not found; train one with `nanomoe tokenizer train`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a tokenizer file (it is not text); pass a tokenizer.json, such as the one "
                        "`nanomoe prepare` writes into every data dir") from None
    try:
        return tokenizer_from_json_str(text)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # the tokenizers library's own parse errors
        raise DataError(f"{path} is not a tokenizer file ({str(e).splitlines()[0][:200] if str(e) else e}); pass a "
                        "tokenizer.json, such as the one `nanomoe prepare` writes into every data dir") from None


class _CountingIterator:
    """Counts what passes through, so training on an empty input is reported instead of ignored."""

    def __init__(self, it: Iterable[str]) -> None:
        self.it = iter(it)
        self.n = 0

    def __iter__(self) -> Iterator[str]:
        for x in self.it:
            self.n += 1
            yield x


def _training_texts(texts_or_paths) -> Iterator[str]:
    if isinstance(texts_or_paths, (str, os.PathLike)):
        texts_or_paths = [texts_or_paths]
    for item in texts_or_paths:
        if isinstance(item, os.PathLike):
            yield from open_source(item).documents("train")
        elif isinstance(item, str):
            yield item
        else:
            raise TypeError(f"expected str texts or pathlib.Path files, got {type(item).__name__}")
