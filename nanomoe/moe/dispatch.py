"""Dispatch: which expert-sorted row each token->expert assignment takes, with capacity and padding.

The plan sorts the N*K assignments by expert so each expert's tokens are one contiguous block of
rows; the experts run on their blocks and each token gathers its K weighted results back (the
combine). With a capacity (GShard / Switch) an expert takes at most ceil(cf * N * K / E)
assignments, first choices before second choices; each block is padded to the backend's row
multiple. No Python loop ever runs over tokens.

Shape legend: N tokens, D model width, E experts, K experts per token.
"""

from __future__ import annotations

import math

import torch

from ..kernels import compute_dtype
from .experts import GroupedExperts


def expert_capacity(n_tokens: int | torch.Tensor, top_k: int, n_experts: int,
                    capacity_factor: float) -> int | torch.Tensor | None:
    """Most assignments one expert accepts (GShard / Switch): ceil(cf * N * K / E). None = dropless.
    n_tokens may be a 0-d tensor (the real tokens, counted on the device): the capacity is then one
    too, computed in float64 as Python computes the int."""
    if capacity_factor <= 0:
        return None
    if isinstance(n_tokens, torch.Tensor):
        return torch.ceil(n_tokens.double() * capacity_factor * top_k / n_experts).clamp(min=1).long()
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def dispatch_and_combine(
    x_ND: torch.Tensor,
    expert_indices_NK: torch.Tensor,
    expert_weights_NK: torch.Tensor,
    experts: GroupedExperts,
    capacity: int | torch.Tensor | None,
    valid_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort assignments by expert, run each expert on its contiguous block, gather back weighted.

    Returns the combined output (N, D) and the number of assignments kept (N*K when dropless), a
    0-d tensor: nothing here reads a value on the host.
    With a capacity, first choices of all tokens outrank second choices (GShard), and within a rank
    earlier tokens win; assignments past an expert's capacity contribute nothing (the residual
    connection carries the token through unchanged).
    """
    kernels = experts.kernels
    row_multiple = kernels.row_multiple(x_ND.device, compute_dtype(x_ND, experts.w_in))
    plan = kernels.expert_plan(expert_indices_NK, experts.w_in.shape[0], capacity, row_multiple, valid_N)
    out_ND = experts(x_ND, expert_weights_NK.t(), plan)
    return out_ND, plan.n_kept
