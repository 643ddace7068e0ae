"""The dispatch plan: where each token->expert assignment goes in the expert-sorted buffers.

`expert_plan` is the op's definition (a stable sort). It is sync-free: every shape depends only on
N, K, E, the row multiple and a static capacity, never on the routing, so it runs on a GPU without
waiting for it and torch.compile traces it into one graph. The buffers therefore have a static
number of rows R (`rows_bound`); the rows after the last expert's block are unused. The native
backend computes the same plan as one counting sort (csrc/experts.cpp) with R exact, held to this
one by tests/test_native_experts.py.

Shape legend: N tokens, K experts per token, E experts, R rows of the expert-sorted buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertPlan:
    """Where every assignment goes. Built once per forward from the router's choices."""

    token_R: torch.Tensor  # int64 (R,): token of each expert-sorted row (0 for padding and unused rows)
    slot_R: torch.Tensor  # int64 (R,): flat k-major assignment k*N + n of each row (K*N for padding/unused)
    row_KN: torch.Tensor  # int64 (K*N,): row of each assignment; R (a spare zero row) if dropped
    offsets_E: torch.Tensor  # int32 (E,): end row of each expert's block (padding included), grouped_mm's `offs`
    n_kept: torch.Tensor  # int64 0-d: assignments that survived the capacity limit (N*K when dropless)

    def rows_per_expert(self) -> list[int]:
        """Each expert's block size, read on the host (a device sync off the CPU): for the
        implementations that loop over experts."""
        return block_sizes(self.offsets_E)


def block_sizes(offsets_E: torch.Tensor) -> list[int]:
    """Block sizes from end offsets, read on the host."""
    ends = offsets_E.tolist()
    return [end - start for start, end in zip([0, *ends[:-1]], ends)]


def round_up(n, multiple: int):
    """n rounded up to a multiple of `multiple` (ints or integer tensors)."""
    return (n + multiple - 1) // multiple * multiple


def rows_bound(n_assignments: int, n_experts: int, capacity: int | torch.Tensor | None, row_multiple: int) -> int:
    """Rows of a sync-free plan's buffers: at most every assignment plus each block's padding, and at
    most E full blocks when a static capacity is smaller."""
    bound = n_assignments + n_experts * (row_multiple - 1)
    if isinstance(capacity, int):
        bound = min(bound, n_experts * round_up(capacity, row_multiple))
    return bound


def expert_plan(
    expert_indices_NK: torch.Tensor,
    n_experts: int,
    capacity: int | torch.Tensor | None,
    row_multiple: int = 1,
    valid_N: torch.Tensor | None = None,
) -> ExpertPlan:
    """Sort the N*K assignments by expert; with a capacity, keep the first `capacity` of each expert.

    The flat order is k-major (all first choices, then all second choices) so the stable sort puts
    first choices ahead within each expert and capacity drops second choices first (GShard); within
    a rank, earlier tokens win. Each expert's block is padded to a multiple of `row_multiple` rows.
    Tokens with valid_N False (padding) are dropped: no expert computes them and they take no capacity.
    `capacity` may be a 0-d tensor (computed on the device from the number of real tokens).
    """
    N, K = expert_indices_NK.shape
    E, A = n_experts, N * K
    device = expert_indices_NK.device
    flat_expert_A = expert_indices_NK.t().reshape(-1)
    if valid_N is not None:  # padding goes to a sentinel expert E that sorts last and is never kept
        flat_expert_A = torch.where(valid_N.repeat(K), flat_expert_A, E)
    order_A = torch.argsort(flat_expert_A, stable=True)  # assignment of each sorted position
    expert_A = flat_expert_A[order_A]
    counts_E1 = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(
        0, flat_expert_A, torch.ones_like(flat_expert_A))
    rank_A = torch.arange(A, device=device) - (torch.cumsum(counts_E1, 0) - counts_E1)[expert_A]  # within its expert
    keep_A = expert_A < E
    kept_E = counts_E1[:E]
    if capacity is not None:
        keep_A = keep_A & (rank_A < capacity)
        kept_E = kept_E.clamp(max=capacity)
    padded_E = round_up(kept_E, row_multiple)
    ends_E = torch.cumsum(padded_E, 0)
    R = rows_bound(A, E, capacity, row_multiple)
    # dropped assignments take row R: a spare slot of the scatters below, and the combine's zero row
    row_A = torch.where(keep_A, (ends_E - padded_E)[expert_A.clamp(max=E - 1)] + rank_A, R)

    token_R = torch.zeros(R + 1, dtype=torch.long, device=device).scatter_(0, row_A, order_A % N)[:R]
    slot_R = torch.full((R + 1,), A, dtype=torch.long, device=device).scatter_(0, row_A, order_A)[:R]
    row_KN = torch.empty(A, dtype=torch.long, device=device).scatter_(0, order_A, row_A)
    return ExpertPlan(token_R, slot_R, row_KN, ends_E.to(torch.int32), kept_E.sum())
