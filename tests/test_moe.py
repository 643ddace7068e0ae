"""The MoE layer: fast dispatch against the plain reference loop, routers, balancing losses, capacity."""

import itertools
import math

import pytest
import torch

import nanomoe.kernels.grouped_ffn as grouped_ffn_module
from nanomoe.kernels import select
from nanomoe.model import GPT, FeedForward
from nanomoe.moe import (
    MoEFeedForward,
    dispatch_and_combine,
    expert_capacity,
    load_balance_loss,
    moe_forward_reference,
    router_z_loss,
)
from nanomoe.presets import get_preset


@pytest.fixture(autouse=True, params=["native", "python", "loop"])
def expert_path(request, monkeypatch):
    """Every test here runs on both kernel backends on the CPU: the native kernels
    (csrc/experts.cpp) and the torch backend, with each of its expert implementations: the grouped
    GEMM ("python", the default where grouped_mm runs) and the per-expert loop ("loop", its fallback)."""
    monkeypatch.delenv("NANOMOE_NATIVE", raising=False)
    monkeypatch.setenv("NANOMOE_KERNELS", "native" if request.param == "native" else "torch")
    if request.param == "loop":
        monkeypatch.setattr(grouped_ffn_module, "grouped_mm_unsupported", lambda device, dtype: "the loop's test run")
    if request.param == "native":
        from nanomoe.kernels import extension

        if extension.load_extension() is None:
            pytest.skip(f"the native kernels did not build: {extension.build_error()}")
    return request.param


def make_plan(*args, **kwargs):
    return select().expert_plan(*args, **kwargs)


def grouped_ffn(*args):
    return select().grouped_ffn(*args)


def make_layer(router="topk", top_k=2, n_shared=0, ffn="swiglu", bias=False, capacity_factor=0.0, n_experts=4):
    cfg = get_preset(
        "debug",
        router=router,
        top_k=top_k,
        n_experts=n_experts,
        n_shared_experts=n_shared,
        ffn=ffn,
        bias=bias,
        capacity_factor=capacity_factor,
    )
    torch.manual_seed(0)
    shared = FeedForward(cfg.n_embd, n_shared * cfg.expert_hidden, cfg.ffn, cfg.bias) if n_shared else None
    layer = MoEFeedForward(cfg, shared_expert=shared)
    # non-trivial weights everywhere (the default init zeroes the noise projection and biases)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("router", ["noisy_topk", "topk", "switch"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("n_shared", [0, 1])
def test_fast_dispatch_matches_reference_outputs_and_grads(router, top_k, n_shared):
    layer = make_layer(router=router, top_k=top_k, n_shared=n_shared, bias=(router == "noisy_topk"))
    layer.eval()  # noisy gating is deterministic in eval mode, so both paths route identically
    x = torch.randn(3, 11, layer.experts.w_in.shape[1], requires_grad=True)

    fast, fast_grads = output_and_grads(layer, x, lambda: layer(x)[0])
    ref, ref_grads = output_and_grads(layer, x, lambda: moe_forward_reference(layer, x))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    for g_fast, g_ref in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=0)


def output_and_grads(layer, x, run):
    """Output of run() and the gradients of a fixed non-uniform function of it."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out = run()
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()]
    return out.detach(), grads + [x.grad.clone()]


@pytest.mark.parametrize("ffn", ["relu", "gelu"])
def test_fast_dispatch_matches_reference_other_activations_with_bias(ffn):
    layer = make_layer(ffn=ffn, bias=True)
    x = torch.randn(2, 9, layer.experts.w_in.shape[1])
    torch.testing.assert_close(layer(x)[0], moe_forward_reference(layer, x), atol=1e-5, rtol=0)


def test_train_mode_noisy_gating_matches_reference_with_same_rng():
    layer = make_layer(router="noisy_topk")
    layer.train()
    x = torch.randn(2, 8, layer.experts.w_in.shape[1], requires_grad=True)
    torch.manual_seed(123)
    fast, fast_grads = output_and_grads(layer, x, lambda: layer(x)[0])
    torch.manual_seed(123)
    ref, ref_grads = output_and_grads(layer, x, lambda: moe_forward_reference(layer, x))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    assert fast_grads[1].abs().sum() > 0  # the noise projection is trained through the gates
    for g_fast, g_ref in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=0)


def test_noisy_gating_is_random_in_training_and_deterministic_in_eval():
    layer = make_layer(router="noisy_topk")
    x = torch.randn(4, 16, layer.experts.w_in.shape[1])
    layer.train()
    a, b = layer.router(x.view(-1, x.shape[-1])), layer.router(x.view(-1, x.shape[-1]))
    assert not torch.equal(a.expert_weights_NK, b.expert_weights_NK)
    layer.eval()
    a, b = layer.router(x.view(-1, x.shape[-1])), layer.router(x.view(-1, x.shape[-1]))
    assert torch.equal(a.expert_indices_NK, b.expert_indices_NK)
    assert torch.equal(a.expert_weights_NK, b.expert_weights_NK)


def test_router_gate_weights_follow_each_router_definition():
    x = torch.randn(50, 64)
    for router, top_k in [("topk", 2), ("switch", 1), ("switch", 2), ("noisy_topk", 2)]:
        layer = make_layer(router=router, top_k=top_k)
        layer.eval()
        r = layer.router(x)
        assert r.expert_indices_NK.shape == (50, top_k)
        assert (r.expert_indices_NK[:, :-1] != r.expert_indices_NK[:, 1:]).all() if top_k > 1 else True
        probs = torch.softmax(r.router_logits_NE, dim=-1)
        chosen = probs.gather(-1, r.expert_indices_NK)
        if router == "switch":  # raw probabilities, not renormalized
            torch.testing.assert_close(r.expert_weights_NK, chosen)
        else:  # renormalized over the chosen experts
            torch.testing.assert_close(r.expert_weights_NK, chosen / chosen.sum(-1, keepdim=True))
        # the chosen experts are the most probable ones
        assert (chosen.min(-1).values >= probs.topk(top_k, -1).values.min(-1).values - 1e-7).all()


def test_switch_aux_loss_is_one_when_uniform_and_grows_with_imbalance():
    N, E, K = 64, 4, 1
    uniform_probs = torch.full((N, E), 1.0 / E)
    balanced_indices = torch.arange(N).remainder(E).view(N, K)
    assert load_balance_loss(uniform_probs, balanced_indices).item() == pytest.approx(1.0)

    # top-2, perfectly balanced assignments and uniform probabilities: still exactly 1
    balanced2 = torch.stack([torch.arange(N) % E, (torch.arange(N) + 1) % E], dim=1)
    assert load_balance_loss(uniform_probs, balanced2).item() == pytest.approx(1.0)

    losses = []
    for skew in [0.0, 0.3, 0.6, 0.9]:
        probs = torch.full((N, E), (1 - (0.25 + skew * 0.75)) / (E - 1))
        probs[:, 0] = 0.25 + skew * 0.75
        n_to_zero = int(N * (0.25 + skew * 0.75))
        indices = balanced_indices.clone()
        indices[:n_to_zero] = 0
        losses.append(load_balance_loss(probs, indices).item())
    assert all(b > a for a, b in itertools.pairwise(losses)), losses
    assert losses[0] == pytest.approx(1.0)


def test_aux_loss_matches_formula_on_random_routing():
    torch.manual_seed(1)
    N, E, K = 40, 5, 2
    probs = torch.softmax(torch.randn(N, E), -1)
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    f = torch.tensor([(indices == e).sum().item() / (N * K) for e in range(E)])
    expected = E * sum(f[e] * probs[:, e].mean() for e in range(E))
    torch.testing.assert_close(load_balance_loss(probs, indices), expected)


def test_z_loss_matches_formula():
    torch.manual_seed(2)
    logits = torch.randn(30, 6) * 3
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 30
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_capacity_drops_exactly_the_overflow():
    N, E, K = 12, 4, 2
    layer = make_layer(n_experts=E, top_k=K, capacity_factor=1.0)
    experts = layer.experts
    x = torch.randn(N, experts.w_in.shape[1])
    # every token picks expert 0 first and expert 1 second: capacity = ceil(1.0 * 12 * 2 / 4) = 6
    indices = torch.stack([torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)], dim=1)
    weights = torch.full((N, K), 0.5)
    capacity = expert_capacity(N, K, E, 1.0)
    assert capacity == 6
    out, kept = dispatch_and_combine(x, indices, weights, experts, capacity)
    assert kept == 12  # 6 for expert 0, 6 for expert 1; the other 12 assignments are dropped
    # tokens 0..5 (earliest) are kept by both experts; tokens 6..11 are dropped by both
    full_0 = experts.expert_forward(x, 0)
    full_1 = experts.expert_forward(x, 1)
    torch.testing.assert_close(out[:6], 0.5 * full_0[:6] + 0.5 * full_1[:6], atol=1e-5, rtol=0)
    assert torch.count_nonzero(out[6:]) == 0


def test_capacity_prefers_first_choices_over_second_choices():
    N, E, K = 8, 2, 2
    layer = make_layer(n_experts=E, top_k=K, capacity_factor=0.5)  # capacity = ceil(0.5*8*2/2) = 4
    experts = layer.experts
    x = torch.randn(N, experts.w_in.shape[1])
    # tokens 0-3 choose expert 1 first; tokens 4-7 choose expert 0 first
    first = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    indices = torch.stack([first, 1 - first], dim=1)
    out, kept = dispatch_and_combine(x, indices, torch.ones(N, K), experts, 4)
    assert kept == 8
    # every token keeps exactly its first choice; all second choices overflow
    expected = torch.where(first.unsqueeze(-1) == 0, experts.expert_forward(x, 0), experts.expert_forward(x, 1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_dropped_fraction_reported_and_zero_when_dropless():
    x = torch.randn(2, 32, 64)
    dropless = make_layer(capacity_factor=0.0)
    assert dropless(x)[1].dropped_fraction.item() == 0.0
    tight = make_layer(capacity_factor=0.25)
    stats = tight(x)[1]
    capacity = expert_capacity(64, 2, 4, 0.25)
    expected_kept = torch.clamp(stats.tokens_per_expert, max=capacity).sum().item()
    assert stats.dropped_fraction.item() == pytest.approx(1 - expected_kept / 128)
    assert stats.dropped_fraction.item() > 0


def test_aux_loss_free_bias_changes_selection_not_weights():
    layer = make_layer(router="topk", top_k=1)
    layer.eval()
    x = torch.randn(64, 64)
    before = layer.router(x)
    layer.router.selection_bias[:] = torch.tensor([10.0, 0.0, 0.0, 0.0])  # force expert 0
    after = layer.router(x)
    assert (after.expert_indices_NK == 0).all()
    torch.testing.assert_close(after.router_probs_NE, before.router_probs_NE)  # bias never enters the probabilities


def test_aux_loss_free_update_moves_load_towards_balance():
    cfg = get_preset("debug", router="topk", top_k=1, router_bias_update_rate=0.05)
    torch.manual_seed(0)
    model = GPT(cfg)
    layer = model.moe_layers()[0]
    with torch.no_grad():  # skew the router hard towards expert 0
        layer.router.gate.weight[0] += 0.5
    x = torch.randn(512, cfg.n_embd)
    layer.eval()

    def max_load_fraction():
        counts = torch.bincount(layer.router(x).expert_indices_NK.flatten(), minlength=cfg.n_experts)
        return counts.max().item() / counts.sum().item()

    start = max_load_fraction()
    for _ in range(60):
        counts = torch.bincount(layer.router(x).expert_indices_NK.flatten(), minlength=cfg.n_experts)
        model.update_router_biases([counts] * len(model.moe_layers()))
    assert start > 0.5
    assert max_load_fraction() < start - 0.2


def test_moe_stats_shapes_and_counts():
    layer = make_layer(top_k=2)
    x = torch.randn(2, 10, 64)
    _, stats = layer(x)
    assert stats.tokens_per_expert.sum().item() == 2 * 10 * 2
    assert stats.router_probs.shape == (20, 4)
    torch.testing.assert_close(stats.router_probs.sum(-1), torch.ones(20))
    assert stats.expert_indices.shape == (20, 2)


def test_router_runs_in_fp32_under_bf16_autocast():
    layer = make_layer()
    x = torch.randn(2, 10, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.router(x.view(-1, 64))
        out, _ = layer(x)
    assert r.router_logits_NE.dtype == torch.float32
    assert r.expert_weights_NK.dtype == torch.float32
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# The grouped expert Function (grouped_ffn.py): its hand-written backward against autograd


@pytest.mark.parametrize("ffn", ["swiglu", "relu", "gelu"])
@pytest.mark.parametrize("top_k,capacity,row_multiple", [(1, None, 1), (2, None, 4), (2, 3, 1), (2, 3, 4)])
def test_grouped_ffn_gradcheck_float64(ffn, top_k, capacity, row_multiple):
    N, D, H, E = 7, 5, 4, 3
    torch.manual_seed(0)
    w_in = torch.randn(E, D, 2 * H if ffn == "swiglu" else H, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(E, H, D, dtype=torch.float64, requires_grad=True)
    b_in = torch.randn(E, w_in.shape[-1], dtype=torch.float64, requires_grad=True)
    b_out = torch.randn(E, D, dtype=torch.float64, requires_grad=True)
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    gate_KN = torch.rand(top_k, N, dtype=torch.float64, requires_grad=True)
    # expert 2 gets nothing: its gradients must come back exactly zero
    indices_NK = torch.stack([torch.randperm(E - 1)[:top_k] for _ in range(N)])
    plan = make_plan(indices_NK, E, capacity, row_multiple)
    if capacity is not None:
        assert plan.n_kept < N * top_k  # the case really drops something
    if row_multiple > 1:  # padding rows exist and every block is a multiple
        assert sum(plan.rows_per_expert()) > plan.n_kept
        assert all(n % row_multiple == 0 for n in plan.rows_per_expert())

    def f(x, gate_KN, w_in, w_out, b_in, b_out):
        return grouped_ffn(x, gate_KN, plan, w_in, w_out, b_in, b_out, ffn)

    assert torch.autograd.gradcheck(f, (x, gate_KN, w_in, w_out, b_in, b_out))
    f(x, gate_KN, w_in, w_out, b_in, b_out).sum().backward()
    assert torch.count_nonzero(w_in.grad[2]) == 0 and torch.count_nonzero(w_out.grad[2]) == 0


def test_plan_sorts_by_expert_keeps_first_choices_and_pads_blocks():
    # 5 tokens, E=3, K=2; expert 0 is everybody's first choice
    indices_NK = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 2], [0, 1]])
    plan = make_plan(indices_NK, 3, capacity=4, row_multiple=4)
    assert plan.rows_per_expert() == [4, 4, 4]  # 4 kept of 5 for expert 0; 3 and 2 padded to 4
    assert plan.offsets_E.dtype == torch.int32 and plan.offsets_E.tolist() == [4, 8, 12]
    assert plan.n_kept.item() == 4 + 3 + 2
    assert plan.token_R.tolist() == [0, 1, 2, 3, 0, 2, 4, 0, 1, 3, 0, 0]
    N, K = indices_NK.shape
    assert plan.slot_R.tolist() == [0, 1, 2, 3, 5, 7, 9, N * K, 6, 8, N * K, N * K]
    R = 12
    assert plan.row_KN.tolist() == [0, 1, 2, 3, R, 4, 8, 5, 9, 6]  # token 4's first choice dropped


def test_fast_dispatch_matches_reference_with_capacity_dropping_outputs_and_grads():
    layer = make_layer(capacity_factor=0.5, bias=True)
    x = torch.randn(2, 16, 64, requires_grad=True)
    assert layer(x)[1].dropped_fraction.item() > 0
    fast, fast_grads = output_and_grads(layer, x, lambda: layer(x)[0])
    ref, ref_grads = output_and_grads(layer, x, lambda: moe_forward_reference(layer, x))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    for g_fast, g_ref in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])  # smooth: relu's kink flips under bf16 rounding
def test_bf16_autocast_matches_reference_loosely_and_keeps_fp32_grads(ffn):
    layer = make_layer(ffn=ffn)
    x = torch.randn(2, 24, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, fast_grads = output_and_grads(layer, x, lambda: layer(x)[0].float())
    ref, ref_grads = output_and_grads(layer, x, lambda: moe_forward_reference(layer, x))
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    for p, g_fast, g_ref in zip(list(layer.parameters()) + [x], fast_grads, ref_grads, strict=True):
        assert g_fast.dtype == p.dtype == torch.float32
        torch.testing.assert_close(g_fast, g_ref, atol=0.05 * g_ref.abs().max().item() + 1e-6, rtol=0)


def test_activation_checkpointing_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    layer = make_layer()
    x = torch.randn(2, 12, 64, requires_grad=True)
    plain, plain_grads = output_and_grads(layer, x, lambda: layer(x)[0])
    ckpt, ckpt_grads = output_and_grads(layer, x, lambda: checkpoint(lambda t: layer(t)[0], x, use_reentrant=False))
    torch.testing.assert_close(ckpt, plain, atol=0, rtol=0)
    for g_ckpt, g_plain in zip(ckpt_grads, plain_grads, strict=True):
        torch.testing.assert_close(g_ckpt, g_plain, atol=0, rtol=0)


def test_expert_weights_stay_plain_parameters():
    experts = make_layer(bias=True).experts
    names = {name: type(p) for name, p in experts.named_parameters()}
    assert names == {"w_in": torch.nn.Parameter, "w_out": torch.nn.Parameter, "b_in": torch.nn.Parameter, "b_out": torch.nn.Parameter}
    assert experts.w_in.shape == (4, 64, 256) and experts.w_out.shape == (4, 128, 64)


def test_padding_tokens_get_no_expert_and_count_in_no_statistic():
    layer = make_layer(top_k=2)
    layer.train()
    x = torch.randn(2, 12, 64, requires_grad=True)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, 7:] = False  # row 0 is padded after 7 real tokens
    out, stats = layer(x, valid)
    real_out, real_stats = layer(torch.cat([x[0, :7], x[1]]).unsqueeze(0))
    # real tokens: same output and same statistics as a batch holding only the real tokens
    torch.testing.assert_close(out[0, :7], real_out[0, :7], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], real_out[0, 7:], atol=1e-6, rtol=0)
    assert torch.equal(stats.tokens_per_expert, real_stats.tokens_per_expert)
    assert stats.tokens_per_expert.sum() == 19 * 2
    torch.testing.assert_close(stats.load_balance_loss, real_stats.load_balance_loss)
    torch.testing.assert_close(stats.z_loss, real_stats.z_loss)
    assert torch.count_nonzero(out[0, 7:]) == 0  # padding computed by no expert
    torch.testing.assert_close(out, moe_forward_reference(layer, x, valid), atol=1e-5, rtol=0)


def test_capacity_limits_only_training():
    layer = make_layer(capacity_factor=0.25)
    x = torch.randn(2, 32, 64)
    layer.train()
    assert layer(x)[1].dropped_fraction.item() > 0
    layer.eval()  # inference is dropless: an output never depends on the rest of the batch
    out, stats = layer(x)
    assert stats.dropped_fraction.item() == 0.0
    torch.testing.assert_close(out[:1], layer(x[:1])[0], atol=1e-6, rtol=0)
