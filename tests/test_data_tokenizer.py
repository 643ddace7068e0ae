"""Tokenizers: BPE round trips on any Unicode, special tokens, the word tokenizer's fallback, files."""

import hashlib
import json
import random

import pytest

from nanomoe.data import (
    EOT,
    SPECIAL_TOKENS,
    BPETokenizer,
    WordTokenizer,
    generate_stories,
    load_tokenizer,
    tokenizer_from_json_str,
    train_bpe_tokenizer,
    train_word_tokenizer,
)
from nanomoe.errors import DataError

MIXED_TEXTS = [
    "The café served crème brûlée. Ünïcödé everywhere!",
    "日本語のテキストと中文字符，还有한국어 문장.",
    "مرحبا بالعالم — שלום עולם",
    "emoji 🌍🚀👩‍👩‍👧 and flags 🇫🇷, math ∑∫√ and arrows ← →",
    "tabs\tand\r\nwindows newlines\n\n\nand   many   spaces  ",
]


@pytest.fixture(scope="module")
def texts():
    return list(generate_stories(seed=3, count=150)) + MIXED_TEXTS


@pytest.fixture(scope="module")
def bpe(texts):
    return train_bpe_tokenizer(texts, vocab_size=400)


def random_unicode(rng: random.Random, length: int) -> str:
    # every plane, controls and combining marks included; surrogates are not Unicode scalar values
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF), (0x300, 0x36F)]
    out = []
    for _ in range(length):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_bpe_decode_encode_is_identity_on_arbitrary_unicode(bpe):
    rng = random.Random(0)
    cases = [random_unicode(rng, rng.randint(0, 60)) for _ in range(300)]
    cases += MIXED_TEXTS + [
        "", " ", "  leading spaces", "trailing spaces   ", "\n", "\x00\x01\x7f", "\ufeffbom", "\U0010ffff",
        "e\u0301 (combining accent)", "text with <|endoftext|> inside", "<|endoftext", "<|im_start|>user<|im_end|>",
    ]
    for text in cases:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text, repr(text)
    assert bpe.encode_batch(cases) == [bpe.encode(t) for t in cases]


def test_bpe_has_the_special_tokens_at_fixed_ids_and_never_needs_unknown(bpe):
    assert bpe.special_tokens == {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    assert bpe.eot_id == 0
    assert bpe.encode(EOT) == [bpe.eot_id]
    ids = bpe.encode("Hi<|im_start|>there<|im_end|>")
    assert ids.count(bpe.special_tokens["<|im_start|>"]) == 1 and ids.count(bpe.special_tokens["<|im_end|>"]) == 1
    rng = random.Random(1)
    assert not any(bpe.special_tokens["<|unknown|>"] in bpe.encode(random_unicode(rng, 40)) for _ in range(50))
    assert bpe.vocab_size == 400 == bpe.hf.get_vocab_size()


def test_bpe_learns_merges_that_compress_text(bpe, texts):
    n_bytes = sum(len(t.encode("utf-8")) for t in texts[:100])  # the generated stories: ASCII
    n_tokens = sum(len(ids) for ids in bpe.encode_batch(texts[:100]))
    assert n_bytes / n_tokens > 1.5  # byte-level without merges would be exactly 1.0 on this ASCII text


def test_bpe_training_is_deterministic_and_the_hash_tracks_the_content(texts, bpe):
    again = train_bpe_tokenizer(texts, vocab_size=400)
    assert again.sha256 == bpe.sha256 and again.to_json_str() == bpe.to_json_str()
    other = train_bpe_tokenizer(texts, vocab_size=380)
    assert other.sha256 != bpe.sha256 and other.vocab_size == 380


def test_tokenizer_files_round_trip_and_are_detected_by_kind(tmp_path, bpe, texts):
    word = train_word_tokenizer(texts, vocab_size=300)
    for tok, cls in ((bpe, BPETokenizer), (word, WordTokenizer)):
        path = tok.save(tmp_path / f"{tok.kind}.json")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == tok.sha256  # sha256 is the file's hash
        loaded = load_tokenizer(path)
        assert isinstance(loaded, cls)
        assert loaded.sha256 == tok.sha256 and loaded.to_json_str() == tok.to_json_str()
        from_str = tokenizer_from_json_str(tok.to_json_str())
        assert isinstance(from_str, cls) and from_str.encode(texts[0]) == tok.encode(texts[0])
        assert loaded.special_tokens == tok.special_tokens and loaded.vocab_size == tok.vocab_size
    assert not list(tmp_path.glob(".*"))  # save leaves no temporary file behind


def test_vocab_too_small_for_the_special_tokens_is_refused(texts):
    with pytest.raises(DataError, match="260"):
        train_bpe_tokenizer(texts, vocab_size=259)
    with pytest.raises(DataError, match="too small"):
        train_word_tokenizer(texts, vocab_size=len(SPECIAL_TOKENS))
    with pytest.raises(DataError, match="no text"):
        train_bpe_tokenizer([], vocab_size=300)


def test_word_tokenizer_uses_words_then_characters_then_unknown():
    corpus = ["the cat sat on the mat.", "the cat ran to the mat!", "a dog sat."] * 3
    tok = train_word_tokenizer(corpus, vocab_size=200)
    assert tok.special_tokens == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    # frequent words are single tokens (with their leading space)
    assert tok.encode("the cat sat") == [tok.token_to_id["the"], tok.token_to_id[" cat"], tok.token_to_id[" sat"]]
    # an unseen word made of seen characters falls back to characters and still round-trips
    ids = tok.encode("the tac")
    assert tok.decode(ids) == "the tac"
    assert ids[2:] == [tok.token_to_id[c] for c in "tac"]
    # a character never seen becomes <|unknown|>
    ids = tok.encode("cat Z")
    assert ids[-1] == tok.special_tokens["<|unknown|>"]
    assert tok.decode(ids) == "cat <|unknown|>"
    # special tokens in text are recognized
    assert tok.encode("the<|endoftext|> cat") == [tok.token_to_id["the"], tok.eot_id, tok.token_to_id[" cat"]]


def test_word_tokenizer_round_trips_its_training_text_and_respects_the_vocab_size(texts):
    tok = train_word_tokenizer(texts, vocab_size=500)
    assert tok.vocab_size == 500
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    small = train_word_tokenizer(texts, vocab_size=40)  # room for the most frequent characters only
    assert small.vocab_size == 40
    assert all(len(t) == 1 for t in small.vocab[len(SPECIAL_TOKENS):])
    assert small.special_tokens["<|unknown|>"] in small.encode(texts[-1])


def test_load_tokenizer_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json.*not valid JSON"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="not a tokenizer"):
        load_tokenizer(tmp_path / "other.json")
    # a Hugging Face tokenizer without <|endoftext|> cannot separate documents
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    (tmp_path / "noeot.json").write_text(hf.to_str())
    with pytest.raises(DataError, match="endoftext"):
        load_tokenizer(tmp_path / "noeot.json")
