"""The native backend: the ops of reference.py as C++ kernels on the CPU (csrc/fused_ops.cpp, csrc/experts.cpp).

Each kernel is a PyTorch custom operator (`torch.ops.nanomoe.*`, torch.library.custom_op) with a fake
implementation (shapes only, so torch.compile traces through it as one opaque call) and a registered
autograd formula whose backward is another native op (which has none: a double backward raises
instead of silently dropping terms). Each kernel computes in fp32 with one rounding, one memory pass
per direction, where PyTorch spends 3-6 memory-bound kernels and their temporaries.

The backend's functions at the bottom take the same arguments as the reference and decide, inside
this file only, which tensors a kernel takes: fp32/bf16 CPU tensors go to the C++ code, anything
else (float64 gradchecks, fp16, other devices) to the reference. The CPU heuristics live here too:
short causal attention as two matrix products around the native masked softmax, expert blocks
padded for oneDNN, norms that hand matrix products their autocast dtype directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .decode import native_decode_step, unsupported_reason
from .extension import load_extension
from .grouped_ffn import compute_dtype
from .plan import ExpertPlan, block_sizes  # block sizes read inside the ops: CPU tensors, no graph break

_FLOATS = (torch.float32, torch.bfloat16)


def _ext():
    module = load_extension()
    if module is None:  # the backend is only chosen where the extension loads
        raise RuntimeError("the native kernels are not built; use kernels='torch'")
    return module


def _takes(*tensors: Tensor | None) -> bool:
    """Whether the kernels take these tensors: fp32 or bf16, on the CPU."""
    return all(t is None or (t.device.type == "cpu" and t.dtype in _FLOATS) for t in tensors)


def _empty(like: Tensor) -> Tensor:
    """An absent tensor argument or result of the kernels (custom ops return tensors, never None)."""
    return like.new_empty(0)


# ---------------------------------------------------------------------------------------------
# RMSNorm


@torch.library.custom_op("nanomoe::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float, bf16_out: bool) -> tuple[Tensor, Tensor]:
    return _ext().rms_norm_forward(x, weight, eps, bf16_out)


@_rms_norm.register_fake
def _(x, weight, eps, bf16_out):
    return x.new_empty(x.shape, dtype=torch.bfloat16 if bf16_out else x.dtype), \
        x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("nanomoe::rms_norm_backward", mutates_args=())
def _rms_norm_backward(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    return _ext().rms_norm_backward(grad_y, x, weight, rstd)


@_rms_norm_backward.register_fake
def _(grad_y, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape, dtype=torch.float32)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_grad(ctx, grad_y, _):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = _rms_norm_backward(grad_y, x, weight, rstd)
    return grad_x, grad_weight.to(weight.dtype), None, None


_rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


def rms_norm(x: Tensor, weight: Tensor, eps: float, feeds_matmul: bool = False) -> Tensor:
    out_dtype = x.dtype
    if feeds_matmul and x.device.type == "cpu" and x.dtype != torch.float64 and torch.is_autocast_enabled("cpu"):
        # only matrix products read it: produce the autocast dtype they would cast it to, without the
        # pass that cast costs, and take their bf16 gradient as it is (autocast leaves float64 alone)
        out_dtype = torch.get_autocast_dtype("cpu")
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if training and out_dtype in (x.dtype, torch.bfloat16) and _takes(x, weight):
        return _rms_norm(x, weight, eps, out_dtype != x.dtype)[0]
    # inference, or tensors the kernel does not take: torch's fused kernel, in fp32 like the native one
    return F.rms_norm(reference.upcast(x), (x.shape[-1],), reference.upcast(weight), eps).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Cross entropy


@torch.library.custom_op("nanomoe::cross_entropy_sum", mutates_args=())
def _cross_entropy_sum(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    loss_N, lse_N = _ext().cross_entropy_forward(logits, targets, ignore_index)
    return loss_N.sum(), lse_N


@_cross_entropy_sum.register_fake
def _(logits, targets, ignore_index):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.custom_op("nanomoe::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward(logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, ignore_index: int) -> Tensor:
    return _ext().cross_entropy_backward(logits, targets, lse, grad, ignore_index)


@_cross_entropy_backward.register_fake
def _(logits, targets, lse, grad, ignore_index):
    return logits.new_empty(logits.shape)


def _cross_entropy_setup(ctx, inputs, output):
    logits, targets, ctx.ignore_index = inputs
    ctx.save_for_backward(logits, targets, output[1])  # the logits in their dtype, not an fp32 copy


def _cross_entropy_grad(ctx, grad, _):
    logits, targets, lse = ctx.saved_tensors
    return _cross_entropy_backward(logits, targets, lse, grad, ctx.ignore_index), None, None


_cross_entropy_sum.register_autograd(_cross_entropy_grad, setup_context=_cross_entropy_setup)


def cross_entropy_sum(logits_NV: Tensor, targets_N: Tensor, ignore_index: int = -100) -> Tensor:
    if not _takes(logits_NV) or targets_N.device.type != "cpu":
        return reference.cross_entropy_sum(logits_NV, targets_N, ignore_index)
    return _cross_entropy_sum(logits_NV, targets_N, ignore_index)[0]


# ---------------------------------------------------------------------------------------------
# Rotary embeddings and attention heads


@torch.library.custom_op("nanomoe::rope", mutates_args=())
def _rope(x: Tensor, cos_Td: Tensor, sin_Td: Tensor, inverse: bool) -> Tensor:
    return _ext().rope(x, cos_Td, sin_Td, inverse)


@_rope.register_fake
def _(x, cos_Td, sin_Td, inverse):
    return x.new_empty(x.shape)


def _rope_setup(ctx, inputs, output):
    _, cos_Td, sin_Td, ctx.inverse = inputs
    ctx.save_for_backward(cos_Td, sin_Td)


def _rope_grad(ctx, grad):
    cos_Td, sin_Td = ctx.saved_tensors
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    return _rope(grad, cos_Td, sin_Td, not ctx.inverse), None, None, None  # the rotation's transpose


_rope.register_autograd(_rope_grad, setup_context=_rope_setup)


def _one_row_per_position(rope, x: Tensor) -> bool:
    """Tables (T, 1, d) shared by the batch and the heads of x (B, T, H, d)."""
    cos = rope[0]
    return cos.dim() == 3 and cos.shape[1] == 1 and cos.shape[0] == x.shape[1]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    if x.dim() == 4 and _one_row_per_position((cos, sin), x) and x.stride(-1) == 1 and _takes(x, cos, sin):
        return _rope(x, cos[:, 0], sin[:, 0], False)
    return reference.apply_rope(x, cos, sin)


@torch.library.custom_op("nanomoe::qkv_heads", mutates_args=())
def _qkv_heads(qkv: Tensor, cos_Td: Tensor, sin_Td: Tensor, n_q: int, n_kv: int) -> tuple[Tensor, Tensor, Tensor]:
    return _ext().qkv_heads(qkv, cos_Td, sin_Td, n_q, n_kv)


@_qkv_heads.register_fake
def _(qkv, cos_Td, sin_Td, n_q, n_kv):
    B, T, _, d = qkv.shape
    return qkv.new_empty(B, n_q, T, d), qkv.new_empty(B, n_kv, T, d), qkv.new_empty(B, n_kv, T, d)


@torch.library.custom_op("nanomoe::qkv_heads_backward", mutates_args=())
def _qkv_heads_backward(dq: Tensor, dk: Tensor, dv: Tensor, cos_Td: Tensor, sin_Td: Tensor) -> Tensor:
    return _ext().qkv_heads_backward(dq, dk, dv, cos_Td, sin_Td)


@_qkv_heads_backward.register_fake
def _(dq, dk, dv, cos_Td, sin_Td):
    B, n_q, T, d = dq.shape
    return dq.new_empty(B, T, n_q + 2 * dk.shape[1], d)


def _qkv_heads_setup(ctx, inputs, output):
    qkv, cos_Td, sin_Td, _, _ = inputs
    ctx.save_for_backward(cos_Td, sin_Td)
    ctx.dtype = qkv.dtype


def _qkv_heads_grad(ctx, dq, dk, dv):
    cos_Td, sin_Td = ctx.saved_tensors
    grads = [g.to(ctx.dtype) for g in (dq, dk, dv)]  # (a head left unused gets zeros)
    grads = [g if g.stride(-1) == 1 else g.contiguous() for g in grads]
    return _qkv_heads_backward(*grads, cos_Td, sin_Td), None, None, None, None


_qkv_heads.register_autograd(_qkv_heads_grad, setup_context=_qkv_heads_setup)


def attention_heads(qkv: Tensor, rope, n_q: int, n_kv: int):
    """The split of the fused projection, the rotation of q and k and the transposes in one pass."""
    if rope is not None and not _one_row_per_position(rope, qkv):  # per-row positions: tables (B, T, 1, d)
        return reference.attention_heads(qkv, rope, n_q, n_kv)
    tables = (rope[0][:, 0], rope[1][:, 0]) if rope is not None else (_empty(qkv), _empty(qkv))
    if qkv.stride(-1) != 1 or not _takes(qkv, *tables):
        return reference.attention_heads(qkv, rope, n_q, n_kv)
    return _qkv_heads(qkv, *tables, n_q, n_kv)


# ---------------------------------------------------------------------------------------------
# Causal attention


@torch.library.custom_op("nanomoe::causal_softmax", mutates_args=())
def _causal_softmax(scores: Tensor, scale: float) -> Tensor:
    return _ext().causal_softmax(scores, scale)


@_causal_softmax.register_fake
def _(scores, scale):
    return scores.new_empty(scores.shape)


@torch.library.custom_op("nanomoe::causal_softmax_backward", mutates_args=())
def _causal_softmax_backward(grad: Tensor, probs: Tensor, scale: float) -> Tensor:
    return _ext().causal_softmax_backward(grad, probs, scale)


@_causal_softmax_backward.register_fake
def _(grad, probs, scale):
    return probs.new_empty(probs.shape)


def _causal_softmax_setup(ctx, inputs, output):
    ctx.scale = inputs[1]
    ctx.save_for_backward(output)


def _causal_softmax_grad(ctx, grad):
    (probs,) = ctx.saved_tensors
    return _causal_softmax_backward(grad, probs, ctx.scale), None


_causal_softmax.register_autograd(_causal_softmax_grad, setup_context=_causal_softmax_setup)


def causal_attention_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """softmax(scale * q k^T) over the keys j <= the query's position, zeros for later keys, for q
    (batch, G*T, d) (row r: the query at position r % T) and k (batch, T, d)."""
    scores = torch.bmm(q, k.transpose(1, 2))
    if _takes(scores):
        return _causal_softmax(scores, scale)  # scale, mask and softmax in one pass over visible keys
    T = k.shape[1]  # e.g. half-precision scores under an fp16 autocast
    mask = torch.full((T, T), float("-inf"), device=q.device, dtype=scores.dtype).triu(1).repeat(q.shape[1] // T, 1)
    # the softmax kernels accumulate half-precision inputs in fp32; an explicit fp32 result would
    # only add two (T, T) conversions per layer
    return torch.softmax(torch.baddbmm(mask.expand_as(scores), q, k.transpose(1, 2), alpha=scale), dim=-1)


# Up to this length, causal attention on the CPU runs as two batched matrix products around a softmax.
MATMUL_ATTENTION_MAX_T = 384


def matmul_causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Causal attention as bmm -> masked softmax -> bmm, for q (B, Hq, T, d) and k, v (B, Hkv, T, d).

    Why not F.scaled_dot_product_attention on the CPU: for short sequences batched matrix products
    around a softmax train faster than its flash kernel, whose backward is slow (docs/performance.md);
    past MATMUL_ATTENTION_MAX_T flash wins and needs no (T, T) scores. Grouped-query heads share their
    key/value head without copies.
    """
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv  # query heads per key/value head
    q = q.reshape(B * Hkv, G * T, d)  # rows (g, t): the G query heads of one key/value head
    k, v = k.reshape(B * Hkv, T, d), v.reshape(B * Hkv, T, d)
    probs = causal_attention_probs(q, k, d**-0.5)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.bmm(probs, v).view(B, Hq, T, d)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = True,
              dropout_p: float = 0.0) -> Tensor:
    if attn_mask is None and is_causal and q.shape[2] <= MATMUL_ATTENTION_MAX_T and q.device.type == "cpu":
        return matmul_causal_attention(q, k, v, dropout_p)
    return reference.attention(q, k, v, attn_mask, is_causal, dropout_p)


# ---------------------------------------------------------------------------------------------
# SwiGLU


@torch.library.custom_op("nanomoe::swiglu", mutates_args=())
def _swiglu(h: Tensor) -> Tensor:
    return _ext().swiglu(h)


@_swiglu.register_fake
def _(h):
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


@torch.library.custom_op("nanomoe::swiglu_backward", mutates_args=())
def _swiglu_backward(grad: Tensor, h: Tensor) -> Tensor:
    return _ext().swiglu_backward(grad, h)


@_swiglu_backward.register_fake
def _(grad, h):
    return h.new_empty(h.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])  # silu is recomputed in the backward: h is all it needs


def _swiglu_grad(ctx, grad):
    (h,) = ctx.saved_tensors
    return _swiglu_backward(grad, h)


_swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


def swiglu(h: Tensor) -> Tensor:
    return _swiglu(h) if _takes(h) else reference.swiglu(h)


# ---------------------------------------------------------------------------------------------
# Router: softmax, logsumexp, top-k of probs + bias and the gates in one pass (csrc/experts.cpp)


@torch.library.custom_op("nanomoe::route", mutates_args=())
def _route(logits_NE: Tensor, selection_bias_E: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ext().router_forward(logits_NE, selection_bias_E, top_k, renormalize)


@_route.register_fake
def _(logits_NE, selection_bias_E, top_k, renormalize):
    N = logits_NE.shape[0]
    return (logits_NE.new_empty(N, top_k, dtype=torch.long), logits_NE.new_empty(N, top_k),
            logits_NE.new_empty(logits_NE.shape), logits_NE.new_empty(N))


@torch.library.custom_op("nanomoe::route_backward", mutates_args=())
def _route_backward(probs_NE: Tensor, indices_NK: Tensor, d_gates_NK: Tensor, d_probs_NE: Tensor, d_lse_N: Tensor,
                    renormalize: bool) -> Tensor:
    return _ext().router_backward(probs_NE, indices_NK, d_gates_NK, d_probs_NE, d_lse_N, renormalize)


@_route_backward.register_fake
def _(probs_NE, indices_NK, d_gates_NK, d_probs_NE, d_lse_N, renormalize):
    return probs_NE.new_empty(probs_NE.shape)


def _route_setup(ctx, inputs, output):
    indices_NK, _, probs_NE, _ = output
    ctx.save_for_backward(probs_NE, indices_NK)
    ctx.renormalize = inputs[3]
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read


def _route_grad(ctx, _, d_gates_NK, d_probs_NE, d_lse_N):
    probs_NE, indices_NK = ctx.saved_tensors
    none = _empty(probs_NE)  # the kernel skips an empty gradient
    d_logits_NE = _route_backward(probs_NE, indices_NK, none if d_gates_NK is None else d_gates_NK,
                                  none if d_probs_NE is None else d_probs_NE, none if d_lse_N is None else d_lse_N,
                                  ctx.renormalize)
    return d_logits_NE, None, None, None


_route.register_autograd(_route_grad, setup_context=_route_setup)


def route(logits_NE: Tensor, selection_bias_E: Tensor, top_k: int, renormalize: bool):
    if logits_NE.device.type != "cpu" or logits_NE.dtype != torch.float32:
        return reference.route(logits_NE, selection_bias_E, top_k, renormalize)
    return _route(logits_NE, selection_bias_E, top_k, renormalize)


# ---------------------------------------------------------------------------------------------
# Dispatch plan: one counting sort (csrc/experts.cpp)


@torch.library.custom_op("nanomoe::expert_plan", mutates_args=())
def _expert_plan(indices_NK: Tensor, n_experts: int, capacity: Tensor, row_multiple: int,
                 valid_N: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # capacity: a 0-d tensor (-1: dropless), read here on the CPU where it costs no sync
    token_R, slot_R, row_KN, rows_per_expert, n_kept = _ext().experts_plan(
        indices_NK, n_experts, int(capacity), row_multiple, _empty(indices_NK) if valid_N is None else valid_N)
    offsets_E = torch.tensor(rows_per_expert, dtype=torch.int64).cumsum(0).to(torch.int32)
    return token_R, slot_R, row_KN, offsets_E, torch.tensor(n_kept)


@_expert_plan.register_fake
def _(indices_NK, n_experts, capacity, row_multiple, valid_N):
    R = torch.library.get_ctx().new_dynamic_size()  # rows depend on the routing
    new = indices_NK.new_empty
    return new(R), new(R), new(indices_NK.numel()), new(n_experts, dtype=torch.int32), new(())


def expert_plan(expert_indices_NK: Tensor, n_experts: int, capacity: int | Tensor | None, row_multiple: int = 1,
                valid_N: Tensor | None = None) -> ExpertPlan:
    if expert_indices_NK.device.type != "cpu":
        return reference.expert_plan(expert_indices_NK, n_experts, capacity, row_multiple, valid_N)
    if not isinstance(capacity, Tensor):
        capacity = torch.tensor(-1 if capacity is None else capacity)
    return ExpertPlan(*_expert_plan(expert_indices_NK.long(), n_experts, capacity, row_multiple, valid_N))


def row_multiple(device: torch.device, dtype: torch.dtype) -> int:
    """Expert blocks are padded to 32 rows where torch's CPU matmul (oneDNN) compiles a kernel per
    shape (half precision): expert loads change every step, and padded blocks keep the set of
    shapes small. Padding rows carry gate weight 0."""
    return 32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 1


# ---------------------------------------------------------------------------------------------
# Grouped expert FFN (csrc/experts.cpp): each expert's whole forward (weight casts, gather, products,
# activation) and backward (its rows' output gradients, products, activation, fp32 weight gradients)
# on one thread, experts shared out over the threads; the combine, the gate gradients and the way
# back to the tokens as fp32-accumulating loops. Same products and relu/gelu kernels as the torch
# backend (grouped_ffn.py); the SwiGLU is one fused loop (rounded once where the torch backend rounds
# silu(g) first), silu is recomputed rather than stored, and the combine rounds once where the
# torch backend rounds each product.

ACTIVATIONS = {"relu": 0, "gelu": 1, "swiglu": 2}


@torch.library.custom_op("nanomoe::experts_forward", mutates_args=())
def _experts_forward(x_ND: Tensor, gate_KN: Tensor, w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
                     b_out: Tensor | None, token_R: Tensor, slot_R: Tensor, row_KN: Tensor,
                     offsets_E: Tensor, activation: int, dtype: torch.dtype) -> tuple[
                         Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    N, D = x_ND.shape
    E, H = w_out.shape[0], w_out.shape[1]
    R = token_R.numel()
    glu = activation == ACTIVATIONS["swiglu"]

    def cast(t):  # biases are small: cast here, contiguous per half
        return _empty(x_ND) if t is None else t.to(dtype).contiguous()

    new = x_ND.new_empty
    x_RD = new(R, D, dtype=dtype)
    w_g, w_o = new(E, D, H, dtype=dtype), new(E, H, D, dtype=dtype)
    w_u = new(E, D, H, dtype=dtype) if glu else new(0)
    h_RH, a_RH = new(R, H, dtype=dtype), new(R, H, dtype=dtype)
    u_RH = new(R, H, dtype=dtype) if glu else new(0)
    y_RD = new(R + 1, D, dtype=dtype)  # + the zero row that dropped assignments read
    y_RD[R].zero_()
    out_ND = new(N, D, dtype=dtype)
    with torch.autocast("cpu", enabled=False):  # the kernels run in `dtype`, on the worker threads too
        _ext().experts_forward(
            x_ND.contiguous(), token_R, block_sizes(offsets_E), activation, w_in, w_out,
            cast(None if b_in is None else b_in[:, :H]), cast(None if b_in is None or not glu else b_in[:, H:]),
            cast(b_out), row_KN, gate_KN.float().contiguous(), x_RD, w_g, w_u, w_o, h_RH, u_RH, a_RH, y_RD, out_ND,
        )
    return out_ND, x_RD, w_g, w_u, w_o, h_RH, u_RH, a_RH, y_RD


@_experts_forward.register_fake
def _(x_ND, gate_KN, w_in, w_out, b_in, b_out, token_R, slot_R, row_KN, offsets_E, activation, dtype):
    N, D = x_ND.shape
    E, H = w_out.shape[0], w_out.shape[1]
    R = token_R.shape[0]
    glu = activation == ACTIVATIONS["swiglu"]
    new = x_ND.new_empty
    return (new(N, D, dtype=dtype), new(R, D, dtype=dtype), new(E, D, H, dtype=dtype),
            new(E, D, H, dtype=dtype) if glu else new(0), new(E, H, D, dtype=dtype), new(R, H, dtype=dtype),
            new(R, H, dtype=dtype) if glu else new(0), new(R, H, dtype=dtype), new(R + 1, D, dtype=dtype))


@torch.library.custom_op("nanomoe::experts_backward", mutates_args=())
def _experts_backward(dout_ND: Tensor, gate_KN: Tensor, token_R: Tensor, slot_R: Tensor, row_KN: Tensor,
                      offsets_E: Tensor, activation: int, x_RD: Tensor, w_g: Tensor, w_u: Tensor,
                      w_o: Tensor, h_RH: Tensor, u_RH: Tensor, a_RH: Tensor, y_RD: Tensor, in_width: int,
                      has_bias: bool, need_dgate: bool, x_dtype: torch.dtype, w_in_dtype: torch.dtype,
                      w_out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    R, D = x_RD.shape
    K, N = gate_KN.shape
    E, H = w_o.shape[0], w_o.shape[1]
    glu = activation == ACTIVATIONS["swiglu"]
    new = x_RD.new_empty
    dx_ND = new(N, D, dtype=x_dtype)
    dgate_KN = new(K, N, dtype=torch.float32) if need_dgate else new(0)
    dw_in = new(E, D, in_width, dtype=w_in_dtype)
    dw_out = new(E, H, D, dtype=w_out_dtype)
    db_in = x_RD.new_zeros(E, in_width, dtype=torch.float32) if has_bias else new(0)
    db_out = x_RD.new_zeros(E, D, dtype=torch.float32) if has_bias else new(0)
    dx_RD = new(R + 1, D)  # the spare last row stays zero for dropped assignments
    dx_RD[R].zero_()
    gate32 = gate_KN.float()
    gate_ext = torch.cat([gate32.reshape(-1), gate32.new_zeros(1)])  # padding rows read the 0
    rows_per_expert = block_sizes(offsets_E)
    _ext().experts_backward(
        dout_ND.to(x_RD.dtype).contiguous(), token_R, slot_R, gate_ext, row_KN, rows_per_expert, activation,
        x_RD, w_g, w_u, w_o, h_RH, u_RH, a_RH, y_RD, dx_ND, dgate_KN, dw_in, dw_out, db_in, db_out,
        new(R, D), new(R, H), new(R, H) if glu else new(0), dx_RD, torch.empty_like(w_g),
        torch.empty_like(w_u) if glu else new(0), torch.empty_like(w_o),
    )
    for e, n in enumerate(rows_per_expert):
        if n == 0:  # an expert with no tokens gets an exactly zero gradient
            dw_in[e].zero_()
            dw_out[e].zero_()
    return dx_ND, dgate_KN, dw_in, dw_out, db_in, db_out


@_experts_backward.register_fake
def _(dout_ND, gate_KN, token_R, slot_R, row_KN, offsets_E, activation, x_RD, w_g, w_u, w_o, h_RH, u_RH,
      a_RH, y_RD, in_width, has_bias, need_dgate, x_dtype, w_in_dtype, w_out_dtype):
    D = x_RD.shape[1]
    K, N = gate_KN.shape
    E, H = w_o.shape[0], w_o.shape[1]
    new = x_RD.new_empty
    return (new(N, D, dtype=x_dtype), new(K, N, dtype=torch.float32) if need_dgate else new(0),
            new(E, D, in_width, dtype=w_in_dtype), new(E, H, D, dtype=w_out_dtype),
            new(E, in_width, dtype=torch.float32) if has_bias else new(0),
            new(E, D, dtype=torch.float32) if has_bias else new(0))


def _experts_setup(ctx, inputs, output):
    x_ND, gate_KN, w_in, w_out, b_in, b_out, token_R, slot_R, row_KN, offsets_E, activation, _ = inputs
    _, x_RD, w_g, w_u, w_o, h_RH, u_RH, a_RH, y_RD = output
    ctx.save_for_backward(gate_KN, token_R, slot_R, row_KN, offsets_E, x_RD, w_g, w_u, w_o, h_RH, u_RH, a_RH, y_RD)
    ctx.activation, ctx.in_width = activation, w_in.shape[2]
    ctx.dtypes = (x_ND.dtype, w_in.dtype, w_out.dtype, None if b_in is None else b_in.dtype, gate_KN.dtype)


def _experts_grad(ctx, dout_ND, *_):
    gate_KN, token_R, slot_R, row_KN, offsets_E, *buffers = ctx.saved_tensors
    x_dtype, w_in_dtype, w_out_dtype, b_dtype, gate_dtype = ctx.dtypes
    need_dgate = ctx.needs_input_grad[1]
    dx_ND, dgate_KN, dw_in, dw_out, db_in, db_out = _experts_backward(
        dout_ND, gate_KN, token_R, slot_R, row_KN, offsets_E, ctx.activation, *buffers, ctx.in_width,
        b_dtype is not None, need_dgate, x_dtype, w_in_dtype, w_out_dtype)
    dgate_KN = dgate_KN.to(gate_dtype) if need_dgate else None
    db_in = db_in.to(b_dtype) if b_dtype is not None else None
    db_out = db_out.to(b_dtype) if b_dtype is not None else None
    return dx_ND, dgate_KN, dw_in, dw_out, db_in, db_out, None, None, None, None, None, None


_experts_forward.register_autograd(_experts_grad, setup_context=_experts_setup)


def grouped_ffn(x_ND: Tensor, gate_KN: Tensor, plan: ExpertPlan, w_in: Tensor, w_out: Tensor, b_in: Tensor | None,
                b_out: Tensor | None, activation: str) -> Tensor:
    dtype = compute_dtype(x_ND, w_in)
    if x_ND.shape[0] == 0 or dtype not in _FLOATS or not _takes(x_ND, w_in, w_out, b_in, b_out):
        return reference.grouped_ffn(x_ND, gate_KN, plan, w_in, w_out, b_in, b_out, activation)
    return _experts_forward(x_ND, gate_KN, w_in, w_out, b_in, b_out, plan.token_R, plan.slot_R, plan.row_KN,
                            plan.offsets_E, ACTIVATIONS[activation], dtype)[0]


decode_step = native_decode_step
decode_unsupported = unsupported_reason
