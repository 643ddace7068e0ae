"""The optimizers: fused AdamW for everything, or Muon for the hidden matrices and AdamW for the rest.

Muon (Jordan 2024; Liu et al. 2025, "Muon is Scalable for LLM Training") orthogonalizes each weight
matrix's momentum with a Newton-Schulz iteration. It is meant for the matrices inside the blocks:
attention and feed-forward projections, shared experts, and every routed expert's two matrices,
each expert on its own (the experts are stored stacked as (E, in, out) tensors; orthogonalizing the
stack as one matrix would couple experts that never see the same tokens). Embeddings, the output
head, norms, biases and the router stay on AdamW, as in the papers.

torch.optim.Muon takes 2-D parameters only; `Muon` below also takes the stacked expert tensors and
hands torch's update one 2-D view per expert (of the parameter, its gradient and its momentum),
so the state stays one tensor per parameter and checkpoints resume exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..moe import GroupedExperts, Router
from . import checkpoint as ckpt
from .config import TrainConfig


def adamw_param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices (>= 2-D: linear weights, embeddings, stacked experts) only; never on
    biases and norm gains (nanoGPT's rule)."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _unique_trainable(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def hidden_matrices(model: nn.Module, experts: bool = True) -> list[nn.Parameter]:
    """The blocks' hidden weight matrices, the ones Muon orthogonalizes: every nn.Linear weight inside
    `model.blocks` except the router's, and (unless experts=False) each GroupedExperts' stacked w_in /
    w_out (E matrices each)."""
    found = []
    for block in model.blocks:
        routers = [m for m in block.modules() if isinstance(m, Router)]
        router_params = {id(p) for r in routers for p in r.parameters()}
        for module in block.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in router_params:
                found.append(module.weight)
            elif experts and isinstance(module, GroupedExperts):
                found += [module.w_in, module.w_out]
    return _unique_trainable(found)


class Muon(torch.optim.Muon):
    """torch.optim.Muon that also takes stacked (E, rows, cols) expert weights, one matrix per expert.

    torch's constructor accepts matrices only, so the stacked tensors join afterwards as their own
    param group (`stacked=True`); `_init_group` splits them into per-expert 2-D views, which torch's
    update (lerp_ of the momentum, mul_/add_ of the weight) writes through in place.
    """

    def __init__(self, matrices: list[nn.Parameter], stacked: list[nn.Parameter], **hyper: Any):
        super().__init__([{"params": matrices, "stacked": False}], **hyper)
        if stacked:
            self.add_param_group({"params": stacked, "stacked": True})

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs) -> bool:
        if not group.get("stacked"):
            return super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            params_with_grad += list(p.unbind(0))  # (rows, cols) of expert 0, 1, ...
            grads += list(p.grad.unbind(0))
            muon_momentum_bufs += list(buf.unbind(0))
        return False


class MuonWithAdamW:
    """Muon and AdamW stepped as one optimizer: what the trainer, the schedule (each group's lr is
    the schedule's times its `lr_ratio`) and checkpoints need of a torch optimizer."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self):
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # this run's muon_lr and muon_ns_steps, not the saved ones (torch restores a group's settings)
        settings = [{key: group[key] for key in ("lr_ratio", "ns_steps")} for group in self.muon.param_groups]
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        for group, mine in zip(self.muon.param_groups, settings):
            group.update(mine)


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    """Fused AdamW over every parameter, or (optimizer="muon") MuonWithAdamW."""
    params = _unique_trainable(model.parameters())
    adamw_hyper = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                       fused=True)  # one kernel for all parameters: ~10x faster than foreach on CPU too
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(adamw_param_groups(params, cfg.weight_decay), **adamw_hyper)
    hidden = hidden_matrices(model, experts=cfg.muon_experts)
    if not hidden:
        raise ConfigError("optimizer muon needs hidden weight matrices (attention or feed-forward layers) and "
                          "this model has none: use --set optimizer=adamw")
    hidden_ids = {id(p) for p in hidden}
    muon = Muon([p for p in hidden if p.dim() == 2], [p for p in hidden if p.dim() == 3],
                lr=cfg.muon_lr or cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                nesterov=True, adjust_lr_fn=cfg.muon_adjust_lr, ns_steps=cfg.muon_ns_steps)
    for group in muon.param_groups:
        group["lr_ratio"] = (cfg.muon_lr or cfg.lr) / cfg.lr
    rest = [p for p in params if id(p) not in hidden_ids]
    return MuonWithAdamW(muon, torch.optim.AdamW(adamw_param_groups(rest, cfg.weight_decay), **adamw_hyper))


def load_optimizer_state(optimizer, state: dict[str, Any], ckpt_dir) -> None:
    """Load a checkpoint's optimizer state, refusing (clearly) one written by the other optimizer."""
    saved_muon = set(state) == {"muon", "adamw"}
    if saved_muon != isinstance(optimizer, MuonWithAdamW):
        saved, wanted = ("muon", "adamw") if saved_muon else ("adamw", "muon")
        raise CheckpointError(f"{ckpt_dir} was trained with optimizer {saved}; resume it with --set optimizer={saved} "
                              f"(not {wanted}), or start a new run")
    ckpt.load_into_optimizer(optimizer, state, ckpt_dir)
