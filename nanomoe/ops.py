"""Small fused operations with hand-written backward passes, for CPU training speed.

PyTorch's RMSNorm has a fused forward on the CPU but its backward is decomposed into a dozen
elementwise kernels and copies; on a 2-core CPU that made the 13 norms of a 6-layer model cost as
much as its matrix products. These functions compute the same math with few kernels.
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    # inference: torch's fused kernel, in fp32 like the training path
    return F.rms_norm(_upcast(x), (x.shape[-1],), _upcast(weight), eps).to(x.dtype)


class RMSNorm(torch.nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), the norm of Llama and Mixtral."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
