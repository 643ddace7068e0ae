"""The Mixture-of-Experts feed-forward layer: router -> dispatch -> experts -> combine.

The router (router.py) scores every token against every expert in fp32 and picks K experts and
their gate weights; the dispatch (dispatch.py) sorts the N*K assignments by expert, within each
expert's capacity; the experts (experts.py) run on their contiguous blocks; each token gathers its
K weighted results back. Optional shared experts (DeepSeekMoE) see every token. The balancing
losses and load statistics are returned explicitly (MoEStats), never kept as side effects.
`moe_forward_reference` is the same layer as a plain per-expert loop: the tests pin the fast path to it.

Shape legend (suffixes on tensor names):
    B batch   T time   N tokens (B*T)   D model width   E routed experts   K experts per token
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..kernels import Kernels, select
from .dispatch import dispatch_and_combine, expert_capacity
from .experts import GroupedExperts
from .router import Router, RouterOutput, expert_counts, load_balance_loss, router_z_loss


@dataclass
class MoEStats:
    """Auxiliary outputs of one MoE layer, returned explicitly so losses and analysis live outside."""

    load_balance_loss: torch.Tensor  # scalar, Switch Transformer eq. 4 (1.0 when perfectly uniform)
    z_loss: torch.Tensor  # scalar, ST-MoE eq. 5
    tokens_per_expert: torch.Tensor  # (E,) assignments each expert was chosen for (before dropping)
    router_probs: torch.Tensor  # (N, E) fp32
    expert_indices: torch.Tensor  # (N, K) int64
    dropped_fraction: torch.Tensor  # scalar: assignments dropped by the capacity limit / (N*K)




class MoEFeedForward(nn.Module):
    """Routed experts (+ optional always-on shared experts) replacing a dense feed-forward."""

    def __init__(self, config: ModelConfig, shared_expert: nn.Module | None = None, kernels: Kernels | None = None):
        super().__init__()
        kernels = kernels or select(config.kernels)
        self.n_experts = config.n_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.router_bias_update_rate = config.router_bias_update_rate
        self.router = Router(config, kernels)
        self.experts = GroupedExperts(config.n_experts, config.n_embd, config.expert_hidden, config.ffn, config.bias,
                                      kernels)
        self.shared_expert = shared_expert  # DeepSeekMoE: a dense FFN every token goes through

    @torch.no_grad()
    def init_weights(self, std: float, resid_std: float) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std, resid_std)
        if self.shared_expert is not None:
            self.shared_expert.init_weights(std, resid_std)

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """valid_BT: False at padding positions, which get no expert, take no capacity and count in
        no balancing loss or load statistic (their output is never read). None: all tokens are real."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        valid_N = None if valid_BT is None else valid_BT.reshape(B * T)
        routing = self.router(x_ND)
        out_ND, dropped_fraction = self._dispatch(x_ND, routing, valid_N)
        if self.shared_expert is not None:
            out_ND = out_ND + self.shared_expert(x_ND)
        stats = MoEStats(
            load_balance_loss=load_balance_loss(routing.router_probs_NE, routing.expert_indices_NK, valid_N),
            z_loss=router_z_loss(routing.router_logits_NE, valid_N, routing.logsumexp_N),
            tokens_per_expert=expert_counts(routing.expert_indices_NK, self.n_experts, valid_N),
            router_probs=routing.router_probs_NE,
            expert_indices=routing.expert_indices_NK,
            dropped_fraction=dropped_fraction,
        )
        return out_ND.reshape(B, T, D), stats

    def _dispatch(self, x_ND: torch.Tensor, routing: RouterOutput, valid_N: torch.Tensor | None):
        """The experts' combined output (N, D) and the fraction of assignments dropped (0-d tensor).
        Reads no value on the host: the real tokens and the capacity are counted on the device."""
        n_real = x_ND.shape[0] if valid_N is None else valid_N.sum()
        # Capacity limits bind only in training: at inference every token gets its experts, so an
        # output never depends on what else is in the batch (Mixtral and the HF export assume this).
        capacity = expert_capacity(n_real, self.top_k, self.n_experts, self.capacity_factor) if self.training else None
        out_ND, n_kept = dispatch_and_combine(
            x_ND, routing.expert_indices_NK, routing.expert_weights_NK, self.experts, capacity, valid_N
        )
        n_assignments = torch.as_tensor(n_real * self.top_k, device=x_ND.device)
        dropped = (n_assignments - n_kept).float() / n_assignments.clamp(min=1)
        return out_ND, dropped

    def update_selection_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        if self.router_bias_update_rate > 0:
            self.router.update_selection_bias(tokens_per_expert_E, self.router_bias_update_rate)


def moe_forward_reference(layer: MoEFeedForward, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Plain per-expert loop with boolean masks: slow, obviously correct; tests pin the fast path to it.

    Routing is recomputed by `layer.router`, so call both paths in eval mode (or with the same RNG
    state) when the router is noisy.
    """
    B, T, D = x_BTD.shape
    x_ND = x_BTD.reshape(B * T, D)
    routing = layer.router(x_ND)
    real_N = torch.ones(B * T, dtype=torch.bool) if valid_BT is None else valid_BT.reshape(-1).cpu()
    capacity = None
    if layer.training:
        capacity = expert_capacity(int(real_N.sum()), layer.top_k, layer.n_experts, layer.capacity_factor)
    out_ND = torch.zeros_like(x_ND)
    for e in range(layer.n_experts):
        # (token, k) pairs routed to e, first choices before second choices, as in the fast path
        chosen = routing.expert_indices_NK.cpu() == e
        pairs = [(n, k) for k in range(layer.top_k) for n in torch.nonzero(chosen[:, k] & real_N).flatten().tolist()]
        if capacity is not None:
            pairs = pairs[:capacity]
        if not pairs:
            continue
        tokens = torch.tensor([n for n, _ in pairs], device=x_ND.device)
        ranks = torch.tensor([k for _, k in pairs], device=x_ND.device)
        y = layer.experts.expert_forward(x_ND[tokens], e)
        out_ND = out_ND.index_add(0, tokens, routing.expert_weights_NK[tokens, ranks].unsqueeze(-1) * y)
    if layer.shared_expert is not None:
        out_ND = out_ND + layer.shared_expert(x_ND)
    return out_ND.reshape(B, T, D)
