"""The native backend's fused ops (csrc/fused_ops.cpp: cross entropy, rotary embeddings, SwiGLU,
RMSNorm, attention) against float64 references and against the torch backend (nanomoe/kernels)."""

import platform

import pytest
import torch
import torch.nn.functional as F

from nanomoe.kernels import NATIVE, TORCH, resolve
from nanomoe.kernels import extension as build
from nanomoe.kernels import native as native_backend
from nanomoe.model import GPT, rope_cache
from nanomoe.presets import get_preset


@pytest.fixture(scope="module")
def module(native_extension):
    return native_extension


ops = NATIVE  # the native backend: its kernels where they apply, the reference elsewhere


def use(monkeypatch, module):
    """Run the native backend's kernels from `module` (an extension build); the list records each use."""
    used = []
    monkeypatch.setattr(native_backend, "_ext", lambda: used.append(module) or module)
    return used


def rope_reference(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def grads_of(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> with respect to the inputs."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


# ---------------------------------------------------------------------------------------------
# cross entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [2048, 37])  # 37: the scalar tail after the 16-lane loops
def test_cross_entropy_matches_float64(module, monkeypatch, dtype, vocab):
    torch.manual_seed(0)
    logits = (torch.randn(301, vocab, dtype=torch.float64) * 4).to(dtype)
    targets = torch.randint(0, vocab, (301,))
    targets[::5] = -100
    used = use(monkeypatch, module)
    loss, (grad,) = grads_of(lambda x: ops.cross_entropy_sum(x, targets), [logits], torch.tensor(0.7))
    assert used and loss.dtype == torch.float32 and grad.dtype == dtype
    ref, (ref_grad,) = grads_of(lambda x: F.cross_entropy(x, targets, reduction="sum"), [logits.double()],
                                torch.tensor(0.7, dtype=torch.float64))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    tolerance = 1e-6 if dtype == torch.float32 else 2**-8  # one rounding of values below 0.7
    assert (grad.double() - ref_grad).abs().max() <= tolerance
    assert grad[::5].abs().max() == 0  # ignored rows


def test_cross_entropy_of_bad_rows_and_targets(module, monkeypatch):
    use(monkeypatch, module)
    logits = torch.randn(4, 50, requires_grad=True)
    with torch.no_grad():
        logits[1, 3] = float("nan")
    loss = ops.cross_entropy_sum(logits, torch.tensor([1, 2, 3, -100]))
    assert torch.isnan(loss)  # a NaN logit must not be clamped into a finite loss
    loss.backward()
    assert torch.isnan(logits.grad[1]).all() and torch.isfinite(logits.grad[0]).all()
    assert logits.grad[3].abs().max() == 0
    # every target ignored: a zero sum, zero gradients
    clean = torch.randn(3, 50, requires_grad=True)
    loss = ops.cross_entropy_sum(clean, torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0 and clean.grad.abs().max() == 0
    with pytest.raises(RuntimeError, match="target 300 out of range for 50 classes"):
        ops.cross_entropy_sum(clean, torch.tensor([1, 300, 2]))


# ---------------------------------------------------------------------------------------------
# rotary embeddings


@pytest.mark.parametrize("head_dim", [64, 24])  # 24: a 12-wide half, a masked 16-lane step
def test_rope_matches_float64_on_a_strided_view(module, monkeypatch, head_dim):
    torch.manual_seed(0)
    cfg = get_preset("debug", n_embd=4 * head_dim, n_head=4)
    cos, sin = rope_cache(cfg)
    T = 37
    cos_T, sin_T = cos[5 : 5 + T, None], sin[5 : 5 + T, None]  # positions 5.., as after a prompt
    qkv = torch.randn(3, T, 12, head_dim, dtype=torch.float64)
    grad_out = torch.randn(3, T, 8, head_dim, dtype=torch.float64)
    ref, ref_grads = grads_of(lambda x: rope_reference(x, cos_T.double(), sin_T.double()), [qkv[:, :, :8]], grad_out)
    for dtype in (torch.float32, torch.bfloat16):
        x = qkv.to(dtype).requires_grad_()
        used = use(monkeypatch, module)
        out = ops.apply_rope(x[:, :, :8], cos_T, sin_T)  # the q|k heads of a fused projection: not contiguous
        out.backward(grad_out.to(dtype))
        assert used and out.dtype == dtype and out.is_contiguous()
        tolerance = 1e-6 if dtype == torch.float32 else 2**-7  # |values| < 4: one bf16 rounding
        assert (out.double() - ref).abs().max() <= tolerance * 4
        assert (x.grad[:, :, :8].double() - ref_grads[0]).abs().max() <= tolerance * 4
        assert x.grad[:, :, 8:].abs().max() == 0


def test_rope_backward_is_the_exact_transpose(module, monkeypatch):
    """With arbitrary tables (sin[i] != sin[i + d/2]) the backward must still be the transpose."""
    torch.manual_seed(1)
    T, d = 9, 32
    cos, sin = torch.randn(T, 1, d), torch.randn(T, 1, d)
    x = torch.randn(2, T, 3, d, dtype=torch.float64)
    grad_out = torch.randn(2, T, 3, d, dtype=torch.float64)
    _, (ref,) = grads_of(lambda t: rope_reference(t, cos.double(), sin.double()), [x], grad_out)
    use(monkeypatch, module)
    _, (got,) = grads_of(lambda t: ops.apply_rope(t, cos, sin), [x.float()], grad_out)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SwiGLU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_float64(module, monkeypatch, dtype):
    torch.manual_seed(0)
    h = torch.randn(3, 11, 2 * 53, dtype=torch.float64) * 3  # 53: a masked tail
    grad_out = torch.randn(3, 11, 53, dtype=torch.float64)

    def reference(t):
        gate, up = t.chunk(2, dim=-1)
        return F.silu(gate) * up

    ref, (ref_grad,) = grads_of(reference, [h], grad_out)
    used = use(monkeypatch, module)
    out, (grad,) = grads_of(ops.swiglu, [h.to(dtype)], grad_out)
    assert used and out.dtype == dtype and out.shape == (3, 11, 53)
    scale = max(ref.abs().max().item(), ref_grad.abs().max().item())
    tolerance = 1e-6 if dtype == torch.float32 else 2**-8
    assert (out.double() - ref).abs().max() <= tolerance * scale
    assert (grad.double() - ref_grad).abs().max() <= 2 * tolerance * scale


# ---------------------------------------------------------------------------------------------
# in the model


MODELS = {  # an MoE (its experts have their own kernels) and a dense SwiGLU model
    "moe": ("debug", {}),
    "dense": ("tiny-dense", dict(n_layer=2, n_embd=64, n_head=4, ffn_hidden=96)),
}


def loss_and_grads(monkeypatch, kernels, kind, dtype):
    """Loss and gradients of a small model on the native backend with the extension build `kernels`,
    or on the torch backend (None)."""
    used = use(monkeypatch, kernels)
    torch.manual_seed(0)
    preset, overrides = MODELS[kind]
    backend = "torch" if kernels is None else "native"
    model = GPT(get_preset(preset, vocab_size=128, block_size=32, kernels=backend, **overrides))
    idx = torch.randint(0, 128, (2, 32))
    targets = torch.randint(0, 128, (2, 32))
    targets[1, 20:] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(idx, targets)
    out.loss.backward()
    assert bool(used) == (kernels is not None) and all(u is kernels for u in used)
    return out.loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_model_trains_the_same_through_the_fused_ops(module, monkeypatch, kind, dtype):
    loss, grads = loss_and_grads(monkeypatch, module, kind, dtype)
    ref_loss, ref_grads = loss_and_grads(monkeypatch, None, kind, dtype)
    tolerance = 1e-5 if dtype == "fp32" else 0.02  # bf16: the PyTorch path rounds after every op
    torch.testing.assert_close(loss, ref_loss, rtol=tolerance, atol=0)
    for g, e in zip(grads, ref_grads, strict=True):
        assert (g - e).abs().max() <= tolerance * 5 * e.abs().max() + 1e-8


def test_the_pytorch_path_where_the_kernels_do_not_apply(module, monkeypatch):
    used = use(monkeypatch, module)
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(ops.swiglu(x), TORCH.swiglu(x))  # float64: the reference
    assert not used
    ops.swiglu(x.float())
    assert used == [module]
    # the environment only says what "auto" means; an explicit choice stands
    monkeypatch.delenv("NANOMOE_KERNELS", raising=False)
    monkeypatch.delenv("NANOMOE_NATIVE", raising=False)
    assert resolve("auto") == "native"
    monkeypatch.setenv("NANOMOE_KERNELS", "torch")
    assert resolve("auto") == "torch" and resolve("native") == "native"
    monkeypatch.setenv("NANOMOE_KERNELS", "auto")
    monkeypatch.setenv("NANOMOE_NATIVE", "0")
    assert resolve("auto") == "torch"


@pytest.mark.slow
def test_the_portable_build_matches(monkeypatch):
    """Without AVX-512 (most laptops) every fused op takes its scalar loop."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the baseline build is an x86-64 target")
    portable = build.build_extension(["-O3", "-march=x86-64", "-fopenmp"])
    for dtype in ("fp32", "bf16"):
        loss, grads = loss_and_grads(monkeypatch, portable, "dense", dtype)
        ref_loss, ref_grads = loss_and_grads(monkeypatch, None, "dense", dtype)
        tolerance = 1e-5 if dtype == "fp32" else 0.02
        torch.testing.assert_close(loss, ref_loss, rtol=tolerance, atol=0)
        for g, e in zip(grads, ref_grads, strict=True):
            assert (g - e).abs().max() <= tolerance * 5 * e.abs().max() + 1e-8


# ---------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [256, 70])  # 70: a masked tail
def test_rms_norm_matches_float64(module, monkeypatch, dtype, dim):
    torch.manual_seed(0)
    x = torch.randn(5, 67, dim, dtype=torch.float64) * 2  # 335 rows: several blocks and a partial one
    weight = torch.randn(dim, dtype=torch.float64)
    grad_out = torch.randn(5, 67, dim, dtype=torch.float64).to(dtype).double()  # as the kernel sees it

    def reference(t, w):
        return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-5) * w

    ref, (ref_dx, ref_dw) = grads_of(reference, [x.to(dtype).double(), weight.float().double()], grad_out)
    used = use(monkeypatch, module)
    out, (dx, dw) = grads_of(lambda t, w: ops.rms_norm(t, w, 1e-5), [x.to(dtype), weight.float()], grad_out)
    assert used and out.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    for got, expected in ((out, ref), (dx, ref_dx), (dw, ref_dw)):
        assert (got.double() - expected).abs().max() <= tolerance * expected.abs().max()


def test_rms_norm_weight_gradient_does_not_depend_on_threads(module, monkeypatch):
    torch.manual_seed(0)
    x, weight, grad_out = torch.randn(1000, 64), torch.randn(64), torch.randn(1000, 64)
    use(monkeypatch, module)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(grads_of(lambda t, w: ops.rms_norm(t, w, 1e-5), [x, weight], grad_out)[1][1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


# ---------------------------------------------------------------------------------------------
# causal attention softmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,T", [(1, 37), (3, 20)])  # 3 query heads per key head; odd lengths
def test_causal_softmax_matches_float64(module, monkeypatch, dtype, groups, T):
    torch.manual_seed(0)
    q = torch.randn(4, groups * T, 16, dtype=torch.float64)
    k = torch.randn(4, T, 16, dtype=torch.float64)
    grad_out = torch.randn(4, groups * T, T, dtype=torch.float64).to(dtype).double()

    def reference(q_, k_):
        mask = torch.ones(T, T, dtype=torch.bool).tril().repeat(groups, 1)
        return torch.softmax((q_ @ k_.transpose(1, 2) * 0.25).masked_fill(~mask, float("-inf")), dim=-1)

    ref, ref_grads = grads_of(reference, [q.to(dtype).double(), k.to(dtype).double()], grad_out)
    used = use(monkeypatch, module)
    out, grads = grads_of(lambda a, b: native_backend.causal_attention_probs(a, b, 0.25), [q.to(dtype), k.to(dtype)], grad_out)
    assert used and out.dtype == dtype
    later = ~torch.ones(T, T, dtype=torch.bool).tril().repeat(groups, 1)
    assert out[:, later].abs().max() == 0  # later keys get exactly nothing
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7  # bf16: the scores are rounded before the softmax
    assert (out.double() - ref).abs().max() <= tolerance
    for got, expected in zip(grads, ref_grads):
        assert (got.double() - expected).abs().max() <= 4 * tolerance * expected.abs().max()


def test_causal_softmax_keeps_a_nan(module, monkeypatch):
    use(monkeypatch, module)
    q, k = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    k[0, 0, 0] = float("nan")
    probs = native_backend.causal_attention_probs(q, k, 0.5)
    assert torch.isnan(probs[0, :, 0]).all() and torch.isnan(probs[0, 2, :3]).all()


@pytest.mark.parametrize("native_kernels", [True, False])
def test_a_norm_feeding_a_matmul_hands_it_bf16_under_autocast(module, monkeypatch, native_kernels):
    """Under autocast a norm read only by matrix products yields the bf16 they would cast it to, and
    takes their bf16 gradient as it is: the same numbers as an fp32 norm followed by the cast. (A
    CPU trick of the native backend, in its kernel and in its PyTorch fallback; the torch backend
    leaves the cast to the product.)"""
    from nanomoe.model import RMSNorm

    use(monkeypatch, module)
    if not native_kernels:  # the native backend's fallback for norms its kernel does not take
        monkeypatch.setattr(native_backend, "_takes", lambda *tensors: False)
    torch.manual_seed(0)
    norm, plain = RMSNorm(64, feeds_matmul=True, kernels=NATIVE), RMSNorm(64, kernels=NATIVE)
    torch_norm = RMSNorm(64, feeds_matmul=True, kernels=TORCH)
    with torch.no_grad():
        norm.weight.normal_()
        plain.weight.copy_(norm.weight)
        torch_norm.weight.copy_(norm.weight)
    x = torch.randn(3, 10, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    grad_out = torch.randn(3, 10, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_plain = norm(x), plain(x2)
    assert y.dtype == torch.bfloat16 and y_plain.dtype == torch.float32
    assert torch.equal(y, y_plain.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch_norm(x2).dtype == torch.float32
    y.backward(grad_out)
    y_plain.backward(grad_out.float())
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(norm.weight.grad, plain.weight.grad, rtol=1e-6, atol=1e-6)
    assert norm(x).dtype == torch.float32  # no autocast: x's dtype


# ---------------------------------------------------------------------------------------------
# from review


def test_double_backward_through_a_native_op_raises_instead_of_dropping_terms(module, monkeypatch):
    use(monkeypatch, module)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    y = ops.rms_norm(x, w, 1e-5)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert grad_x.requires_grad  # a gradient penalty built on it is not silently constant...
    with pytest.raises(RuntimeError, match="no autograd formula"):  # ...its backward says why it cannot run
        (grad_x.square().sum() + y.sum()).backward()


def test_fp16_autocast_scores_fall_back_to_torch(module):
    """Under an fp16 autocast the scores are half precision, which the kernel does not take."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 8, 16).unbind(0)
    with torch.autocast("cpu", dtype=torch.float16):
        out = native_backend.matmul_causal_attention(q, k, v)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotate", [True, False])
def test_attention_heads_match_split_rope_transpose(module, monkeypatch, dtype, rotate):
    """q, k, v out of a fused projection (grouped-query: 4 query heads, 2 key/value heads), with
    arbitrary tables, against split + rotate + transpose in float64; a head whose output is unused
    (here v, when rotate is False) gets a zero gradient."""
    torch.manual_seed(0)
    B, T, n_q, n_kv, d = 2, 7, 4, 2, 24
    qkv = torch.randn(B, T, n_q + 2 * n_kv, d, dtype=torch.float64).to(dtype).double()
    cos, sin = torch.randn(T, 1, d), torch.randn(T, 1, d)

    def reference(x):
        qk, v = x.split([n_q + n_kv, n_kv], dim=2)
        if rotate:
            qk = rope_reference(qk, cos.double(), sin.double())
        q, k = qk.split([n_q, n_kv], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    x_ref = qkv.clone().requires_grad_()
    expected = reference(x_ref)
    grads = [torch.randn_like(e).to(dtype).double() for e in expected]
    used = [0, 1, 2] if rotate else [0, 1]
    torch.autograd.backward([expected[i] for i in used], [grads[i] for i in used])

    use(monkeypatch, module)
    x = qkv.to(dtype).requires_grad_()
    got = ops.attention_heads(x, (cos, sin) if rotate else None, n_q, n_kv)
    assert got is not None and all(g.is_contiguous() and g.dtype == dtype for g in got)
    torch.autograd.backward([got[i] for i in used], [grads[i].to(dtype) for i in used])
    tolerance = 1e-6 if dtype == torch.float32 else 2**-8
    for g, e in zip(got, expected):
        assert (g.double() - e).abs().max() <= tolerance * e.abs().max()
    assert (x.grad.double() - x_ref.grad).abs().max() <= tolerance * x_ref.grad.abs().max()
    if not rotate:
        assert x.grad[:, :, n_q + n_kv :].abs().max() == 0
