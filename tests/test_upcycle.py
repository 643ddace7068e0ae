"""Upcycling: a dense checkpoint becomes an MoE run that starts with the dense model's logits and
trains on with --resume; what cannot be upcycled is a clear error."""

import json

import pytest
import torch

from nanomoe.cli import main
from nanomoe.data import prepare_data
from nanomoe.presets import get_preset
from nanomoe.training import checkpoint as ckpt
from nanomoe.training.config import TrainConfig
from nanomoe.training.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stories"
    return prepare_data("builtin:0.4", out, vocab_size=512, progress=False)


def train_dense(data_dir, out, **model_changes):
    cfg = TrainConfig(batch_size=4, max_steps=3, eval_every=1000, eval_batches=2, save_every=0, log_every=1000,
                      samples=0, tensorboard=False, plots=False, progress=False, precision="fp32", lr=3e-3, seed=5)
    model = get_preset("debug-dense", **{"vocab_size": 512, "block_size": 32, **model_changes})
    Trainer(model, cfg, out, data_dir).fit()
    return out


@pytest.fixture(scope="module")
def dense_run(data_dir, tmp_path_factory):
    return train_dense(data_dir, tmp_path_factory.mktemp("dense") / "run")


def logits(run, tokens):
    model = ckpt.load_checkpoint(run, prefer="latest").model.float().eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("changes, moe_set", [
    ({}, []),
    ({}, ["--set", "moe_every=2", "--set", "router=noisy_topk"]),
    ({"position": "learned", "norm": "layernorm", "ffn": "relu", "bias": True}, []),  # biases are copied too
])
def test_upcycled_model_gives_the_dense_logits(data_dir, dense_run, tmp_path, changes, moe_set, capsys):
    dense = train_dense(data_dir, tmp_path / "dense", **changes) if changes else dense_run
    out = tmp_path / "moe"
    assert main(["upcycle", "--checkpoint", str(dense), "--experts", "4", "--top-k", "2", "--out", str(out),
                 *moe_set]) == 0
    assert "--resume" in capsys.readouterr().out
    cfg = ckpt.read_model_config(ckpt.resolve_checkpoint(out, prefer="latest"))
    assert cfg.n_experts == 4 and cfg.top_k == 2 and cfg.expert_hidden == get_preset("debug-dense").ffn_hidden
    tokens = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    moe_logits, dense_logits = logits(out, tokens), logits(dense, tokens)
    torch.testing.assert_close(moe_logits, dense_logits, rtol=1e-4, atol=1e-4)
    # the routers are fresh (random), not copies: the MoE is not trivially the dense model
    model = ckpt.load_checkpoint(out, prefer="latest").model
    gate = model.moe_layers()[0].router.gate.weight
    assert gate.abs().sum() > 0 and len(model.moe_layers()) == (1 if "moe_every=2" in moe_set else 2)


def test_upcycled_run_trains_on_with_resume(dense_run, tmp_path):
    out = tmp_path / "moe"
    assert main(["upcycle", "--checkpoint", str(dense_run), "--experts", "4", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--max-steps", "2", "--no-progress"]) == 0
    assert json.loads((out / "latest.json").read_text())["step"] == 2
    state = ckpt.read_json(out / "checkpoints" / "step-00000000" / "trainer_state.json")
    assert state["upcycled_from"]["step"] == 3
    assert ckpt.load_checkpoint(out, prefer="latest").model_config.n_experts == 4


@pytest.mark.parametrize("flags, message", [
    (["--set", "expert_hidden=64"], "hidden width is 256"),
    (["--set", "router=switch"], "router=topk"),
    (["--set", "n_layer=4"], "only MoE fields"),
    (["--set", "n_shared_experts=1"], "without shared experts"),
    (["--top-k", "5"], "top_k"),
])
def test_what_cannot_be_upcycled_is_a_clear_error(dense_run, tmp_path, capsys, flags, message):
    assert main(["upcycle", "--checkpoint", str(dense_run), "--experts", "4", "--out", str(tmp_path / "o"),
                 *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_moe_checkpoint_is_refused(dense_run, tmp_path, capsys):
    moe = tmp_path / "moe"
    assert main(["upcycle", "--checkpoint", str(dense_run), "--experts", "4", "--out", str(moe)]) == 0
    assert main(["upcycle", "--checkpoint", str(moe), "--experts", "8", "--out", str(tmp_path / "again")]) == 1
    assert "already an MoE" in capsys.readouterr().err
