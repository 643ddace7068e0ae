"""Grouped expert feed-forward: one autograd Function with a hand-written backward.

Shape legend (as in moe.py):
    N  tokens      D  model width     E  experts     K  experts per token (top_k)
    H  expert hidden width            R  rows of the expert-sorted buffers (kept assignments,
                                         each expert's block padded to a multiple of `row_multiple`)

Every buffer between the dispatch gather and the combine gather is in expert-sorted row order:
expert e owns one contiguous block of rows, and each matrix product is one `torch.mm` on that block,
written into a preallocated buffer with `out=`. Why a custom Function rather than autograd over that
loop: with bf16 matrix units (AMX) the matrix products of a small MoE layer are only about half of
its time; the rest is memory passes and allocations, and plain autograd adds many:

- `w_in[e]` under autocast casts every expert's weights separately, and the backward of `w_in[e]`
  writes a full-size zero (E, D, F) gradient per expert; here the stacked weights are cast once per
  call, and their gradients are written in place into one (E, ...) buffer per weight;
- `torch.cat` of expert outputs and of the swiglu [gate | up] gradient halves: gone. The two halves
  are two products into two (R, H) buffers, which keeps every elementwise kernel on contiguous data;
- `zeros` + `index_add_` to scatter back: the combine is a gather instead. Every assignment (k, n)
  knows its row, so out[n] = sum_k gate[k, n] * y[row[k, n]] is one index_select, a multiply and K-1
  fused multiply-adds; dropped assignments point at a spare all-zero row, so capacity costs nothing;
- the gate weights scale the (R, D) expert outputs, the narrowest tensor they can go on;
- the activation backward is written out with one fused kernel per term, in place where the
  input is dead (`silu_backward`, `threshold_backward`, `gelu_backward`).

Row padding: oneDNN (torch's CPU bf16 matmul) JIT-compiles a kernel for every new matrix shape,
~4 ms each on the 2-core machine against ~0.4 ms for the product itself. Expert loads change every
step, so unpadded blocks would compile new kernels all training long; blocks rounded up to 32 rows
keep the set of shapes small. Padding rows gather token 0 and carry gate weight 0, so their outputs
are never read and their gradients are exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ExpertPlan:
    """Where every assignment goes. Built once per forward from the router's choices."""

    token_R: torch.Tensor  # int64 (R,): token of each expert-sorted row (0 for padding rows)
    slot_R: torch.Tensor  # int64 (R,): flat k-major assignment k*N + n of each row (K*N for padding)
    row_KN: torch.Tensor  # int64 (K*N,): row of each assignment; R (a spare zero row) if dropped
    rows_per_expert: list[int]  # size of each expert's block of rows, padding included (sums to R)
    n_kept: int  # assignments that survived the capacity limit (N*K when dropless)


def make_plan(
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
    native = _native_module(expert_indices_NK, torch.float32)
    if native is not None:  # the same plan as one counting sort (csrc/experts.cpp)
        token_R, slot_R, row_KN, rows_per_expert, n_kept = native.experts_plan(
            expert_indices_NK.long(), n_experts, -1 if capacity is None else capacity, row_multiple,
            _NONE if valid_N is None else valid_N,
        )
        return ExpertPlan(token_R, slot_R, row_KN, rows_per_expert, n_kept)
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


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the matrix products run in: autocast's when it is on (what F.linear would use)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, weight.dtype)


def row_multiple_for(device: torch.device, dtype: torch.dtype) -> int:
    """Expert blocks are padded to this many rows: 32 where matmul kernels are compiled per shape
    (oneDNN, CPU half precision), 1 elsewhere (MKL fp32 and cuBLAS pick kernels without compiling)."""
    return 32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 1


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
    """out[n] = sum_k gate[k, n] * expert_{e(n,k)}(x[n]) over the kept assignments. Returns (N, D).

    w_in (E, D, H), or (E, D, 2H) [gate | up] for swiglu; w_out (E, H, D); b_in, b_out optional.
    Runs in autocast's dtype when autocast is on; gradients come back in each input's own dtype.
    """
    dtype = compute_dtype(x_ND, w_in)
    return _GroupedFFN.apply(x_ND, gate_KN, w_in, w_out, b_in, b_out, plan, activation, dtype)


def _per_expert(t: torch.Tensor | None, dim: int = 0):
    """Per-expert views of a stacked (E, ...) tensor, made in one call (indexing in the loops below
    would cost a few slicing ops per expert and product, a visible share of the layer's time)."""
    return None if t is None else t.unbind(dim)


def _linear(x, w, b, out):
    """out = x @ w (+ b), written into `out` (a block of a preallocated buffer)."""
    if b is None:
        torch.mm(x, w, out=out)
    else:
        torch.addmm(b, x, w, out=out)


def _sum_over_k(rows_KND: torch.Tensor, gate_KN: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k gate[k] * rows[k] as K-1 fused adds (.sum(0) over a leading dim of 2 is ~5x slower)."""
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
    @staticmethod
    def forward(ctx, x_ND, gate_KN, w_in, w_out, b_in, b_out, plan: ExpertPlan, activation: str, dtype):
        ctx.native = _native_module(x_ND, dtype, x_ND, w_in, w_out, b_in, b_out) if x_ND.shape[0] else None
        if ctx.native is not None:
            return _native_forward(ctx, x_ND, gate_KN, w_in, w_out, b_in, b_out, plan, activation, dtype)
        with torch.autocast(x_ND.device.type, enabled=False):
            N, D = x_ND.shape
            K = gate_KN.shape[0]
            R = plan.token_R.numel()
            H = w_out.shape[1]
            glu = activation == "swiglu"
            # one cast per weight per call (autocast would cast every expert's slice separately)
            w_in_c, w_out_c = w_in.to(dtype), w_out.to(dtype)
            b_in_c = b_in.to(dtype) if b_in is not None else None
            b_out_c = b_out.to(dtype) if b_out is not None else None

            sizes = plan.rows_per_expert
            active = [e for e, n in enumerate(sizes) if n > 0]
            x_RD = x_ND.to(dtype).index_select(0, plan.token_R)  # dispatch: a gather
            h_RH = x_RD.new_empty(R, H)  # input projection (for swiglu: its gate half)
            u_RH = x_RD.new_empty(R, H) if glu else None  # swiglu's up half
            xs, hs = x_RD.split(sizes), h_RH.split(sizes)
            w_h, b_h = _per_expert(w_in_c[:, :, :H]), _per_expert(None if b_in_c is None else b_in_c[:, :H])
            for e in active:
                _linear(xs[e], w_h[e], None if b_h is None else b_h[e], hs[e])
            if glu:
                us = u_RH.split(sizes)
                w_u, b_u = _per_expert(w_in_c[:, :, H:]), _per_expert(None if b_in_c is None else b_in_c[:, H:])
                for e in active:
                    _linear(xs[e], w_u[e], None if b_u is None else b_u[e], us[e])
            s_RH = None
            if glu:
                s_RH = F.silu(h_RH)
                a_RH = s_RH * u_RH
            elif activation == "relu":
                a_RH = F.relu(h_RH)
            else:
                a_RH = F.gelu(h_RH, approximate="tanh")

            y_RD = x_RD.new_empty(R + 1, D)  # + the zero row that dropped assignments read
            y_RD[R].zero_()
            as_, ys = a_RH.split(sizes), y_RD[:R].split(sizes)
            w_o, b_o = _per_expert(w_out_c), _per_expert(b_out_c)
            for e in active:
                _linear(as_[e], w_o[e], None if b_o is None else b_o[e], ys[e])

            y_KND = y_RD.index_select(0, plan.row_KN).view(K, N, D)  # combine: a gather
            out_ND = _sum_over_k(y_KND, gate_KN)

        ctx.save_for_backward(x_RD, h_RH, u_RH, s_RH, a_RH, y_KND, gate_KN, w_in_c, w_out_c)
        ctx.plan, ctx.activation, ctx.has_bias = plan, activation, b_in is not None
        ctx.dtypes = (x_ND.dtype, w_in.dtype, w_out.dtype, None if b_in is None else b_in.dtype)
        return out_ND

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward is not itself differentiable
    def backward(ctx, dout_ND):
        if ctx.native is not None:
            return _native_backward(ctx, dout_ND)
        x_RD, h_RH, u_RH, s_RH, a_RH, y_KND, gate_KN, w_in_c, w_out_c = ctx.saved_tensors
        plan: ExpertPlan = ctx.plan
        x_dtype, w_in_dtype, w_out_dtype, b_dtype = ctx.dtypes
        dtype = x_RD.dtype
        R, D = x_RD.shape
        K, N = gate_KN.shape
        H = h_RH.shape[1]
        glu = ctx.activation == "swiglu"
        sizes = plan.rows_per_expert
        active = [e for e, n in enumerate(sizes) if n > 0]
        dout_ND = dout_ND.to(dtype)

        dgate_KN = None
        if ctx.needs_input_grad[1]:  # out = sum_k gate_k * y_k
            # (sum accumulates in fp32 internally; asking for an fp32 result would upcast first, 3x slower)
            dgate_KN = (y_KND * dout_ND).sum(-1).to(gate_KN.dtype)
        # dy of every row: its token's output gradient times its gate (0 on padding rows)
        gate_R1 = torch.cat([gate_KN.reshape(-1), gate_KN.new_zeros(1)]).index_select(0, plan.slot_R)
        dy_RD = dout_ND.index_select(0, plan.token_R).mul_(gate_R1.to(dtype).unsqueeze(-1))

        # down projection
        da_RH = torch.empty_like(a_RH)
        dw_out = torch.empty_like(w_out_c)
        dys, as_, das = dy_RD.split(sizes), a_RH.split(sizes), da_RH.split(sizes)
        w_o, dw_o = _per_expert(w_out_c.transpose(1, 2)), _per_expert(dw_out)
        for e in active:
            torch.mm(dys[e], w_o[e], out=das[e])
            torch.mm(as_[e].t(), dys[e], out=dw_o[e])

        # activation, in da's buffer (da is dead afterwards)
        du_RH = None
        if glu:  # a = silu(h) * u:  dh = silu'(h) * u * da,  du = silu(h) * da
            du_RH = da_RH * s_RH
            dh_RH = torch.ops.aten.silu_backward(da_RH.mul_(u_RH), h_RH, grad_input=da_RH)
        elif ctx.activation == "relu":  # a > 0 exactly where h > 0
            dh_RH = torch.ops.aten.threshold_backward(da_RH, a_RH, 0, grad_input=da_RH)
        else:
            dh_RH = torch.ops.aten.gelu_backward(da_RH, h_RH, approximate="tanh", grad_input=da_RH)

        # input projection; the spare last row of dx stays zero for dropped assignments
        dx_RD = x_RD.new_empty(R + 1, D)
        dx_RD[R].zero_()
        dw_in = torch.empty_like(w_in_c)
        xs, dhs, dxs = x_RD.split(sizes), dh_RH.split(sizes), dx_RD[:R].split(sizes)
        w_h, dw_h = _per_expert(w_in_c[:, :, :H].transpose(1, 2)), _per_expert(dw_in[:, :, :H])
        for e in active:
            torch.mm(dhs[e], w_h[e], out=dxs[e])
            torch.mm(xs[e].t(), dhs[e], out=dw_h[e])
        if glu:
            dus = du_RH.split(sizes)
            w_u, dw_u = _per_expert(w_in_c[:, :, H:].transpose(1, 2)), _per_expert(dw_in[:, :, H:])
            for e in active:
                torch.addmm(dxs[e], dus[e], w_u[e], out=dxs[e])
                torch.mm(xs[e].t(), dus[e], out=dw_u[e])
        for e, n in enumerate(sizes):
            if n == 0:  # an expert with no tokens gets an exactly zero gradient
                dw_in[e].zero_()
                dw_out[e].zero_()
        dx_ND = _sum_over_k(dx_RD.index_select(0, plan.row_KN).view(K, N, D))

        db_in = db_out = None
        if ctx.has_bias:
            db_in = torch.zeros(w_in_c.shape[0], w_in_c.shape[2], dtype=torch.float32, device=x_RD.device)
            db_out = torch.zeros(w_out_c.shape[0], D, dtype=torch.float32, device=x_RD.device)
            for e in active:
                db_in[e, :H] = dhs[e].sum(0, dtype=torch.float32)
                if glu:
                    db_in[e, H:] = dus[e].sum(0, dtype=torch.float32)
                db_out[e] = dys[e].sum(0, dtype=torch.float32)
            db_in, db_out = db_in.to(b_dtype), db_out.to(b_dtype)

        return dx_ND.to(x_dtype), dgate_KN, dw_in.to(w_in_dtype), dw_out.to(w_out_dtype), db_in, db_out, None, None, None


# ---------------------------------------------------------------------------------------------
# The same Function through the native kernels (csrc/experts.cpp) on the CPU: each expert's whole
# forward (weight casts, gather, products, activation) and backward (its rows' output gradients,
# products, activation, fp32 weight gradients) on one thread, experts shared out over the threads;
# the combine, the gate gradients and the way back to the tokens as fp32-accumulating loops. Same
# products and relu/gelu kernels as above; the SwiGLU is one fused loop (rounded once where the
# Python path rounds silu(g) first), silu is recomputed rather than stored, and the combine rounds
# once where the Python path rounds each product.

ACTIVATIONS = {"relu": 0, "gelu": 1, "swiglu": 2}
_NONE = torch.empty(0)  # an absent tensor argument of the kernels


def _native_module(x_ND, dtype, *tensors):
    """The extension when the native kernels apply (CPU; compute dtype and every given tensor fp32 or
    bf16), else None."""
    if x_ND.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    if any(t is not None and (t.dtype not in (torch.float32, torch.bfloat16) or t.device.type != "cpu") for t in tensors):
        return None
    from . import native

    return native.experts_module()


def _native_forward(ctx, x_ND, gate_KN, w_in, w_out, b_in, b_out, plan: ExpertPlan, activation: str, dtype):
    N, D = x_ND.shape
    E, H = w_out.shape[0], w_out.shape[1]
    R = plan.token_R.numel()
    glu = activation == "swiglu"

    def cast(t):  # biases are small: cast here, contiguous per half
        return _NONE if t is None else t.detach().to(dtype).contiguous()

    new = x_ND.new_empty
    x_RD = new(R, D, dtype=dtype)
    w_g, w_o = new(E, D, H, dtype=dtype), new(E, H, D, dtype=dtype)
    w_u = new(E, D, H, dtype=dtype) if glu else _NONE
    h_RH, a_RH = new(R, H, dtype=dtype), new(R, H, dtype=dtype)
    u_RH = new(R, H, dtype=dtype) if glu else _NONE
    y_RD = new(R + 1, D, dtype=dtype)  # + the zero row that dropped assignments read
    y_RD[R].zero_()
    out_ND = new(N, D, dtype=dtype)
    gate_KN32 = gate_KN.detach().float().contiguous()
    with torch.autocast("cpu", enabled=False):  # the kernels run in `dtype`, on the worker threads too
        ctx.native.experts_forward(
            x_ND.detach().contiguous(), plan.token_R, plan.rows_per_expert, ACTIVATIONS[activation],
            w_in.detach(), w_out.detach(), cast(None if b_in is None else b_in[:, :H]),
            cast(None if b_in is None or not glu else b_in[:, H:]), cast(b_out), plan.row_KN, gate_KN32,
            x_RD, w_g, w_u, w_o, h_RH, u_RH, a_RH, y_RD, out_ND,
        )
    ctx.save_for_backward(x_RD, h_RH, u_RH, a_RH, y_RD, gate_KN32, w_g, w_u, w_o)
    ctx.plan, ctx.activation, ctx.has_bias = plan, activation, b_in is not None
    ctx.dtypes = (x_ND.dtype, w_in.dtype, w_out.dtype, None if b_in is None else b_in.dtype, gate_KN.dtype)
    ctx.in_width = w_in.shape[2]
    return out_ND


def _native_backward(ctx, dout_ND):
    x_RD, h_RH, u_RH, a_RH, y_RD, gate_KN32, w_g, w_u, w_o = ctx.saved_tensors
    plan: ExpertPlan = ctx.plan
    x_dtype, w_in_dtype, w_out_dtype, b_dtype, gate_dtype = ctx.dtypes
    R, D = x_RD.shape
    K, N = gate_KN32.shape
    E, H = w_o.shape[0], w_o.shape[1]
    glu = ctx.activation == "swiglu"
    new = x_RD.new_empty
    dx_ND = new(N, D, dtype=x_dtype)
    dgate_KN = new(K, N, dtype=torch.float32) if ctx.needs_input_grad[1] else _NONE
    dw_in = new(E, D, ctx.in_width, dtype=w_in_dtype)
    dw_out = new(E, H, D, dtype=w_out_dtype)
    db_in = x_RD.new_zeros(E, ctx.in_width, dtype=torch.float32) if ctx.has_bias else _NONE
    db_out = x_RD.new_zeros(E, D, dtype=torch.float32) if ctx.has_bias else _NONE
    dx_RD = new(R + 1, D)  # the spare last row stays zero for dropped assignments
    dx_RD[R].zero_()
    gate_ext = torch.cat([gate_KN32.reshape(-1), gate_KN32.new_zeros(1)])  # padding rows read the 0
    ctx.native.experts_backward(
        dout_ND.to(x_RD.dtype).contiguous(), plan.token_R, plan.slot_R, gate_ext, plan.row_KN, plan.rows_per_expert,
        ACTIVATIONS[ctx.activation], x_RD, w_g, w_u, w_o, h_RH, u_RH, a_RH, y_RD,
        dx_ND, dgate_KN, dw_in, dw_out, db_in, db_out,
        new(R, D), new(R, H), new(R, H) if glu else _NONE, dx_RD, torch.empty_like(w_g),
        torch.empty_like(w_u) if glu else _NONE, torch.empty_like(w_o),
    )
    for e, n in enumerate(plan.rows_per_expert):
        if n == 0:  # an expert with no tokens gets an exactly zero gradient
            dw_in[e].zero_()
            dw_out[e].zero_()
    dgate_KN = dgate_KN.to(gate_dtype) if ctx.needs_input_grad[1] else None
    db_in = db_in.to(b_dtype) if ctx.has_bias else None
    db_out = db_out.to(b_dtype) if ctx.has_bias else None
    return dx_ND, dgate_KN, dw_in, dw_out, db_in, db_out, None, None, None
