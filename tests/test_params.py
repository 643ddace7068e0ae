"""The calculator's counts equal the built model's; FLOPs and memory estimates behave."""

import json
import random

import pytest
import torch

from nanomoe.cli import main
from nanomoe.model import GPT
from nanomoe.params import (
    calculate,
    count_parameters,
    flops_per_token,
    fsdp_shard_numel,
    memory_estimate,
    parameter_shapes,
)
from nanomoe.presets import PRESETS, get_preset


def built_counts(cfg):
    with torch.device("meta"):  # no memory, even for moe-3b
        model = GPT(cfg)
    return model.num_params(), model.num_params(active_only=True)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_counts_equal_the_built_model(name):
    cfg = get_preset(name)
    counts = count_parameters(cfg)
    assert (counts.total, counts.active) == built_counts(cfg)


def test_random_configs_counts_equal_the_built_model():
    rng = random.Random(0)
    for _ in range(25):
        n_head = rng.choice([1, 2, 4])
        n_layer = rng.randint(1, 4)
        n_experts = rng.choice([0, 2, 4])
        cfg = get_preset(
            "debug",
            n_head=n_head,
            n_kv_head=rng.choice([h for h in (1, 2, 4) if n_head % h == 0]),
            n_embd=16 * n_head,
            n_layer=n_layer,
            position=rng.choice(["learned", "rope"]),
            norm=rng.choice(["layernorm", "rmsnorm"]),
            ffn=rng.choice(["relu", "gelu", "swiglu"]),
            bias=rng.random() < 0.5,
            tie_embeddings=rng.random() < 0.5,
            n_experts=n_experts,
            top_k=rng.randint(1, max(1, n_experts)),
            moe_every=rng.randint(1, min(2, n_layer)),
            router=rng.choice(["noisy_topk", "topk", "switch"]),
            n_shared_experts=rng.randint(0, 2),
            expert_hidden=rng.choice([8, 24]),
        )
        counts = count_parameters(cfg)
        assert (counts.total, counts.active) == built_counts(cfg), cfg


def test_moe_3b_is_about_three_billion():
    report = calculate(get_preset("moe-3b"))
    assert 2.9e9 <= report["total_params"] <= 3.1e9
    assert report["active_params"] < report["total_params"] / 2


def test_flops_follow_the_6n_rule_plus_attention():
    cfg = get_preset("tiny-dense")
    flops = flops_per_token(cfg, seq_len=256)
    counts = count_parameters(cfg)
    # no biases, rope, untied: every parameter but the embedding table and the norms is a matmul weight
    assert flops["matmul_weights"] == counts.total - counts.token_embedding - counts.norms
    expected = 3 * (2 * flops["matmul_weights"] + cfg.n_layer * 4 * cfg.n_embd * (256 + 1) / 2)
    assert flops["train"] == pytest.approx(expected)
    # a MoE with the same active parameters costs (almost) the same FLOPs: only the router is extra
    moe = flops_per_token(get_preset("tiny-moe"), seq_len=256)
    assert moe["train"] == pytest.approx(flops["train"], rel=0.01) and moe["train"] > flops["train"]


def test_memory_estimate_checkpointing_and_fsdp_shrink_it():
    mem = calculate(get_preset("moe-3b"), batch_size=4, gpus=8)["memory_bytes"]
    for precision in ("fp32", "bf16"):
        row = mem[precision]
        assert row["activations_checkpointed"] < row["activations"]
        assert row["fsdp_per_gpu"] < row["total"]
        assert row["optimizer"] == 2 * row["weights"]
    assert mem["bf16"]["activations"] < mem["fp32"]["activations"]


def test_cli_json_has_the_documented_keys(capsys):
    assert main(["params", "--preset", "tiny-moe", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("total_params", "active_params", "flops_per_token_train", "components", "memory_bytes"):
        assert key in report
    assert report["total_params"] == count_parameters(get_preset("tiny-moe")).total


def test_cli_overrides_and_errors(capsys):
    assert main(["params", "--preset", "tiny-moe", "--set", "n_experts=16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["n_experts"] == 16
    assert main(["params", "--preset", "tiny-moe", "--set", "n_head=5"]) == 1
    assert "divisible by n_head" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_shapes_are_the_models(name):
    variants = [{}, {"n_shared_experts": 1}] if get_preset(name).is_moe else [{}]
    for extra in variants:
        cfg = get_preset(name, **extra)
        with torch.device("meta"):
            model = GPT(cfg)
        assert parameter_shapes(cfg) == [tuple(p.shape) for p in model.parameters()], (name, extra)


def test_fsdp_shards_stop_shrinking_past_one_expert_per_rank():
    cfg = get_preset("moe-3b")  # 8 experts; every other dim 0 divides by 32
    total = count_parameters(cfg).total
    assert fsdp_shard_numel(cfg, 1) == total
    assert fsdp_shard_numel(cfg, 8) == total / 8
    experts = count_parameters(cfg).experts
    for gpus in (16, 32):
        # every rank holds one whole expert of each layer's (8, D, H) tensors, not 1/gpus of them
        assert fsdp_shard_numel(cfg, gpus) == pytest.approx((total - experts) / gpus + experts / 8, rel=1e-3)
    mem = memory_estimate(cfg, batch_size=4, gpus=16)["bf16"]
    assert mem["fsdp_shard_params"] == fsdp_shard_numel(cfg, 16)


def _saved_bytes(model, idx, targets) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, targets)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["debug", "debug-dense"])
def test_memory_estimate_matches_what_autograd_saves(name):
    # measured at two batch sizes: the slope is the activations per token, the intercept the weight casts
    cfg = get_preset(name, n_embd=128, n_head=4, expert_hidden=256, ffn_hidden=256, block_size=64)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    T, small, large = cfg.block_size, 2, 6
    measured = {}
    for B in (small, large):
        idx = torch.randint(0, cfg.vocab_size, (B, T))
        measured[B] = _saved_bytes(model, idx, idx)
    per_token = (measured[large] - measured[small]) / ((large - small) * T)
    fixed = measured[small] - per_token * small * T
    row = memory_estimate(cfg, batch_size=1, seq_len=T)["bf16"]
    assert row["activations"] / T == pytest.approx(per_token, rel=0.25)
    assert row["weight_casts"] == pytest.approx(fixed, rel=0.25)


def test_budget_presets_are_the_size_studies_winners_and_twins():
    # what scripts/studies.sh size2 measured: tiny-moe and tiny-dense at 3 layers, the FFN halved
    moe, dense = get_preset("budget-moe"), get_preset("budget-dense")
    assert moe == get_preset("tiny-moe", n_layer=3, expert_hidden=256)
    assert dense == get_preset("tiny-dense", n_layer=3, ffn_hidden=512)
    # twins: the same active parameters per token, but for the MoE's router
    router = moe.n_layer * moe.n_embd * moe.n_experts
    assert count_parameters(moe).active == count_parameters(dense).active + router
