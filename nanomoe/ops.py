"""Small fused operations with hand-written backward passes, for CPU training speed.

PyTorch's RMSNorm has a fused forward on the CPU but its backward is decomposed into a dozen
elementwise kernels and copies; on a 2-core CPU that made the 13 norms of a 6-layer model cost as
much as its matrix products. These functions compute the same math with few kernels.

The RMSNorm training path, cross entropy, rotary embeddings, SwiGLU and the causal attention
softmax run as native kernels (csrc/fused_ops.cpp, one pass
each way, fp32 math with one rounding) on fp32/bf16 CPU tensors: in a tiny model they are
memory-bound and PyTorch spends 3-6 kernels and their temporaries on each. Elsewhere (CUDA, fp64/
fp16, no compiler, NANOMOE_NATIVE_OPS=0) and under torch.compile (which fuses them itself) the
PyTorch versions below run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision tensors; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _RMSNorm(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in at least fp32 whatever the input dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = _upcast(x)
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd).mul_(_upcast(weight)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = _upcast(x) * rstd
        grad_y = _upcast(grad_y)
        grad_weight = (grad_y * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        grad_xhat = grad_y * _upcast(weight)
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
        dot = (grad_xhat * xhat).mean(-1, keepdim=True)
        grad_x = grad_xhat.sub_(xhat.mul_(dot)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class _NativeRMSNorm(torch.autograd.Function):
    """_RMSNorm's math as two native passes (csrc/fused_ops.cpp)."""

    @staticmethod
    def forward(ctx, x, weight, eps, bf16_out, module):
        y, rstd = module.rms_norm_forward(x, weight, eps, bf16_out)
        ctx.save_for_backward(x, weight, rstd)
        ctx.module = module
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # a native call: not itself differentiable
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = ctx.module.rms_norm_backward(grad_y, x, weight, rstd)
        return grad_x, grad_weight.to(weight.dtype), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm in at least fp32; the result in x's dtype, or in `out_dtype`."""
    out_dtype = out_dtype or x.dtype
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        if out_dtype in (x.dtype, torch.bfloat16) and (module := _native_ops(x, weight)) is not None:
            return _NativeRMSNorm.apply(x, weight, eps, out_dtype != x.dtype, module)
        return _RMSNorm.apply(x, weight, eps).to(out_dtype)
    # inference: torch's fused kernel, in fp32 like the training path
    return F.rms_norm(_upcast(x), (x.shape[-1],), _upcast(weight), eps).to(out_dtype)


class RMSNorm(torch.nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), the norm of Llama and Mixtral."""

    def __init__(self, dim: int, eps: float = 1e-5, feeds_matmul: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))
        # Only read by matrix products (attention/FFN input, LM head): under autocast the output is
        # produced in the autocast dtype, the cast the product would make anyway, without its pass
        # (autocast leaves float64 alone, and so does this).
        self.feeds_matmul = feeds_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = None
        if self.feeds_matmul and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        return rms_norm(x, self.weight, self.eps, out_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ---------------------------------------------------------------------------------------------
# native fused ops: cross entropy, rotary embeddings, SwiGLU


def _native_ops(*tensors: torch.Tensor):
    """The extension when the fused kernels apply (fp32/bf16 CPU tensors, outside torch.compile), else None."""
    if torch.compiler.is_compiling():
        return None
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16) for t in tensors):
        return None
    from . import native

    return native.fused_ops_module()


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, targets_N, ignore_index, module):
        loss_N, lse_N = module.cross_entropy_forward(logits_NV, targets_N, ignore_index)
        ctx.save_for_backward(logits_NV, targets_N, lse_N)  # the logits in their dtype, not an fp32 copy
        ctx.module, ctx.ignore_index = module, ignore_index
        return loss_N.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable  # a native call: not itself differentiable
    def backward(ctx, grad):
        logits_NV, targets_N, lse_N = ctx.saved_tensors
        return ctx.module.cross_entropy_backward(logits_NV, targets_N, lse_N, grad, ctx.ignore_index), None, None, None


def cross_entropy_sum(logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum over the rows whose target is not ignore_index of -log softmax(logits)[target], in fp32
    whatever the logits' dtype (an fp32 scalar)."""
    module = _native_ops(logits_NV)
    if module is None or targets_N.device.type != "cpu":
        return F.cross_entropy(logits_NV.float(), targets_N, ignore_index=ignore_index, reduction="sum")
    return _CrossEntropySum.apply(logits_NV, targets_N, ignore_index, module)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos_Td, sin_Td, module):
        ctx.save_for_backward(cos_Td, sin_Td)
        ctx.module = module
        return module.rope(x, cos_Td, sin_Td, False)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a native call: not itself differentiable
    def backward(ctx, grad):
        cos_Td, sin_Td = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        return ctx.module.rope(grad, cos_Td, sin_Td, True), None, None, None


def apply_rope(x: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of x (..., d) by position-dependent angles (Su et al. 2021);
    the tables broadcast against x (e.g. (T, 1, d) for x of shape (B, T, H, d))."""
    if (
        x.dim() == 4 and cos_Td.dim() == 3 and cos_Td.shape[1] == 1 and cos_Td.shape[0] == x.shape[1]
        and x.stride(-1) == 1 and (module := _native_ops(x, cos_Td, sin_Td)) is not None
    ):  # one table row per position, shared by the batch and the heads
        return _Rope.apply(x, cos_Td[:, 0], sin_Td[:, 0], module)
    cos_Td, sin_Td = cos_Td.to(x.dtype), sin_Td.to(x.dtype)  # in bf16 under autocast: no fp32 copies of q, k
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos_Td + rotated * sin_Td


class _QKVHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos_Td, sin_Td, n_q, n_kv, module):
        heads = module.qkv_heads(qkv, cos_Td, sin_Td, n_q, n_kv)
        ctx.save_for_backward(cos_Td, sin_Td)
        ctx.module, ctx.shapes, ctx.dtype = module, [h.shape for h in heads], qkv.dtype
        return heads

    @staticmethod
    @torch.autograd.function.once_differentiable  # a native call: not itself differentiable
    def backward(ctx, dq, dk, dv):
        cos_Td, sin_Td = ctx.saved_tensors
        grads = []
        for g, shape in zip((dq, dk, dv), ctx.shapes):  # a head left unused gets no gradient: zeros
            g = torch.zeros(shape, dtype=ctx.dtype) if g is None else g.to(ctx.dtype)
            grads.append(g if g.stride(-1) == 1 else g.contiguous())
        return ctx.module.qkv_heads_backward(*grads, cos_Td, sin_Td), None, None, None, None, None


def attention_heads(qkv: torch.Tensor, rope, n_q: int, n_kv: int):
    """q (B, n_q, T, d), k and v (B, n_kv, T, d), contiguous, q and k rotated by `rope` ((T, 1, d)
    tables, or None), from a fused projection's output viewed as (B, T, n_q + 2 n_kv, d); None where
    the native kernel does not apply (the caller then splits, rotates and transposes itself)."""
    if rope is not None and not (rope[0].dim() == 3 and rope[0].shape[1] == 1 and rope[0].shape[0] == qkv.shape[1]):
        return None  # per-row positions: tables (B, T, 1, d)
    tables = (rope[0], rope[1]) if rope is not None else ()
    if qkv.stride(-1) != 1 or (module := _native_ops(qkv, *tables)) is None:
        return None
    cos_Td, sin_Td = (rope[0][:, 0], rope[1][:, 0]) if rope is not None else (qkv.new_empty(0), qkv.new_empty(0))
    return _QKVHeads.apply(qkv, cos_Td, sin_Td, n_q, n_kv, module)


class _CausalSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, scale, module):
        probs = module.causal_softmax(scores, scale)
        ctx.save_for_backward(probs)
        ctx.module, ctx.scale = module, scale
        return probs

    @staticmethod
    @torch.autograd.function.once_differentiable  # a native call: not itself differentiable
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        return ctx.module.causal_softmax_backward(grad, probs, ctx.scale), None, None


def causal_attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor | None:
    """softmax(scale * q k^T) over the keys j <= the query's position, zeros for later keys, for q
    (batch, G*T, d) (row r: the query at position r % T) and k (batch, T, d); None where the
    native kernel does not apply (the caller then masks and uses torch.softmax)."""
    if _native_ops(q, k) is None:
        return None
    scores = torch.bmm(q, k.transpose(1, 2))
    if (module := _native_ops(scores)) is None:  # an fp16 autocast made the scores half precision
        return None
    return _CausalSoftmax.apply(scores, scale, module)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, module):
        ctx.save_for_backward(h)  # silu is recomputed in the backward: h is all it needs
        ctx.module = module
        return module.swiglu(h)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a native call: not itself differentiable
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return ctx.module.swiglu_backward(grad, h), None


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h (..., 2H) holding [gate | up] halves."""
    if (module := _native_ops(h)) is not None:
        return _SwiGLU.apply(h, module)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up
