"""The router: scores every token against every expert (in fp32), picks K experts and their gate
weights; and the balancing losses computed from its outputs.

Shape legend: N tokens (batch and time flattened), E routed experts, K experts chosen per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels import Kernels


@dataclass
class RouterOutput:
    expert_indices_NK: torch.Tensor  # int64, chosen experts, best first
    expert_weights_NK: torch.Tensor  # fp32 gate weight of each chosen expert
    router_probs_NE: torch.Tensor  # fp32 softmax over all experts (used by the balancing loss)
    router_logits_NE: torch.Tensor  # fp32 clean logits, before noise (used by the z-loss)
    logsumexp_N: torch.Tensor | None = None  # logsumexp of the clean logits when the router has it



# ---------------------------------------------------------------------------------------------
# Balancing losses (standalone so they can be tested against their formulas)


def expert_counts(expert_indices_NK: torch.Tensor, n_experts: int, valid_N: torch.Tensor | None = None) -> torch.Tensor:
    """Assignments per expert (int64, (E,)), counting only tokens with valid_N True when given.

    A scatter-add rather than torch.bincount: the output shape does not depend on the data, so
    torch.compile traces it without breaking the graph."""
    ones_NK = torch.ones_like(expert_indices_NK)
    if valid_N is not None:
        ones_NK = ones_NK * valid_N.unsqueeze(-1)
    counts_E = torch.zeros(n_experts, dtype=torch.long, device=expert_indices_NK.device)
    return counts_E.scatter_add_(0, expert_indices_NK.reshape(-1), ones_NK.reshape(-1))


def _masked_mean(values_N: torch.Tensor, valid_N: torch.Tensor | None) -> torch.Tensor:
    """Mean over the first dim of the rows with valid_N True (0 when there are none)."""
    if valid_N is None:
        return values_N.mean(dim=0)
    weights = valid_N.to(values_N.dtype).reshape(-1, *([1] * (values_N.dim() - 1)))
    return (values_N * weights).sum(dim=0) / weights.sum().clamp(min=1)


def load_balance_loss(
    router_probs_NE: torch.Tensor, expert_indices_NK: torch.Tensor, valid_N: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eqs. 4-6), generalized to top-k.

    loss = E * sum_i f_i * P_i, with f_i the fraction of the N*K assignments sent to expert i and
    P_i the mean router probability of expert i. Equals 1.0 for perfectly uniform routing and grows
    with imbalance; gradients flow through P only (f is a count). valid_N: only these tokens count
    (padding does not); 0 when there are none.
    """
    N, n_experts = router_probs_NE.shape
    if N == 0:  # no tokens at all
        return router_probs_NE.sum() * 0.0
    counts_E = expert_counts(expert_indices_NK, n_experts, valid_N)
    f_E = counts_E.to(router_probs_NE.dtype) / counts_E.sum().clamp(min=1)
    p_E = _masked_mean(router_probs_NE, valid_N)
    return n_experts * torch.sum(f_E * p_E)


def router_z_loss(
    router_logits_NE: torch.Tensor, valid_N: torch.Tensor | None = None, logsumexp_N: torch.Tensor | None = None
) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.

    Penalizes large router logits, which make the fp32 softmax (and bf16 training) unstable.
    valid_N: only these tokens count; 0 when there are none. logsumexp_N: the logits' logsumexp if
    the router computed it already (its softmax needs it).
    """
    if router_logits_NE.shape[0] == 0:
        return router_logits_NE.sum() * 0.0
    if logsumexp_N is None:
        logsumexp_N = torch.logsumexp(router_logits_NE, dim=-1)
    return _masked_mean(logsumexp_N.pow(2), valid_N)


# ---------------------------------------------------------------------------------------------
# Router


def _softmax_over_experts(scores_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over the last dim, as exp(x - logsumexp(x)), and the logsumexp: with only E entries
    per row torch's softmax kernel (vectorized along that dim) is ~5x slower, forward and backward."""
    lse_N1 = torch.logsumexp(scores_NE, dim=-1, keepdim=True)
    return torch.exp(scores_NE - lse_N1), lse_N1.squeeze(-1)


class Router(nn.Module):
    """Scores tokens against experts and picks the top-k.

    - "noisy_topk" (Shazeer et al. 2017, eqs. 3-5): H = x W_g + N(0,1) * softplus(x W_noise), noise
      only in training; gates = softmax over the K kept logits.
    - "topk" (Mixtral): softmax over all experts, keep K, renormalize the kept probabilities.
    - "switch" (Fedus et al. 2021): softmax over all experts, keep K (1 by default), gates are the
      raw probabilities (not renormalized), so top-1 routing still trains the router.

    `selection_bias` implements DeepSeek-V3's auxiliary-loss-free balancing: it is added to the
    scores only to choose experts, never to the gate weights, and is nudged by
    `update_selection_bias` after each optimizer step (a buffer, not a parameter).
    """

    def __init__(self, config: ModelConfig, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.kind = config.router
        self.top_k = config.top_k
        self.n_experts = config.n_experts
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.noise = nn.Linear(config.n_embd, config.n_experts, bias=False) if self.kind == "noisy_topk" else None
        self.register_buffer("selection_bias", torch.zeros(config.n_experts), persistent=True)

    def forward(self, x_ND: torch.Tensor) -> RouterOutput:
        # Router math in fp32: routing decisions hinge on small logit differences that bf16 rounds away.
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            x_ND = x_ND.float()
            logits_NE = F.linear(x_ND, self.gate.weight.float())
            if self.kind != "noisy_topk":
                indices_NK, weights_NK, probs_NE, lse_N = self.kernels.route(
                    logits_NE, self.selection_bias, self.top_k, self.kind == "topk"
                )
                return RouterOutput(indices_NK, weights_NK, probs_NE, logits_NE, lse_N)
            # noisy top-k: the gates are a softmax over the K kept (noisy) scores
            scores_NE = logits_NE
            if self.training:
                noise_std_NE = F.softplus(F.linear(x_ND, self.noise.weight.float()))
                scores_NE = logits_NE + torch.randn_like(logits_NE) * noise_std_NE
            probs_NE, scores_lse_N = _softmax_over_experts(scores_NE)
            lse_N = None if self.training else scores_lse_N  # of the clean logits only
            _, indices_NK = torch.topk(scores_NE + self.selection_bias, self.top_k, dim=-1)
            weights_NK = F.softmax(scores_NE.gather(-1, indices_NK), dim=-1)
        return RouterOutput(indices_NK, weights_NK, probs_NE, logits_NE, lse_N)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.gate.weight, mean=0.0, std=std)
        if self.noise is not None:  # Shazeer et al.: the noise std starts at softplus(0)
            nn.init.zeros_(self.noise.weight)
        self.selection_bias.zero_()

    @torch.no_grad()
    def update_selection_bias(self, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3 (Liu et al. 2024, sec. 2.1.2): raise the bias of under-loaded experts and lower
        it for over-loaded ones by a fixed step `rate`."""
        load_E = tokens_per_expert_E.float()
        self.selection_bias.add_(rate * torch.sign(load_E.mean() - load_E))
