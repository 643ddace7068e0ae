"""The GPU path of the MoE, proven on the CPU: the torch backend's plan and grouped-GEMM experts read no
tensor value on the host (they run on the meta device, which has no values), a training step compiles
with torch.compile(fullgraph=True) and equals eager, and the grouped GEMM equals the per-expert loop in
fp32 and bf16 (the loop itself is gradchecked against autograd in tests/test_moe.py)."""

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from nanomoe.config import ModelConfig
from nanomoe.kernels import TORCH
from nanomoe.kernels.grouped_ffn import grouped_mm_ffn, grouped_mm_unsupported, loop_grouped_ffn
from nanomoe.model import GPT
from nanomoe.moe import MoEFeedForward


def expert_weights(E, D, H, swiglu, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.3).to(dtype).requires_grad_()

    in_width = 2 * H if swiglu else H
    return rand(E, D, in_width), rand(E, H, D), rand(E, in_width), rand(E, D)


def value_and_grads(ffn, x, gate_KN, plan, weights, activation, bias):
    w_in, w_out, b_in, b_out = weights
    inputs = [x, gate_KN, w_in, w_out] + ([b_in, b_out] if bias else [])
    for t in inputs:
        t.grad = None
    out = ffn(x, gate_KN, plan, w_in, w_out, b_in if bias else None, b_out if bias else None, activation)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach().float()] + [t.grad.float() for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu"])
@pytest.mark.parametrize("top_k,capacity,row_multiple,masked", [(1, None, 1, False), (2, None, 4, True),
                                                                 (2, 5, 1, True), (2, 5, 8, False)])
def test_grouped_mm_equals_the_loop(dtype, activation, top_k, capacity, row_multiple, masked):
    # widths that are not multiples of 16 bytes (D=12, H=10) take grouped_mm's zero padding
    N, D, H, E = 19, 12, 10, 4
    gen = torch.Generator().manual_seed(1)
    weights = expert_weights(E, D, H, activation == "swiglu", dtype)
    x = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    gate_KN = torch.rand(top_k, N, generator=gen).to(dtype).requires_grad_()
    # expert 3 is never chosen: its weights must get exactly zero gradients
    indices_NK = torch.stack([torch.randperm(E - 1, generator=gen)[:top_k] for _ in range(N)])
    valid_N = torch.rand(N, generator=gen) > 0.25 if masked else None
    plan = TORCH.expert_plan(indices_NK, E, capacity, row_multiple, valid_N)
    if capacity is not None:
        assert plan.n_kept.item() < (N if valid_N is None else int(valid_N.sum())) * top_k  # really drops
    assert plan.token_R.numel() > int(plan.offsets_E[-1]) or not masked  # unused rows exist
    bias = activation != "relu"
    mm = value_and_grads(grouped_mm_ffn, x, gate_KN, plan, weights, activation, bias)
    loop = value_and_grads(loop_grouped_ffn, x, gate_KN, plan, weights, activation, bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(["out", "x", "gate", "w_in", "w_out", "b_in", "b_out"], mm, loop):
        torch.testing.assert_close(a, b, atol=tol * (1 + b.abs().max().item()), rtol=0, msg=name)
    w_in, w_out, b_in, b_out = weights
    assert torch.count_nonzero(w_in.grad[3]) == 0 and torch.count_nonzero(w_out.grad[3]) == 0
    if bias:
        assert torch.count_nonzero(b_in.grad[3]) == 0 and torch.count_nonzero(b_out.grad[3]) == 0
    if valid_N is not None:  # masked tokens get nothing from the experts, and send no gradient back
        assert torch.count_nonzero(mm[0][~valid_N]) == 0 and torch.count_nonzero(mm[1][~valid_N]) == 0


def test_where_grouped_mm_runs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert grouped_mm_unsupported(cpu, torch.float32) is None and grouped_mm_unsupported(cpu, torch.bfloat16) is None
    assert "float64" in grouped_mm_unsupported(cpu, torch.float64)
    assert "bf16" in grouped_mm_unsupported(cuda, torch.float32)  # decided without touching a GPU


def moe_config(**overrides):
    """tiny-moe's features (rope, rmsnorm, swiglu experts, top-2 topk router, aux and z losses) at test size."""
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, n_experts=4, top_k=2,
                expert_hidden=32, router="topk", aux_loss_coef=0.01, z_loss_coef=0.001, kernels="torch")
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("router,bias,n_shared", [("topk", False, 0), ("noisy_topk", True, 1), ("switch", False, 0)])
def test_moe_layer_forward_and_backward_read_no_value(router, bias, n_shared):
    # Fake tensors have shapes and no values: any read of a value on the host (.item(), .tolist(),
    # bool(), a shape that depends on the data) raises here, as it would wait for a GPU there.
    cfg = moe_config(router=router, bias=bias, n_shared_experts=n_shared, capacity_factor=1.25)
    # bf16, what a GPU runs (torch.compile and fake tensors trace grouped_mm in bf16 only)
    with FakeTensorMode(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer = MoEFeedForward(cfg, kernels=TORCH).train()
        x = torch.randn(2, 8, cfg.n_embd, requires_grad=True)
        valid = torch.rand(2, 8) > 0.5
        for valid_BT in (None, valid):
            out, stats = layer(x, valid_BT)
            loss = out.sum() + stats.load_balance_loss + stats.z_loss + stats.dropped_fraction
            loss.backward()
            assert x.grad.shape == x.shape and layer.experts.w_in.grad.shape == layer.experts.w_in.shape
    with FakeTensorMode(), pytest.raises(DataDependentOutputException):  # the check can fail
        torch.randn(3).sum().item()


def test_training_step_compiles_fullgraph_and_equals_eager():
    torch.manual_seed(0)
    cfg = moe_config(capacity_factor=1.0)
    model = GPT(cfg).train()
    assert model.kernels.name == "torch"

    def loss_fn(idx, targets):  # in bf16, as on a GPU (torch.compile traces grouped_mm in bf16 only)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(idx, targets)
        return out.loss + out.aux_loss, out.moe[0].dropped_fraction

    compiled = torch.compile(loss_fn, fullgraph=True)  # a graph break or a disabled function raises
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    padded = targets.clone()
    padded[0, 9:] = -100  # a padded row: its tail takes no expert and no capacity
    dropped = []
    for tgt in (targets, padded):  # same shapes: one compiled graph serves both
        grads = []
        for fn in (compiled, loss_fn):
            model.zero_grad(set_to_none=True)
            loss, drop = fn(idx, tgt)
            loss.backward()
            grads.append((loss.detach(), drop, [p.grad.clone() for p in model.parameters()]))
        (c_loss, c_drop, c_grads), (e_loss, e_drop, e_grads) = grads
        torch.testing.assert_close(c_loss, e_loss, atol=1e-4, rtol=1e-4)
        assert c_drop.item() == e_drop.item()  # the same routing and dropping
        for c, e in zip(c_grads, e_grads, strict=True):  # bf16 products, fused differently
            torch.testing.assert_close(c, e, atol=1e-2 * e.abs().max().item() + 1e-6, rtol=0)
        dropped.append(e_drop.item())
    assert dropped[0] > 0  # the capacity limit really drops assignments
