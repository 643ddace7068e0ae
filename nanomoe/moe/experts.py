"""The routed experts: E independent feed-forward nets with stacked weights.

`GroupedExperts.expert_forward` is the definition: expert e is an ordinary feed-forward net applied
to its tokens' rows. `forward` computes every expert at once over an expert-sorted plan
(dispatch.py) through the grouped-FFN kernel (nanomoe/kernels); tests/test_moe.py holds it to a
plain per-expert loop over `expert_forward` (layer.moe_forward_reference).

Shape legend: N tokens, D model width, E experts, K experts per token, H expert hidden width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import ExpertPlan, Kernels


class GroupedExperts(nn.Module):
    """E independent feed-forward nets with stacked weights, one parameter per matrix:

    w_in:  (E, D, H) for relu/gelu, (E, D, 2H) for swiglu ([gate | up])
    w_out: (E, H, D)
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, activation: str, bias: bool, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.activation = activation
        in_width = 2 * hidden if activation == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.empty(n_experts, dim, in_width))
        self.w_out = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.b_in = nn.Parameter(torch.empty(n_experts, in_width)) if bias else None
        self.b_out = nn.Parameter(torch.empty(n_experts, dim)) if bias else None

    @torch.no_grad()
    def init_weights(self, std: float, resid_std: float) -> None:
        """w_out feeds the residual stream: resid_std, as for the dense FFN's output projection."""
        nn.init.normal_(self.w_in, mean=0.0, std=std)
        nn.init.normal_(self.w_out, mean=0.0, std=resid_std)
        if self.b_in is not None:
            nn.init.zeros_(self.b_in)
            nn.init.zeros_(self.b_out)

    def forward(self, x_ND: torch.Tensor, gate_KN: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
        """sum_k gate[k, n] * expert_{e(n,k)}(x[n]) for every token n, over the assignments in `plan`:
        expert-sorted buffers, one matrix product per expert and weight matrix."""
        return self.kernels.grouped_ffn(x_ND, gate_KN, plan, self.w_in, self.w_out, self.b_in, self.b_out,
                                        self.activation)

    def expert_forward(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e applied to every row of x: the definition `forward` is held to."""
        h = x_ND @ self.w_in[e]
        if self.b_in is not None:
            h = h + self.b_in[e]
        y = self.kernels.activation(h, self.activation) @ self.w_out[e]
        if self.b_out is not None:
            y = y + self.b_out[e]
        return y
