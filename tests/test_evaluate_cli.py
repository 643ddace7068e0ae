"""`nanomoe eval`: padding never counts (checked against a per-document reference with no padding at
all), the numbers follow from each other, JSON keys, and clear errors for data that does not fit."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanomoe.cli import main
from nanomoe.data import load_data_tokenizer, prepare_data, read_meta
from nanomoe.model import GPT
from nanomoe.presets import get_preset
from nanomoe.training import checkpoint as ckpt


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data("builtin:0.1", tmp_path_factory.mktemp("data") / "stories", vocab_size=400, progress=False)


def save_run(run_dir, model: GPT, data_dir, step: int = 7):
    """A run dir holding one checkpoint of `model`, as the trainer would write it."""
    meta = read_meta(data_dir)
    ckpt.save_checkpoint(
        run_dir, ckpt.checkpoint_name(step), model_state=model.state_dict(), model_config=model.config,
        trainer_state={"step": step, "data_dir": str(data_dir)},
        tokenizer_json=load_data_tokenizer(data_dir).to_json_str(), data_meta=meta, pointers={"latest": {}},
    )
    return run_dir


@pytest.fixture(scope="module")
def moe_run(data_dir, tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(get_preset("debug", vocab_size=400, block_size=512)).eval()
    return save_run(tmp_path_factory.mktemp("runs") / "moe", model, data_dir)


def run_eval_json(capsys, *args) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_documents_mode_loss_equals_unpadded_per_document_reference(moe_run, data_dir, capsys):
    result = run_eval_json(capsys, "--checkpoint", str(moe_run), "--data", str(data_dir), "--mode", "documents",
                           "--batch-size", "3")
    # reference: every document on its own (no padding anywhere): context EOT + doc, targets doc + EOT
    model = ckpt.load_checkpoint(moe_run).model
    meta = read_meta(data_dir)
    tokens = np.fromfile(data_dir / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    starts = np.load(data_dir / "val.docs.npy")
    ends = list(starts[1:]) + [len(tokens)]
    loss_sum, n_targets, correct = 0.0, 0, 0
    with torch.no_grad():
        for s, e in zip(starts, ends):
            doc = torch.from_numpy(tokens[s:e])  # the document and its closing EOT
            x = torch.cat([torch.tensor([meta["eot_id"]]), doc[:-1]]).unsqueeze(0)
            logits = model(x).logits[0]
            loss_sum += F.cross_entropy(logits.double(), doc, reduction="sum").item()
            correct += int((logits.argmax(-1) == doc).sum())
            n_targets += len(doc)
    # 8 documents of different lengths in batches of 3: padded rows and a padding-only row exist
    assert len(starts) == meta["splits"]["val"]["documents"] and len(set(np.diff(starts))) > 1
    assert result["tokens"] == n_targets == meta["splits"]["val"]["tokens"]
    assert result["loss"] == pytest.approx(loss_sum / n_targets, rel=1e-5)
    assert result["accuracy"] == pytest.approx(correct / n_targets, abs=1e-9)
    # routing statistics cover the same real positions, not the padding
    for layer in result["moe"]["layers"]:
        assert layer["tokens"] == n_targets
        assert sum(layer["load_fractions"]) == pytest.approx(1.0)


def test_packed_mode_numbers_follow_from_each_other(moe_run, data_dir, capsys):
    result = run_eval_json(capsys, "--checkpoint", str(moe_run), "--data", str(data_dir), "--block-size", "100")
    split = read_meta(data_dir)["splits"]["val"]
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "accuracy", "moe"} <= set(result)
    assert result["tokens"] == split["tokens"] - 1  # every token but the first is a target once
    assert result["block_size"] == 100 and result["mode"] == "packed" and result["step"] == 7
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] / math.log(2) / (split["bytes"] / split["tokens"]), rel=1e-9)
    assert 0 <= result["accuracy"] <= 1 and math.log(400) - 0.5 < result["loss"] < math.log(400) + 0.5


def test_max_batches_and_default_data_and_human_output(moe_run, capsys):
    # no --data: the data dir recorded in the run
    result = run_eval_json(capsys, "--checkpoint", str(moe_run), "--max-batches", "1", "--batch-size", "2",
                           "--block-size", "64")
    assert result["batches"] == 1 and result["tokens"] == 2 * 64
    assert main(["eval", "--checkpoint", str(moe_run), "--max-batches", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "padding excluded" in out and "perplexity" in out and "MoE routing" in out


def test_dense_model_has_no_moe_section(data_dir, tmp_path, capsys):
    torch.manual_seed(0)
    run = save_run(tmp_path / "dense", GPT(get_preset("debug-dense", vocab_size=400, block_size=64)), data_dir)
    result = run_eval_json(capsys, "--checkpoint", str(run), "--data", str(data_dir), "--device", "cpu")
    assert "moe" not in result and result["tokens"] > 0


def test_data_from_another_tokenizer_is_refused_with_what_to_do(moe_run, tmp_path, capsys):
    other = prepare_data("builtin:0.1", tmp_path / "word", vocab_size=400, tokenizer_kind="word", progress=False)
    assert main(["eval", "--checkpoint", str(moe_run), "--data", str(other)]) == 1
    err = capsys.readouterr().err
    assert "different tokenizer" in err and "--tokenizer" in err and "tokenizer.json" in err


def test_bad_arguments_are_clear_errors(moe_run, data_dir, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(moe_run), "--block-size", "1024"]) == 1
    assert "exceeds the model's block_size 512" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(moe_run), "--batch-size", "0"]) == 1
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(moe_run), "--data", str(tmp_path)]) == 1
    assert "nanomoe prepare" in capsys.readouterr().err
