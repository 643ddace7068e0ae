"""The torch backend of the grouped expert FFN, in two implementations:

- `grouped_mm_ffn`: two grouped GEMMs (`torch.nn.functional.grouped_mm`) over the plan's device-side
  offsets, differentiated by autograd. Sync-free and one torch.compile graph: what CUDA runs (bf16 on
  compute capability 9.x/10.x) and the CPU runs (fp32, bf16).
- `loop_grouped_ffn`: a loop of `torch.mm` per expert with a hand-written backward (below). It reads
  the block sizes on the host, so on a GPU it waits once per layer: the fallback elsewhere (other
  GPUs, fp32/fp16 on CUDA, float64), chosen by `grouped_ffn` with a one-line notice.

Their definition is the per-expert loop `GroupedExperts.expert_forward` (nanomoe/moe/experts.py);
tests/test_moe.py holds both (and the native kernels) to it.

The rest of this docstring is about the loop.

Shape legend (as in nanomoe/moe):
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

Row padding (a backend's `row_multiple`; the native backend pads CPU half-precision blocks to 32
rows): oneDNN JIT-compiles a kernel for every new matrix shape, and expert loads change every step.
Padding rows gather token 0 and carry gate weight 0, so their outputs are never read and their
gradients are exactly zero.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .plan import ExpertPlan, round_up


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
    """out[n] = sum_k gate[k, n] * expert_{e(n,k)}(x[n]) over the kept assignments. Returns (N, D).

    w_in (E, D, H), or (E, D, 2H) [gate | up] for swiglu; w_out (E, H, D); b_in, b_out optional.
    Runs in autocast's dtype when autocast is on; gradients come back in each input's own dtype.
    The grouped GEMM (`grouped_mm_ffn`) where it runs, else the per-expert loop (`loop_grouped_ffn`).
    """
    dtype = compute_dtype(x_ND, w_in)
    reason = grouped_mm_unsupported(x_ND.device, dtype)
    if reason is None and plan.token_R.numel() > 0:
        return grouped_mm_ffn(x_ND, gate_KN, plan, w_in, w_out, b_in, b_out, activation)
    if reason is not None and x_ND.device.type != "cpu" and reason not in _SAID:
        _SAID.add(reason)
        print(f"nanomoe: {reason}; the experts run as a per-expert loop instead (one host sync per MoE layer "
              "and E matrix products per projection)", file=sys.stderr)
    return loop_grouped_ffn(x_ND, gate_KN, plan, w_in, w_out, b_in, b_out, activation)


_SAID: set[str] = set()


def grouped_mm_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `grouped_mm_ffn` does not run on `device` in `dtype`, or None where it does. On CUDA only
    bf16 on compute capability 9.x/10.x has torch's grouped kernel; elsewhere torch's grouped_mm
    copies the offsets to the host and loops over the groups itself (a sync per product). On the CPU
    it runs in fp32 and bf16, but torch.compile traces it in bf16 only."""
    if device.type == "cpu":
        if dtype == torch.float32 and torch.compiler.is_compiling():
            return "torch.compile traces grouped_mm in bf16 only"
        return None if dtype in (torch.float32, torch.bfloat16) else f"grouped_mm does not take {dtype} on the CPU"
    if device.type != "cuda":
        return f"no grouped GEMM kernel on {device.type}"
    if dtype != torch.bfloat16:
        return f"torch's CUDA grouped GEMM runs in bf16 only, not {dtype}"
    props = torch.cuda.get_device_properties(device)
    if props.major not in (9, 10):
        return (f"torch's CUDA grouped GEMM needs compute capability 9.x or 10.x (Hopper, Blackwell), "
                f"not {props.major}.{props.minor}")
    return None


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """t zero-padded at the end of `dim` to `size` (itself when it has that size already)."""
    if t.shape[dim] == size:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, size - t.shape[dim]]
    return F.pad(t, pad)


def _hidden_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":  # h holds [gate | up] halves
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "relu":
        return F.relu(h)
    return F.gelu(h, approximate="tanh")


def grouped_mm_ffn(
    x_ND: torch.Tensor,
    gate_KN: torch.Tensor,
    plan: ExpertPlan,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """`grouped_ffn` as two grouped GEMMs (`F.grouped_mm`, the plan's int32 offsets on the device) and
    autograd: no value is read on the host, so a GPU never waits and torch.compile sees one graph.

    The last expert's block is stretched to the R rows of the buffers: the unused rows (token 0,
    gate 0) get finite outputs that nothing reads and exactly zero gradients, where grouped_mm would
    leave them uninitialized. Widths are zero-padded to 16 bytes (grouped_mm's stride rule): padded
    hidden units compute act(0) = 0 through zero weights, so the result is unchanged. grouped_mm
    takes no bias: each bias is one more weight row against a column of ones, so it is added inside
    the product before the one rounding, as addmm does (a bias added after a bf16 product moves ReLU's
    kink), and its gradient is summed there too.
    """
    dtype = compute_dtype(x_ND, w_in)
    N, D = x_ND.shape
    K = gate_KN.shape[0]
    E, H = w_out.shape[0], w_out.shape[1]
    R = plan.token_R.numel()
    halves = 2 if activation == "swiglu" else 1
    bias = b_in is not None
    align = 16 // dtype.itemsize
    D_in, H_out = round_up(D + bias, align), round_up(H, align)
    H_in, D_out = round_up(H_out + bias, align), round_up(D, align)
    with torch.autocast(x_ND.device.type, enabled=False):
        x, w1 = x_ND.to(dtype), _pad(w_in.to(dtype).view(E, D, halves, H), 3, H_out)
        if bias:
            x = F.pad(x, (0, 1), value=1.0)
            w1 = torch.cat([w1, _pad(b_in.to(dtype).view(E, 1, halves, H), 3, H_out)], dim=1)
        w1 = _pad(w1, 1, D_in).reshape(E, D_in, halves * H_out)
        w2 = _pad(w_out.to(dtype), 1, H_out)
        if bias:
            w2 = torch.cat([w2, b_out.to(dtype).view(E, 1, D)], dim=1)
        w2 = _pad(_pad(w2, 1, H_in), 2, D_out)

        offs_E = torch.cat([plan.offsets_E[:-1], plan.offsets_E.new_full((1,), R)])
        x_RD = _pad(x, 1, D_in).index_select(0, plan.token_R)  # dispatch: a gather
        a_RH = _hidden_activation(F.grouped_mm(x_RD, w1, offs=offs_E), activation)
        if bias:
            a_RH = F.pad(a_RH, (0, 1), value=1.0)
        y_RD = F.grouped_mm(_pad(a_RH, 1, H_in), w2, offs=offs_E)
        # combine: a gather; dropped assignments (row R) read row R-1 with gate 0
        kept_KN = (plan.row_KN < R).view(K, N)
        y_KND = y_RD.index_select(0, plan.row_KN.clamp(max=R - 1)).view(K, N, D_out)
        out_ND = (y_KND * (gate_KN * kept_KN).to(dtype).unsqueeze(-1)).sum(0)
    return out_ND[:, :D]


@torch.compiler.disable  # reads the block sizes: torch.compile runs it eagerly, the rest compiled
def loop_grouped_ffn(
    x_ND: torch.Tensor,
    gate_KN: torch.Tensor,
    plan: ExpertPlan,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """`grouped_ffn` as a loop of `torch.mm` per expert and projection, with a hand-written backward
    (below). Reads the block sizes on the host: the fallback where grouped_mm does not run."""
    dtype = compute_dtype(x_ND, w_in)
    return _GroupedFFN.apply(x_ND, gate_KN, w_in, w_out, b_in, b_out, plan, activation, dtype)


def _block_sizes(plan: ExpertPlan, R: int) -> list[int]:
    """Each expert's block size and, last, the unused rows up to R (for `split`)."""
    sizes = plan.rows_per_expert()
    return [*sizes, R - sum(sizes)]


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

            sizes = _block_sizes(plan, R)
            active = [e for e, n in enumerate(sizes[:-1]) if n > 0]
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
        ctx.plan, ctx.sizes, ctx.activation, ctx.has_bias = plan, sizes, activation, b_in is not None
        ctx.dtypes = (x_ND.dtype, w_in.dtype, w_out.dtype, None if b_in is None else b_in.dtype)
        return out_ND

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward is not itself differentiable
    def backward(ctx, dout_ND):
        x_RD, h_RH, u_RH, s_RH, a_RH, y_KND, gate_KN, w_in_c, w_out_c = ctx.saved_tensors
        plan: ExpertPlan = ctx.plan
        x_dtype, w_in_dtype, w_out_dtype, b_dtype = ctx.dtypes
        dtype = x_RD.dtype
        R, D = x_RD.shape
        K, N = gate_KN.shape
        H = h_RH.shape[1]
        glu = ctx.activation == "swiglu"
        sizes = ctx.sizes
        active = [e for e, n in enumerate(sizes[:-1]) if n > 0]
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
        for e, n in enumerate(sizes[:-1]):
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
