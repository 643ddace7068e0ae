"""The optimizers: fused AdamW for everything, or Muon for the hidden matrices and AdamW for the rest.

Muon (Jordan 2024; Liu et al. 2025, "Muon is Scalable for LLM Training") orthogonalizes each weight
matrix's momentum with a Newton-Schulz iteration. It is meant for the matrices inside the blocks:
attention and feed-forward projections, shared experts, and every routed expert's two matrices,
each expert on its own (the experts are stored stacked as (E, in, out) tensors; orthogonalizing the
stack as one matrix would couple experts that never see the same tokens). Embeddings, the output
head, norms, biases and the router stay on AdamW, as in the papers.

torch.optim.Muon takes 2-D parameters only; `Muon` below also takes the stacked expert tensors and
gives them torch's update with the experts as a batch dimension: the same per-matrix math (one
Newton-Schulz per expert) in one batched product per iteration instead of a Python loop over every
expert's matrices, and the state stays one tensor per parameter, so checkpoints resume exactly.
"""

from __future__ import annotations

import math
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


def batched_newton_schulz(G: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                          eps: float) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration (bf16, the wide orientation, each matrix
    scaled by its own Frobenius norm) over a batch of matrices (B, rows, cols): each orthogonalized on
    its own."""
    a, b, c = coefficients
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    return X.mT if tall else X


def muon_lr_scale(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """torch.optim.Muon's per-matrix learning-rate factor: Jordan's sqrt(max(1, rows / cols))
    ("original"), or Moonlight's 0.2 * sqrt(max(rows, cols)), the RMS of AdamW's update."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


class Muon(torch.optim.Muon):
    """torch.optim.Muon that also takes stacked (E, rows, cols) expert weights, one matrix per expert.

    torch's constructor accepts matrices only, so the stacked tensors join afterwards as their own
    param group (`stacked=True`), which `_step_stacked` updates with the experts batched.
    """

    def __init__(self, matrices: list[nn.Parameter], stacked: list[nn.Parameter], **hyper: Any):
        super().__init__([{"params": matrices, "stacked": False}], **hyper)
        if stacked:
            self.add_param_group({"params": stacked, "stacked": True})

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs) -> bool:
        if group.get("stacked"):
            return False  # torch's loop gets none of them: _step_stacked updates them
        return super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if group.get("stacked"):
                self._step_stacked(group)
        return loss

    def _step_stacked(self, group: dict) -> None:
        """torch.optim.Muon's update (Nesterov momentum, Newton-Schulz, decoupled weight decay, the
        per-matrix lr adjustment), each expert's (rows, cols) slice as one matrix."""
        lr, momentum = float(group["lr"]), group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            update = batched_newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * muon_lr_scale(group["adjust_lr_fn"], *p.shape[-2:]))


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
