"""The RMSNorm of the default kernels (CI runs the suite with each backend) matches torch's."""

import torch
import torch.nn.functional as F

from nanomoe.kernels import select
from nanomoe.model import RMSNorm


def rms_norm(x, w, eps):
    return select().rms_norm(x, w, eps)


def test_rms_norm_gradcheck_float64():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))


def test_rms_norm_matches_torch_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    g = torch.randn(4, 7, 16)
    ours = rms_norm(x, w, 1e-5)
    ours.backward(g)
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = F.rms_norm(x, (16,), w, 1e-5)
    ref.backward(g)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], w.grad)
    with torch.no_grad():  # the inference path agrees
        torch.testing.assert_close(RMSNorm(16)(x), F.rms_norm(x, (16,), torch.ones(16), 1e-5))


def test_rms_norm_computes_in_fp32_for_bf16_inputs():
    x = torch.randn(2, 8, 32).to(torch.bfloat16).requires_grad_()
    w = torch.ones(32, requires_grad=True)
    y = rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    expected = F.rms_norm(x.float(), (32,), w, 1e-5).to(torch.bfloat16)
    torch.testing.assert_close(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
