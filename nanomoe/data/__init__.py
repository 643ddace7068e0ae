"""Data: tokenizers, document sources, `prepare_data` (documents -> token files) and `BatchLoader`.

    from nanomoe.data import prepare_data, BatchLoader
    data_dir = prepare_data("builtin", "data/stories")          # or a path, or "tinystories"
    loader = BatchLoader(data_dir, "train", batch_size=32, block_size=256)
    x, y = loader.next_batch()

See docs/data.md for the formats, meta.json fields and the loader's guarantees.
"""

from .builtin_corpus import generate_stories
from .loader import MODES, BatchLoader
from .prepare import (
    PrepareResult,
    builtin_corpus_dir,
    cache_root,
    check_compatible,
    load_data_tokenizer,
    prepare_data,
    read_meta,
    run_prepare,
)
from .sources import Source, open_source, split_documents
from .tokenizer import (
    EOT,
    SPECIAL_TOKENS,
    BPETokenizer,
    Tokenizer,
    WordTokenizer,
    load_tokenizer,
    tokenizer_from_json_str,
    train_bpe_tokenizer,
    train_word_tokenizer,
)

__all__ = [
    "BatchLoader",
    "BPETokenizer",
    "EOT",
    "MODES",
    "PrepareResult",
    "SPECIAL_TOKENS",
    "Source",
    "Tokenizer",
    "WordTokenizer",
    "builtin_corpus_dir",
    "cache_root",
    "check_compatible",
    "generate_stories",
    "load_data_tokenizer",
    "load_tokenizer",
    "open_source",
    "run_prepare",
    "prepare_data",
    "read_meta",
    "split_documents",
    "tokenizer_from_json_str",
    "train_bpe_tokenizer",
    "train_word_tokenizer",
]
