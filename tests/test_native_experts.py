"""The native backend's MoE kernels (csrc/experts.cpp: router, plan, grouped experts) against the torch backend."""

import itertools
import platform

import pytest
import torch

from nanomoe.config import ModelConfig
from nanomoe.kernels import NATIVE, TORCH, resolve
from nanomoe.kernels import extension as build
from nanomoe.kernels import native as native_backend
from nanomoe.moe import MoEFeedForward, Router, load_balance_loss, router_z_loss


@pytest.fixture(scope="module")
def module(native_extension):
    return native_extension


def use(monkeypatch, module):
    """Run the native backend's kernels from `module` (an extension build); the list records each use."""
    used = []
    monkeypatch.setattr(native_backend, "_ext", lambda: used.append(module) or module)
    return used


def run_layer(monkeypatch, kernels, ffn, bias, dtype, capacity_factor=0.0, tokens=100, n_experts=8):
    """Output, input gradient and parameter gradients of one MoE layer, on the native backend with
    the extension build `kernels`, or on the torch backend (None)."""
    used = use(monkeypatch, kernels)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=256, n_layer=1, n_head=1, n_embd=64, ffn=ffn, n_experts=n_experts,
                      top_k=2, expert_hidden=96, router="topk", bias=bias, capacity_factor=capacity_factor)
    layer = MoEFeedForward(cfg, kernels=TORCH if kernels is None else NATIVE).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, tokens // 2, 64)
    if dtype == "bf16-weights":  # a model cast to bf16, no autocast
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out, _ = layer(x)
    out.float().pow(2).sum().backward()
    assert bool(used) == (kernels is not None) and all(u is kernels for u in used)
    return [out.detach().float(), x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("ffn,bias,dtype,capacity_factor",
                         list(itertools.product(["swiglu", "relu", "gelu"], [False, True], ["fp32", "bf16"], [0.0, 0.5]))
                         + [("swiglu", True, "bf16-weights", 0.5)])
def test_native_kernels_match_the_python_path(module, monkeypatch, ffn, bias, dtype, capacity_factor):
    got = run_layer(monkeypatch, module, ffn, bias, dtype, capacity_factor)
    expected = run_layer(monkeypatch, None, ffn, bias, dtype, capacity_factor)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        if dtype == "fp32":  # summation order only
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
        else:  # the kernels round once (SwiGLU, combine, gate products) where the Python path rounds twice
            assert (g - e).abs().max() <= 0.03 * e.abs().max()


def test_experts_without_tokens_get_zero_gradients(module, monkeypatch):
    """16 tokens x top-2 over 64 experts: most experts get no rows; their gradients must be exactly
    zero (the kernels never touch them; the backend zeroes them)."""
    got = run_layer(monkeypatch, module, "swiglu", True, "bf16", tokens=16, n_experts=64)
    w_in_grad, w_out_grad = got[3], got[4]  # after out, dx, router gate: w_in, w_out, b_in, b_out
    unused = (w_in_grad.abs().sum((1, 2)) == 0) & (w_out_grad.abs().sum((1, 2)) == 0)
    assert 32 <= int(unused.sum()) < 64
    assert torch.isfinite(w_in_grad).all() and torch.isfinite(w_out_grad).all()


def test_native_kernels_run_in_inference_mode(module, monkeypatch):
    """Generation runs under torch.inference_mode, whose tensors only inference-mode code may write:
    the kernels' worker threads must take the caller's mode."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=64, n_layer=1, n_head=1, n_embd=64, n_experts=4, top_k=2,
                      expert_hidden=96)
    layer = MoEFeedForward(cfg, kernels=NATIVE).eval()
    with torch.no_grad():  # the layer alone is not initialized (GPT.init_weights does that)
        for p in layer.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(1, 40, 64)
    outs = []
    for kernels in (NATIVE, TORCH):
        layer.router.kernels = layer.experts.kernels = kernels
        with torch.inference_mode():
            outs.append(layer(x)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_portable_build_matches_the_python_path(monkeypatch):
    """Without AVX-512 (most laptops) the SwiGLU loops take their scalar fallbacks."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the baseline build is an x86-64 target")
    portable = build.build_extension(["-O3", "-march=x86-64", "-fopenmp"])
    assert not portable.has_avx512_bf16()
    for dtype in ("fp32", "bf16"):
        got = run_layer(monkeypatch, portable, "swiglu", False, dtype)
        expected = run_layer(monkeypatch, None, "swiglu", False, dtype)
        for g, e in zip(got, expected, strict=True):
            tolerance = 1e-5 if dtype == "fp32" else 0.03
            assert (g - e).abs().max() <= tolerance * e.abs().max()


def test_turning_the_native_kernels_off(monkeypatch):
    cfg = ModelConfig(vocab_size=64, block_size=64, n_layer=1, n_head=1, n_embd=32, n_experts=4, expert_hidden=48)
    monkeypatch.setenv("NANOMOE_KERNELS", "torch")
    assert resolve("auto") == "torch" and MoEFeedForward(cfg).experts.kernels is TORCH
    monkeypatch.setenv("NANOMOE_KERNELS", "auto")
    monkeypatch.setenv("NANOMOE_NATIVE", "0")
    assert resolve("auto") == "torch" and MoEFeedForward(cfg).experts.kernels is TORCH
    assert MoEFeedForward(cfg.replace(kernels="torch")).router.kernels is TORCH


def test_native_plan_equals_the_python_plan(module, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        N, K = int(torch.randint(1, 300, (), generator=gen)), int(torch.randint(1, 4, (), generator=gen))
        E = int(torch.randint(K, 9, (), generator=gen))
        indices = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
        capacity = None if trial % 3 == 0 else int(torch.randint(1, 40, (), generator=gen))
        row_multiple = [1, 4, 32][trial % 3]
        valid = None if trial % 2 else torch.rand(N, generator=gen) > 0.3
        plans = [kernels.expert_plan(indices, E, capacity, row_multiple, valid) for kernels in (NATIVE, TORCH)]
        native_plan, python_plan = plans
        # the native plan has exactly the rows it uses; the python plan a static bound, the rest unused
        used = native_plan.token_R.numel()
        assert python_plan.token_R.numel() >= used and int(native_plan.offsets_E[-1]) == used
        for field in ("token_R", "slot_R"):
            assert torch.equal(getattr(native_plan, field), getattr(python_plan, field)[:used]), (trial, field)
        dropped = python_plan.row_KN == python_plan.token_R.numel()
        assert torch.equal(native_plan.row_KN, torch.where(dropped, used, python_plan.row_KN)), trial
        assert torch.equal(native_plan.offsets_E, python_plan.offsets_E)
        assert native_plan.n_kept.item() == python_plan.n_kept.item()


@pytest.mark.parametrize("kind,top_k", [("topk", 2), ("topk", 3), ("switch", 1), ("switch", 2)])
def test_native_router_matches_the_python_router(module, monkeypatch, kind, top_k):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=256, n_layer=1, n_head=1, n_embd=32, n_experts=8, top_k=top_k,
                      expert_hidden=64, router=kind)
    router = Router(cfg, NATIVE).train()
    router.selection_bias.copy_(torch.randn(8) * 0.05)  # choices follow probs + bias, gates the probs
    x = torch.randn(300, 32)
    weights = torch.randn(300, top_k)  # any use of the gates, the probs and the logsumexp
    results = []
    for kernels in (NATIVE, TORCH):
        router.kernels = kernels
        router.zero_grad()
        xg = x.clone().requires_grad_()
        out = router(xg)
        assert (out.logsumexp_N is not None) and out.router_probs_NE.grad_fn is not None
        loss = (out.expert_weights_NK * weights).sum() + load_balance_loss(out.router_probs_NE, out.expert_indices_NK)
        loss = loss + router_z_loss(out.router_logits_NE, None, out.logsumexp_N)
        loss.backward()
        results.append((out, xg.grad, router.gate.weight.grad.clone()))
    (got, got_dx, got_dw), (ref, ref_dx, ref_dw) = results
    assert torch.equal(got.expert_indices_NK, ref.expert_indices_NK)
    for a, b in ((got.expert_weights_NK, ref.expert_weights_NK), (got.router_probs_NE, ref.router_probs_NE),
                 (got.logsumexp_N, ref.logsumexp_N), (got_dx, ref_dx), (got_dw, ref_dw)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_tokens_and_bad_plans(module, monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=64, n_layer=1, n_head=1, n_embd=32, n_experts=4, top_k=2,
                      expert_hidden=48)
    layer = MoEFeedForward(cfg, kernels=NATIVE).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(0, 5, 32, requires_grad=True)  # an empty batch: forward and backward still work
    layer(x)[0].sum().backward()
    assert x.grad.shape == (0, 5, 32)
    # a plan made for other tokens is refused, not followed out of bounds
    x = torch.randn(10, 32)
    gates = torch.rand(2, 10)
    plan = NATIVE.expert_plan(torch.randint(0, 4, (100, 2)), 4, None, 1)
    with pytest.raises(RuntimeError, match="disagree|out of range"):
        NATIVE.grouped_ffn(x, gates, plan, layer.experts.w_in, layer.experts.w_out, None, None, "swiglu")
    with pytest.raises(RuntimeError, match="row_multiple"):
        module.experts_plan(torch.zeros(3, 2, dtype=torch.long), 4, -1, 0, torch.empty(0))
