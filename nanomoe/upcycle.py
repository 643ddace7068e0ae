"""Sparse upcycling (Komatsuzaki et al. 2023): a dense checkpoint becomes an MoE one.

Every MoE layer's experts start as copies of that layer's dense feed-forward net and its router is
freshly initialized. With a router whose gate weights of the chosen experts sum to 1 ("topk", which
renormalizes, and "noisy_topk", a softmax over the kept logits, noise-free in eval), the upcycled
model computes exactly the dense model's function before training: sum_k g_k * FFN(x) = FFN(x).
The result is a run directory at step 0 that `nanomoe train --resume RUN` continues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import ConfigError
from .model import GPT
from .training import checkpoint as ckpt
from .training.config import TrainConfig
from .training.optimizers import build_optimizer

# MoE settings the upcycled model gets unless --set says otherwise (tiny-moe's)
MOE_DEFAULTS = dict(router="topk", aux_loss_coef=0.01, z_loss_coef=0.001, capacity_factor=0.0, n_shared_experts=0)
MOE_FIELDS = {*MOE_DEFAULTS, "moe_every", "expert_hidden", "router_bias_update_rate"}


def upcycled_config(dense: ModelConfig, n_experts: int, top_k: int, **overrides: Any) -> ModelConfig:
    """The MoE config of an upcycled `dense` model; clear errors for what cannot be copied."""
    if dense.is_moe:
        raise ConfigError(f"the checkpoint is already an MoE ({dense.n_experts} experts); upcycle a dense one "
                          "(n_experts = 0)")
    if n_experts < 2:
        raise ConfigError(f"--experts {n_experts}: an MoE needs at least 2 experts")
    fields = {**MOE_DEFAULTS, "expert_hidden": dense.ffn_hidden, **overrides, "n_experts": n_experts, "top_k": top_k}
    if fields["expert_hidden"] != dense.ffn_hidden:
        raise ConfigError(
            f"expert_hidden={fields['expert_hidden']}: the experts are copies of the dense feed-forward net, whose "
            f"hidden width is {dense.ffn_hidden}; leave expert_hidden unset (or set it to {dense.ffn_hidden})"
        )
    others = sorted(set(overrides) - MOE_FIELDS)
    if others:
        raise ConfigError(f"--set {', '.join(others)}: upcycling keeps the dense model's architecture; only MoE "
                          f"fields can be set ({', '.join(sorted(MOE_FIELDS))})")
    if fields["router"] == "switch":
        raise ConfigError("router switch scales each expert's output by its raw probability, so the upcycled model "
                          "would not start from the dense one: use --set router=topk (the default) or noisy_topk")
    if fields["n_shared_experts"]:
        raise ConfigError("n_shared_experts > 0 would add a second copy of the dense FFN to every output: upcycle "
                          "without shared experts")
    return ModelConfig.from_dict({**dense.to_dict(), **fields})


@torch.no_grad()
def upcycle_model(dense: GPT, moe_config: ModelConfig, seed: int = 0) -> GPT:
    """An MoE GPT with `dense`'s weights, each MoE layer's experts copies of its dense FFN, fresh routers
    (initialized from `seed`)."""
    torch.manual_seed(seed)
    moe = GPT(moe_config)
    dense_state = dense.state_dict()
    moe_state = moe.state_dict()
    for name, value in moe_state.items():
        if name in dense_state and dense_state[name].shape == value.shape:
            value.copy_(dense_state[name])
    for i in moe_config.moe_layers:
        ffn, experts = dense.blocks[i].ffn, moe.blocks[i].ffn.experts
        # nn.Linear stores (out, in); the experts' stacked weights are (E, in, out)
        experts.w_in.copy_(ffn.fc.weight.t().unsqueeze(0).expand_as(experts.w_in))
        experts.w_out.copy_(ffn.proj.weight.t().unsqueeze(0).expand_as(experts.w_out))
        if experts.b_in is not None:
            experts.b_in.copy_(ffn.fc.bias.unsqueeze(0).expand_as(experts.b_in))
            experts.b_out.copy_(ffn.proj.bias.unsqueeze(0).expand_as(experts.b_out))
    return moe


def upcycle_checkpoint(checkpoint: str | Path, out: str | Path, n_experts: int, top_k: int, *, seed: int = 0,
                       overrides: dict[str, Any] | None = None) -> Path:
    """Write the upcycled model of dense run/checkpoint `checkpoint` as a new run `out` at step 0; returns
    the checkpoint dir. The data stream continues where the dense run stopped; the optimizer starts fresh."""
    out = Path(out)
    if (out / "latest.json").exists() or (out / "checkpoints").is_dir():
        raise ConfigError(f"{out} already holds a run; pass another --out")
    src = ckpt.load_checkpoint(checkpoint, prefer="latest")
    moe_config = upcycled_config(src.model_config, n_experts, top_k, **(overrides or {}))
    moe = upcycle_model(src.model, moe_config, seed=seed)
    state = src.trainer_state
    trainer_state = {
        "step": 0, "tokens_seen": 0, "epoch": 0.0, "best_val_loss": None, "best_step": -1, "bad_steps": 0,
        "elapsed_seconds": 0.0, "world_size": state.get("world_size", 1), "loader": state["loader"],
        "last_eval": {}, "data_dir": state["data_dir"], "scaler": None, "budget": None,
        "upcycled_from": {"checkpoint": str(src.path.resolve()), "step": src.step},
    }
    tokenizer = src.tokenizer.to_json_str() if src.tokenizer is not None else None
    # a fresh optimizer (no moments yet) and RNG streams seeded as a new run's: resume starts them as saved
    train_config = TrainConfig.from_dict(src.train_config)
    optimizer_state = build_optimizer(moe, train_config).state_dict()
    torch.manual_seed(train_config.seed)
    rng_state = ckpt.combine_rank_rng_states([ckpt.capture_rng_state()])
    return ckpt.save_checkpoint(
        out, ckpt.checkpoint_name(0), model_state=moe.state_dict(), model_config=moe_config,
        trainer_state=trainer_state, optimizer_state=optimizer_state, rng_state=rng_state,
        train_config=src.train_config, tokenizer_json=tokenizer, data_meta=src.data_meta, pointers={"latest": {}},
    )
