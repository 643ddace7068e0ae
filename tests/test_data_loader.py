"""BatchLoader: real windows, padding masks, determinism, exact resume, rank sharding, eval coverage."""

import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from nanomoe.data import BatchLoader, prepare_data, read_meta
from nanomoe.errors import DataError
from nanomoe.model import IGNORE_INDEX

T = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data("builtin:0.12", tmp_path_factory.mktemp("data") / "d", vocab_size=300, progress=False)


def file_tokens(data_dir, split):
    return np.fromfile(data_dir / f"{split}.bin", dtype=read_meta(data_dir)["dtype"]).astype(np.int64)


def documents(data_dir, split):
    """Each document's tokens including its closing EOT, read straight from the files."""
    tokens = file_tokens(data_dir, split)
    starts = np.load(data_dir / f"{split}.docs.npy", allow_pickle=False)
    ends = np.append(starts[1:], len(tokens))
    return [tokens[s:e] for s, e in zip(starts, ends)]


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_packed_rows_are_contiguous_windows_of_the_file(data_dir):
    tokens = file_tokens(data_dir, "train")
    windows = np.lib.stride_tricks.sliding_window_view(tokens, T + 1)
    loader = BatchLoader(data_dir, "train", batch_size=8, block_size=T, seed=3)
    for x, y in batches(loader, 3):
        assert x.shape == y.shape == (8, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            window = np.append(row_x, row_y[-1])
            assert (windows == window).all(axis=1).any()  # a real slice of train.bin
    assert loader.tokens_per_epoch == read_meta(data_dir)["splits"]["train"]["tokens"] == len(tokens)


@pytest.mark.parametrize("mode", ["packed", "documents"])
def test_batches_are_deterministic_given_the_seed(data_dir, mode):
    a = batches(BatchLoader(data_dir, "train", 4, T, mode=mode, seed=1), 4)
    b = batches(BatchLoader(data_dir, "train", 4, T, mode=mode, seed=1), 4)
    c = batches(BatchLoader(data_dir, "train", 4, T, mode=mode, seed=2), 4)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    assert not torch.equal(a[0][0], a[1][0])  # steps differ from each other


@pytest.mark.parametrize("mode", ["packed", "documents"])
def test_restored_state_continues_bit_for_bit(data_dir, mode):
    straight = BatchLoader(data_dir, "train", 4, T, mode=mode, seed=5)
    expected = batches(straight, 7)[4:]
    first = BatchLoader(data_dir, "train", 4, T, mode=mode, seed=5)
    batches(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    resumed = BatchLoader(data_dir, "train", 4, T, mode=mode, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip(batches(resumed, 3), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_changed_batch_shape_on_resume_warns(data_dir):
    state = BatchLoader(data_dir, "train", 4, T).state_dict()
    with pytest.warns(UserWarning, match="global_batch_size 4 -> 8"):
        BatchLoader(data_dir, "train", 8, T).load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same global batch on two ranks: the stream is unchanged
        BatchLoader(data_dir, "train", 2, T, rank=1, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("mode", ["packed", "documents"])
def test_two_ranks_see_exactly_what_one_rank_with_twice_the_batch_sees(data_dir, mode):
    one = BatchLoader(data_dir, "train", 6, T, mode=mode, seed=4)
    r0 = BatchLoader(data_dir, "train", 3, T, mode=mode, seed=4, rank=0, world_size=2)
    r1 = BatchLoader(data_dir, "train", 3, T, mode=mode, seed=4, rank=1, world_size=2)
    for _ in range(3):
        x, y = one.next_batch()
        (x0, y0), (x1, y1) = r0.next_batch(), r1.next_batch()
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_document_rows_start_at_a_document_and_mask_the_padding(data_dir):
    block = int(np.median([len(d) for d in documents(data_dir, "train")]))  # half the rows padded, half cut
    loader = BatchLoader(data_dir, "train", 16, block, mode="documents", seed=0)
    eot = loader.eot_id
    docs = {tuple(d[:block].tolist()) for d in documents(data_dir, "train")}
    n_padded_rows = n_cut_rows = 0
    for x, y in batches(loader, 4):
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            n = int((row_y != IGNORE_INDEX).sum())
            assert (row_y[:n] != IGNORE_INDEX).all() and (row_y[n:] == IGNORE_INDEX).all()  # one prefix is real
            assert tuple(row_y[:n].tolist()) in docs  # the targets are a whole document (cut at block)
            assert row_x[0] == eot and (row_x[1:n] == row_y[: n - 1]).all()
            assert (row_x[n:] == eot).all()
            if n < block:
                assert row_y[n - 1] == eot  # the document's end is a target
                n_padded_rows += 1
            else:
                n_cut_rows += 1
    assert n_padded_rows > 0 and n_cut_rows > 0
    assert loader.num_truncated_documents == sum(len(d) > block for d in documents(data_dir, "train"))


def test_padded_targets_do_not_count_in_the_loss(data_dir):
    loader = BatchLoader(data_dir, "val", 4, 1024, mode="documents", seed=0)
    x, y = loader.next_batch()
    logits = torch.randn(*y.shape, 300, generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 300), y.view(-1), ignore_index=IGNORE_INDEX)
    real = y != IGNORE_INDEX
    manual = -torch.log_softmax(logits[real], dim=-1).gather(1, y[real][:, None]).mean()
    assert real.sum() < y.numel() and torch.allclose(loss, manual)


def test_packed_eval_covers_every_target_token_exactly_once(data_dir):
    tokens = file_tokens(data_dir, "val")
    loader = BatchLoader(data_dir, "val", 4, T)
    n_windows = -(-(len(tokens) - 1) // T)
    seen = Counter()
    n_targets = 0
    for x, y in loader.eval_batches(batch_size=5):
        assert x.shape == y.shape == (5, T)
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            n = int((row_y != IGNORE_INDEX).sum())
            if n == 0:
                continue  # a padding row after the last window
            n_targets += n
            # which window is this? window k holds x = tokens[kT : kT+n] and y = tokens[kT+1 : kT+1+n]
            def is_window(k, n=n, row_x=row_x, row_y=row_y):
                start = k * T
                return (min(T, len(tokens) - 1 - start) == n and (tokens[start : start + n] == row_x[:n]).all()
                        and (tokens[start + 1 : start + 1 + n] == row_y[:n]).all())

            # stories repeat phrases, so identical windows exist: take one not yet seen if there is one
            matches = [k for k in range(n_windows) if is_window(k)]
            assert matches
            seen[next((k for k in matches if k not in seen), matches[0])] += 1
    assert n_targets == len(tokens) - 1  # every token but the very first is predicted once
    assert sorted(seen) == list(range(n_windows)) and set(seen.values()) == {1}
    assert loader.num_eval_batches(5) == -(-n_windows // 5)


def test_documents_eval_visits_every_document_once(data_dir):
    loader = BatchLoader(data_dir, "val", 4, 64, mode="documents")
    got = Counter()
    for _, y in loader.eval_batches(batch_size=3):
        for row in y.numpy():
            n = int((row != IGNORE_INDEX).sum())
            if n:
                got[tuple(row[:n].tolist())] += 1
    expected = Counter(tuple(d[:64].tolist()) for d in documents(data_dir, "val"))
    assert got == expected


@pytest.mark.parametrize("mode", ["packed", "documents"])
def test_sharded_eval_gives_every_rank_the_same_number_of_batches_and_splits_the_pass(data_dir, mode):
    one = list(BatchLoader(data_dir, "val", 1, T, mode=mode).eval_batches(batch_size=6))
    shards = [list(BatchLoader(data_dir, "val", 1, T, mode=mode, rank=r, world_size=3).eval_batches(batch_size=2))
              for r in range(3)]
    assert len(shards[0]) == len(shards[1]) == len(shards[2]) == len(one)
    for j, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([s[j][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[j][1] for s in shards]), y)
    limited = list(BatchLoader(data_dir, "val", 1, T, mode=mode).eval_batches(batch_size=6, max_batches=2))
    assert len(limited) == 2 and all(torch.equal(a[1], b[1]) for a, b in zip(limited, one))


def test_bad_loader_arguments_and_data_are_reported(data_dir, tmp_path):
    with pytest.raises(DataError, match="split must be"):
        BatchLoader(data_dir, "test", 4, T)
    with pytest.raises(DataError, match="mode must be"):
        BatchLoader(data_dir, "train", 4, T, mode="random")
    with pytest.raises(DataError, match="rank"):
        BatchLoader(data_dir, "train", 4, T, rank=2, world_size=2)
    n_val = read_meta(data_dir)["splits"]["val"]["tokens"]
    with pytest.raises(DataError, match="fewer than block_size"):
        BatchLoader(data_dir, "val", 4, n_val)
    with pytest.raises(DataError, match="no meta.json"):
        BatchLoader(tmp_path, "train", 4, T)


def test_document_batches_are_as_wide_as_their_longest_row(data_dir, monkeypatch):
    block = 1024
    loader = BatchLoader(data_dir, "val", 4, block, mode="documents", seed=0)
    cropped = [loader.next_batch() for _ in range(5)] + list(loader.eval_batches(4, max_batches=5))
    # the same batches at full width: the cropped ones are their left part, and the rest is padding
    monkeypatch.setattr(BatchLoader, "_crop_padding", lambda self, x, y: (x, y))
    loader = BatchLoader(data_dir, "val", 4, block, mode="documents", seed=0)
    full = [loader.next_batch() for _ in range(5)] + list(loader.eval_batches(4, max_batches=5))
    for (x, y), (fx, fy) in zip(cropped, full, strict=True):
        longest = int((y != IGNORE_INDEX).sum(dim=1).max())
        width = x.shape[1]
        assert x.shape == y.shape and (width % 64 == 0 or width == block)
        assert longest <= width < longest + 64 and fx.shape[1] == block
        assert torch.equal(x, fx[:, :width]) and torch.equal(y, fy[:, :width])
        assert (fy[:, width:] == IGNORE_INDEX).all()
