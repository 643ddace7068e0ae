"""The torch backend: every kernel op written in plain PyTorch. These functions are the ops' definitions.

They are what runs on CUDA and under `kernels="torch"` anywhere, and what torch.compile sees there:
ordinary PyTorch code that inductor fuses. The native backend (native.py) computes the same math on
the CPU; the tests hold it to these functions.

Shape legend: B batch, T positions, H heads, d head width, N rows (tokens), V vocabulary,
E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouped_ffn import compute_dtype, grouped_ffn
from .plan import ExpertPlan, expert_plan


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision tensors; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, feeds_matmul: bool = False) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), in at least fp32 (a bf16 mean of
    squares loses the small differences the norm is about); the result in x's dtype.
    feeds_matmul (the output is only read by matrix products) is a hint a backend may use."""
    x32 = upcast(x)
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * upcast(weight)).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of x (..., d) by position-dependent angles (Su et al. 2021);
    the tables broadcast against x (e.g. (T, 1, d) for x of shape (B, T, H, d))."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # in bf16 under autocast: no fp32 copies of q, k
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention_heads(qkv: torch.Tensor, rope, n_q: int, n_kv: int):
    """q (B, n_q, T, d) and k, v (B, n_kv, T, d) from a fused projection viewed as (B, T, n_q + 2 n_kv, d),
    q and k rotated by `rope` (cos, sin tables broadcasting against (B, T, H, d)), or not (None)."""
    # split, not slicing: the backward of a split is one cat, of a slice zeros plus a copy
    qk, v = qkv.split([n_q + n_kv, n_kv], dim=2)
    if rope is not None:  # q and k heads rotated together: half the kernels of two calls
        qk = apply_rope(qk, *rope)
    q, k = qk.split([n_q, n_kv], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = True, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q (B, Hq, T, d), k and v (B, Hkv, S, d); grouped-query
    heads share their key/value head. attn_mask: (B or 1, 1, T, S) bool, True where a query may see a
    key; without one, is_causal: query i sees keys up to i (T == S), else every key."""
    grouped = k.shape[1] != q.shape[1]
    if grouped and attn_mask is not None and q.device.type == "cuda":
        # on CUDA a mask rules out the flash kernel, and the memory-efficient kernel (the one that
        # takes a mask) has no grouped-query mode: expand the key/value heads rather than let SDPA
        # fall back to the math kernel, which materializes the (T, S) scores
        k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
        grouped = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
                                          dropout_p=dropout_p, enable_gqa=grouped)


def expand_kv_heads(kv: torch.Tensor, n_q: int) -> torch.Tensor:
    """(B, Hkv, S, d) -> (B, n_q, S, d): each key/value head repeated for the query heads that share it."""
    return kv.repeat_interleave(n_q // kv.shape[1], dim=1)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h (..., 2H) holding [gate | up] halves (Shazeer 2020)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def cross_entropy_sum(logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum over the rows whose target is not ignore_index of -log softmax(logits)[target], in fp32
    whatever the logits' dtype (an fp32 scalar)."""
    return F.cross_entropy(logits_NV.float(), targets_N, ignore_index=ignore_index, reduction="sum")


def route(logits_NE: torch.Tensor, selection_bias_E: torch.Tensor, top_k: int, renormalize: bool):
    """The "topk" / "switch" router after its gate product, in fp32: probabilities p = softmax(logits),
    the K experts of largest p + bias (the bias only chooses), their gates p (renormalized to sum to 1
    when `renormalize`). Returns indices (N, K) int64 best first, gates (N, K), probs (N, E) and the
    logits' logsumexp (N,) (the z-loss needs it)."""
    # exp(x - logsumexp(x)) rather than torch.softmax: the logsumexp is needed anyway, and with only
    # E entries per row the softmax kernel (vectorized along that dim) is slower, forward and backward
    lse_N1 = torch.logsumexp(logits_NE, dim=-1, keepdim=True)
    probs_NE = torch.exp(logits_NE - lse_N1)
    _, indices_NK = torch.topk(probs_NE + selection_bias_E, top_k, dim=-1)
    gates_NK = probs_NE.gather(-1, indices_NK)
    if renormalize:
        gates_NK = gates_NK / gates_NK.sum(dim=-1, keepdim=True)
    return indices_NK, gates_NK, probs_NE, lse_N1.squeeze(-1)


def row_multiple(device: torch.device, dtype: torch.dtype) -> int:
    """Rows each expert's block is padded to: none needed here."""
    return 1


__all__ = ["ExpertPlan", "apply_rope", "attention", "attention_heads", "compute_dtype", "cross_entropy_sum",
           "expert_plan", "grouped_ffn", "rms_norm", "route", "row_multiple", "swiglu", "upcast"]
