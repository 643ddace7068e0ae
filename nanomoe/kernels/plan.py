"""The dispatch plan: where each token->expert assignment goes in the expert-sorted buffers.

`expert_plan` is the op's definition (a stable sort); the native backend computes the same plan as
one counting sort (csrc/experts.cpp), held to this one by tests/test_native_experts.py.

Shape legend: N tokens, K experts per token, E experts, R rows of the expert-sorted buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertPlan:
    """Where every assignment goes. Built once per forward from the router's choices."""

    token_R: torch.Tensor  # int64 (R,): token of each expert-sorted row (0 for padding rows)
    slot_R: torch.Tensor  # int64 (R,): flat k-major assignment k*N + n of each row (K*N for padding)
    row_KN: torch.Tensor  # int64 (K*N,): row of each assignment; R (a spare zero row) if dropped
    rows_per_expert: list[int]  # size of each expert's block of rows, padding included (sums to R)
    n_kept: int  # assignments that survived the capacity limit (N*K when dropless)


def expert_plan(
    expert_indices_NK: torch.Tensor,
    n_experts: int,
    capacity: int | None,
    row_multiple: int = 1,
    valid_N: torch.Tensor | None = None,
) -> ExpertPlan:
    """Sort the N*K assignments by expert; with a capacity, keep the first `capacity` of each expert.

    The flat order is k-major (all first choices, then all second choices) so the stable sort puts
    first choices ahead within each expert and capacity drops second choices first (GShard); within
    a rank, earlier tokens win. Each expert's block is padded to a multiple of `row_multiple` rows.
    Tokens with valid_N False (padding) are dropped: no expert computes them and they take no capacity.
    """
    N, K = expert_indices_NK.shape
    device = expert_indices_NK.device
    flat_expert = expert_indices_NK.t().reshape(-1)  # (K*N,)
    if valid_N is not None:  # padding goes to a sentinel expert that sorts last and is cut off
        flat_expert = torch.where(valid_N.repeat(K), flat_expert, n_experts)
    order = torch.argsort(flat_expert, stable=True)
    counts_E = torch.bincount(flat_expert, minlength=n_experts + 1)[:n_experts]
    if valid_N is not None:
        order = order[: int(counts_E.sum())]
    if capacity is not None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_in_expert = torch.arange(order.numel(), device=device) - starts_E.repeat_interleave(counts_E)
        order = order[rank_in_expert < capacity]
        counts_E = counts_E.clamp(max=capacity)
    n_kept = order.numel()
    padded_E = (counts_E + row_multiple - 1) // row_multiple * row_multiple
    # row of the i-th kept assignment = i + (padding rows of the experts before its own)
    shift_E = (torch.cumsum(padded_E, 0) - padded_E) - (torch.cumsum(counts_E, 0) - counts_E)
    row_A = torch.arange(n_kept, device=device) + shift_E.repeat_interleave(counts_E)
    rows_per_expert = padded_E.tolist()
    R = sum(rows_per_expert)

    token_R = torch.zeros(R, dtype=torch.long, device=device)
    token_R[row_A] = order % N
    slot_R = torch.full((R,), N * K, dtype=torch.long, device=device)
    slot_R[row_A] = order
    row_KN = torch.full((N * K,), R, dtype=torch.long, device=device)
    row_KN[order] = row_A
    return ExpertPlan(token_R, slot_R, row_KN, rows_per_expert, n_kept)
