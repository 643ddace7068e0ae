"""Dropless grouped expert feed-forward as one autograd Function with a hand-written backward.

Shape legend (as in moe.py):
    N  tokens      D  model width     E  experts     K  experts per token (top_k)
    H  expert hidden width            F  width of the input projection (H, or 2H for swiglu)
    A  assignments kept, sorted by expert (N*K when dropless)

Why a custom Function: on a CPU with fast bf16 matrix units (AMX) the matrix products of a small
MoE layer take ~half the time; the rest is memory passes. Plain autograd over a per-expert loop
pays for many avoidable ones: `w_in[e]` under autocast casts each expert's weights separately and
its backward materializes a zero (E, D, F) gradient per expert; `torch.cat` of the expert outputs
and of the [gate | up] gradient halves; `zeros` + `index_add_` to scatter back. Here:

- the stacked weights are cast to the compute dtype once per call, and their gradients are written
  straight into one (E, ...) buffer per weight with `torch.mm(..., out=slice)`;
- every expert reads and writes contiguous row slices of preallocated expert-sorted buffers;
- the combine is a gather, not a scatter: every assignment (k, n) knows its sorted row, so
  out[n] = sum_k gate[k, n] * y[row[k, n]] is an index_select, a broadcast multiply and a sum over
  K; dropped assignments (capacity) point at an extra all-zero row, so the same code serves both;
- the gate weights multiply the (A, D) expert outputs, the narrowest place to apply them;
- the activation backward is written out (one fused `silu_backward` / `threshold_backward` /
  `gelu_backward` kernel per term, results written into the halves of one buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ExpertPlan:
    """Where every assignment goes. Built once per forward from the router's choices."""

    token_A: torch.Tensor  # int64 (A,): token of each expert-sorted row
    slot_A: torch.Tensor  # int64 (A,): flat k-major assignment index k*N + n of each sorted row
    row_KN: torch.Tensor  # int64 (K*N,): sorted row of each assignment; A (the zero row) if dropped
    counts: list[int]  # rows of each expert, in expert order (sums to A)


def make_plan(expert_indices_NK: torch.Tensor, n_experts: int, capacity: int | None) -> ExpertPlan:
    """Sort the N*K assignments by expert; with a capacity, keep the first `capacity` of each expert.

    The flat order is k-major (all first choices, then all second choices) so the stable sort puts
    first choices ahead within each expert and capacity drops second choices first (GShard); within
    a rank, earlier tokens win.
    """
    N, K = expert_indices_NK.shape
    flat_expert = expert_indices_NK.t().reshape(-1)  # (K*N,)
    order = torch.argsort(flat_expert, stable=True)
    counts_E = torch.bincount(flat_expert, minlength=n_experts)
    if capacity is not None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts_E.repeat_interleave(counts_E)
        order = order[rank_in_expert < capacity]
        counts_E = counts_E.clamp(max=capacity)
    A = order.numel()
    row_KN = torch.full((N * K,), A, dtype=torch.long, device=order.device)
    row_KN[order] = torch.arange(A, device=order.device)
    return ExpertPlan(token_A=order % N, slot_A=order, row_KN=row_KN, counts=counts_E.tolist())


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the matrix products run in: autocast's when it is on (what F.linear would use)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, weight.dtype)


def grouped_ffn(
    x_ND: torch.Tensor,
    gate_KN: torch.Tensor,
    plan: ExpertPlan,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """out[n] = sum_k gate[k, n] * expert_{e(n,k)}(x[n]) over the kept assignments. Returns (N, D)."""
    dtype = compute_dtype(x_ND, w_in)
    return _GroupedFFN.apply(x_ND, gate_KN, w_in, w_out, b_in, b_out, plan, activation, dtype)


def _expert_slices(counts: list[int]):
    start = 0
    for e, c in enumerate(counts):
        if c > 0:
            yield e, slice(start, start + c)
        start += c


def _sum_over_k(rows_KND: torch.Tensor, gate_KN: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k gate[k] * rows[k] as K-1 fused adds: much faster than .sum(0) over a leading dim of 2."""
    if gate_KN is None:
        out_ND = rows_KND[0].clone() if rows_KND.shape[0] == 1 else rows_KND[0] + rows_KND[1]
        for k in range(2, rows_KND.shape[0]):
            out_ND.add_(rows_KND[k])
        return out_ND
    gate_KN1 = gate_KN.to(rows_KND.dtype).unsqueeze(-1)
    out_ND = rows_KND[0] * gate_KN1[0]
    for k in range(1, rows_KND.shape[0]):
        out_ND.addcmul_(rows_KND[k], gate_KN1[k])
    return out_ND


class _GroupedFFN(torch.autograd.Function):
    """Inputs and outputs in token order; everything in between in expert-sorted row order.

    For swiglu the gate and up halves of the input projection are computed as two products into two
    (A, H) buffers (instead of one (A, 2H) buffer split by views), so the elementwise kernels see
    contiguous tensors and no buffer reaches the 32 MiB at which glibc's malloc switches to a fresh
    mmap (page-faulted anew on every call) at the benchmark shape in bf16.
    """

    @staticmethod
    def forward(ctx, x_ND, gate_KN, w_in, w_out, b_in, b_out, plan: ExpertPlan, activation: str, dtype):
        with torch.autocast(x_ND.device.type, enabled=False):
            N, D = x_ND.shape
            K = gate_KN.shape[0]
            A = plan.token_A.numel()
            H = w_out.shape[1]
            # one cast per weight per call (autocast would cast every expert slice separately)
            w_in_c, w_out_c = w_in.to(dtype), w_out.to(dtype)
            b_in_c = b_in.to(dtype) if b_in is not None else None
            b_out_c = b_out.to(dtype) if b_out is not None else None
            glu = activation == "swiglu"

            x_AD = x_ND.to(dtype).index_select(0, plan.token_A)
            # h: the (first half of the) input projection; u: the swiglu "up" half
            h_AH = x_AD.new_empty(A, H)
            u_AH = x_AD.new_empty(A, H) if glu else None
            for e, rows in _expert_slices(plan.counts):
                _linear(x_AD[rows], w_in_c[e, :, :H], None if b_in_c is None else b_in_c[e, :H], h_AH[rows])
                if glu:
                    _linear(x_AD[rows], w_in_c[e, :, H:], None if b_in_c is None else b_in_c[e, H:], u_AH[rows])
            s_AH = None
            if glu:
                s_AH = F.silu(h_AH)
                a_AH = s_AH * u_AH
            elif activation == "relu":
                a_AH = F.relu(h_AH)
            else:
                a_AH = F.gelu(h_AH, approximate="tanh")

            # one spare all-zero row at the end: where dropped assignments point
            y_AD = x_AD.new_empty(A + 1, D)
            y_AD[A].zero_()
            for e, rows in _expert_slices(plan.counts):
                _linear(a_AH[rows], w_out_c[e], None if b_out_c is None else b_out_c[e], y_AD[rows])

            y_KND = y_AD.index_select(0, plan.row_KN).view(K, N, D)
            out_ND = _sum_over_k(y_KND, gate_KN)

        ctx.save_for_backward(x_AD, h_AH, u_AH, s_AH, a_AH, y_KND, gate_KN, w_in_c, w_out_c)
        ctx.plan, ctx.activation, ctx.has_bias = plan, activation, b_in is not None
        ctx.dtypes = (x_ND.dtype, w_in.dtype, w_out.dtype, None if b_in is None else b_in.dtype)
        return out_ND

    @staticmethod
    def backward(ctx, dout_ND):
        x_AD, h_AH, u_AH, s_AH, a_AH, y_KND, gate_KN, w_in_c, w_out_c = ctx.saved_tensors
        plan: ExpertPlan = ctx.plan
        x_dtype, w_in_dtype, w_out_dtype, b_dtype = ctx.dtypes
        dtype = x_AD.dtype
        A, D = x_AD.shape
        K, N = gate_KN.shape
        H = h_AH.shape[1]
        glu = ctx.activation == "swiglu"
        dout_ND = dout_ND.to(dtype)

        # combine: out = sum_k gate_k * y_k
        dgate_KN = None
        if ctx.needs_input_grad[1]:
            dgate_KN = (y_KND * dout_ND).sum(-1, dtype=torch.float32).to(gate_KN.dtype)
        # dy of every sorted row: the gate of its assignment times the output gradient of its token
        gate_A1 = gate_KN.reshape(-1).index_select(0, plan.slot_A).to(dtype).unsqueeze(-1)
        dy_AD = dout_ND.index_select(0, plan.token_A).mul_(gate_A1)

        # down projection
        da_AH = torch.empty_like(a_AH)
        dw_out = torch.empty_like(w_out_c)
        for e, rows in _expert_slices(plan.counts):
            torch.mm(dy_AD[rows], w_out_c[e].t(), out=da_AH[rows])
            torch.mm(a_AH[rows].t(), dy_AD[rows], out=dw_out[e])

        # activation, written into da's buffer where possible (da is not needed afterwards)
        du_AH = None
        if glu:  # a = silu(h) * u:  dh = silu'(h) * u * da,  du = silu(h) * da
            du_AH = da_AH * s_AH
            dh_AH = torch.ops.aten.silu_backward(da_AH.mul_(u_AH), h_AH, grad_input=da_AH)
        elif ctx.activation == "relu":
            dh_AH = torch.ops.aten.threshold_backward(da_AH, a_AH, 0, grad_input=da_AH)  # a > 0 exactly where h > 0
        else:
            dh_AH = torch.ops.aten.gelu_backward(da_AH, h_AH, approximate="tanh", grad_input=da_AH)

        # input projection; the spare last row of dx_AD stays zero for the dropped assignments
        dx_AD = x_AD.new_empty(A + 1, D)
        dx_AD[A].zero_()
        dw_in = torch.empty_like(w_in_c)
        for e, rows in _expert_slices(plan.counts):
            torch.mm(dh_AH[rows], w_in_c[e, :, :H].t(), out=dx_AD[rows])
            torch.mm(x_AD[rows].t(), dh_AH[rows], out=dw_in[e, :, :H])
            if glu:
                torch.addmm(dx_AD[rows], du_AH[rows], w_in_c[e, :, H:].t(), out=dx_AD[rows])
                torch.mm(x_AD[rows].t(), du_AH[rows], out=dw_in[e, :, H:])
        for e, c in enumerate(plan.counts):
            if c == 0:  # an expert with no tokens gets an exactly zero gradient
                dw_in[e].zero_()
                dw_out[e].zero_()
        dx_ND = _sum_over_k(dx_AD.index_select(0, plan.row_KN).view(K, N, D))

        db_in = db_out = None
        if ctx.has_bias:
            db_in = torch.zeros(w_in_c.shape[0], w_in_c.shape[2], dtype=torch.float32, device=x_AD.device)
            db_out = torch.zeros(w_out_c.shape[0], D, dtype=torch.float32, device=x_AD.device)
            for e, rows in _expert_slices(plan.counts):
                db_in[e, :H] = dh_AH[rows].sum(0, dtype=torch.float32)
                if glu:
                    db_in[e, H:] = du_AH[rows].sum(0, dtype=torch.float32)
                db_out[e] = dy_AD[rows].sum(0, dtype=torch.float32)
            db_in, db_out = db_in.to(b_dtype), db_out.to(b_dtype)

        return (
            dx_ND.to(x_dtype),
            dgate_KN,
            dw_in.to(w_in_dtype),
            dw_out.to(w_out_dtype),
            db_in,
            db_out,
            None,
            None,
            None,
        )


def _linear(x, w, b, out):
    """out = x @ w (+ b), written into `out` (a row slice of a preallocated buffer)."""
    if b is None:
        torch.mm(x, w, out=out)
    else:
        torch.addmm(b, x, w, out=out)
