"""Batches of token windows from a prepared data dir, deterministic and resumable.

Two ways to cut samples out of a split (token layout: doc0 EOT doc1 EOT ... docN EOT):

- "packed": a window of block_size + 1 consecutive tokens starting anywhere, across document
  boundaries (x = window[:-1], y = window[1:]); every target is a real token.
- "documents": one document per row, starting at its first token, with EOT in front as the context
  for the first token (x = EOT doc..., y = doc... EOT). Rows are padded; padded targets are
  IGNORE_INDEX (-100) and never count in the loss. Documents longer than block_size are cut.
  Batches are only as wide as their longest row (rounded up to a multiple of 64).

Training batches are drawn with replacement from an RNG seeded by (seed, step) alone. Each step
draws one global batch of world_size * batch_size rows and rank r takes rows [r*B, (r+1)*B): two
ranks with batch B see exactly the rows one rank with 2B sees, and restoring `state_dict()`
continues the stream bit for bit.

`eval_batches` walks the whole split once in a fixed order (the same for every seed, so a
`max_batches` prefix is an unbiased sample and comparable across runs). Every rank gets the same
number of batches of the same shape, so collectives in the model never wait on a rank that ran out;
rows past the end are all padding (targets all -100).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..model import IGNORE_INDEX
from .prepare import SPLITS, read_meta

MODES = ("packed", "documents")
EVAL_ORDER_SEED = 20240101  # eval order is fixed: independent of the training seed
CROP_MULTIPLE = 64  # document-mode batches are as wide as their longest row, rounded up to this


class BatchLoader:
    """Random batches (x, y) of int64 tensors of shape (batch_size, block_size) from one split."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        block_size: int,
        *,
        mode: str = "packed",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        if mode not in MODES:
            raise DataError(f"data mode must be one of {MODES}, got {mode!r}")
        for name, value in (("batch_size", batch_size), ("block_size", block_size), ("world_size", world_size)):
            if not isinstance(value, int) or value < 1:
                raise DataError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, {world_size}), got {rank}")
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be an integer >= 0, got {seed!r}")
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        self.split, self.mode = split, mode
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device) if device is not None else None
        self.step = 0
        self.eot_id = int(self.meta["eot_id"])
        info = self.meta["splits"][split]
        self.tokens = np.memmap(self.data_dir / info["file"], dtype=np.dtype(self.meta["dtype"]), mode="r")
        if len(self.tokens) != info["tokens"]:  # read_meta checked sizes; this guards the dtype too
            raise DataError(f"{self.data_dir / info['file']} does not match meta.json; run `nanomoe prepare` again")
        self._check_token_ids(self.data_dir / info["file"])
        self.doc_starts = np.load(self.data_dir / info["docs_file"], allow_pickle=False)
        self.doc_ends = np.append(self.doc_starts[1:], len(self.tokens))  # exclusive; includes the doc's EOT
        if mode == "packed" and len(self.tokens) < block_size + 1:
            raise DataError(
                f"the {split} split has {len(self.tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "lower block_size or prepare more data"
            )

    def _check_token_ids(self, path: Path, chunk: int = 1 << 24) -> None:
        """Every id below the tokenizer's vocab_size: a damaged or foreign .bin would otherwise fail
        deep in the model's embedding (one pass over the file, in chunks)."""
        vocab = int(self.meta["vocab_size"])
        for start in range(0, len(self.tokens), chunk):
            top = int(self.tokens[start:start + chunk].max())
            if top >= vocab:
                raise DataError(f"{path} holds token id {top}, but its tokenizer has only {vocab} tokens: the file is "
                                "damaged or not from this data dir; run `nanomoe prepare` again")

    # --- sizes ---
    @property
    def tokens_per_epoch(self) -> int:
        """Tokens in this split (EOT separators included): an epoch of packed training."""
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts)

    @property
    def num_truncated_documents(self) -> int:
        """Documents longer than block_size targets, which documents mode cuts short."""
        return int(((self.doc_ends - self.doc_starts) > self.block_size).sum())

    # --- training batches ---
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.step])
        global_rows = self.world_size * self.batch_size
        if self.mode == "packed":
            rows = rng.integers(0, len(self.tokens) - self.block_size, size=global_rows)
        else:
            rows = rng.integers(0, len(self.doc_starts), size=global_rows)
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.step += 1
        if self.mode == "packed":
            window = self.tokens[mine[:, None] + np.arange(self.block_size + 1)].astype(np.int64)  # (B, T+1)
            return self._to_torch(window[:, :-1], window[:, 1:])
        return self._to_torch(*self._crop_padding(*self._document_rows(mine)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return dict(seed=self.seed, step=self.step, split=self.split, mode=self.mode,
                    global_batch_size=self.world_size * self.batch_size, block_size=self.block_size)

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off (the next batch is the one that run would have drawn next)."""
        mine = self.state_dict()
        keys = ("split", "mode", "global_batch_size", "block_size")
        changed = [k for k in keys if k in state and state[k] != mine[k]]
        if changed:
            warnings.warn(
                f"data loader resumed with different {', '.join(changed)}: "
                + ", ".join(f"{k} {state[k]} -> {mine[k]}" for k in changed)
                + "; batches will not match an uninterrupted run",
                stacklevel=2,
            )
        self.seed = int(state["seed"])
        self.step = int(state["step"])

    # --- evaluation ---
    def num_eval_batches(self, batch_size: int, max_batches: int | None = None) -> int:
        n = math.ceil(self._num_eval_rows() / (self.world_size * batch_size))
        return n if max_batches is None else min(n, max_batches)

    def eval_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the split: every target token once (packed) or every document once (documents).

        Weight each batch by its number of targets != -100 to average over the split.
        """
        n_rows = self._num_eval_rows()
        order = np.random.default_rng(EVAL_ORDER_SEED).permutation(n_rows)
        global_rows = self.world_size * batch_size
        for j in range(self.num_eval_batches(batch_size, max_batches)):
            rows = order[j * global_rows : (j + 1) * global_rows]
            rows = np.concatenate([rows, np.full(global_rows - len(rows), -1, dtype=rows.dtype)])  # -1: padding row
            mine = rows[self.rank * batch_size : (self.rank + 1) * batch_size]
            if self.mode == "packed":
                yield self._to_torch(*self._eval_windows(mine))
            else:
                yield self._to_torch(*self._crop_padding(*self._document_rows(mine)))

    def _num_eval_rows(self) -> int:
        if self.mode == "packed":
            return math.ceil((len(self.tokens) - 1) / self.block_size)  # windows of T targets, the last shorter
        return len(self.doc_starts)

    def _eval_windows(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        T = self.block_size
        x = np.full((len(windows), T), self.eot_id, dtype=np.int64)
        y = np.full((len(windows), T), IGNORE_INDEX, dtype=np.int64)
        for i, k in enumerate(windows):
            if k < 0:
                continue
            start = int(k) * T
            n = min(T, len(self.tokens) - 1 - start)  # targets in this window
            x[i, :n] = self.tokens[start : start + n]
            y[i, :n] = self.tokens[start + 1 : start + 1 + n]
        return x, y

    def _crop_padding(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drop the columns that are padding in every row (rounded up to a multiple of 64 so only a
        few shapes ever occur): the loss is unchanged, and short stories no longer pay for block_size
        positions each (~80% of the compute for TinyStories at the NanoGPT-MoE project's 1080)."""
        longest = int((y != IGNORE_INDEX).sum(axis=1).max(initial=1))
        width = min(self.block_size, -(-longest // CROP_MULTIPLE) * CROP_MULTIPLE)
        return x[:, :width], y[:, :width]

    def _document_rows(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        T = self.block_size
        x = np.full((len(docs), T), self.eot_id, dtype=np.int64)
        y = np.full((len(docs), T), IGNORE_INDEX, dtype=np.int64)
        for i, d in enumerate(docs):
            if d < 0:
                continue
            start, end = int(self.doc_starts[d]), int(self.doc_ends[d])
            n = min(end - start, T)  # targets: the document's tokens and its EOT, cut at T
            x[i, 1:n] = self.tokens[start : start + n - 1]  # x[i, 0] stays EOT: the context for token 0
            y[i, :n] = self.tokens[start : start + n]
        return x, y

    def _to_torch(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
        y_t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        if self.device is not None and self.device.type == "cuda":
            # pinned host memory lets the copy overlap with compute
            x_t = x_t.pin_memory().to(self.device, non_blocking=True)
            return x_t, y_t.pin_memory().to(self.device, non_blocking=True)
        if self.device is not None:
            return x_t.to(self.device), y_t.to(self.device)
        return x_t, y_t

    def __repr__(self) -> str:
        return (f"BatchLoader({str(self.data_dir)!r}, {self.split!r}, batch_size={self.batch_size}, "
                f"block_size={self.block_size}, mode={self.mode!r}, seed={self.seed}, step={self.step}, "
                f"rank={self.rank}/{self.world_size})")
