"""GPT model behaviour: causality, loss masking, KV cache, MoE outputs, meta-device init."""

import pytest
import torch

from nanomoe.model import GPT, IGNORE_INDEX, KVCache
from nanomoe.presets import get_preset

ARCHITECTURES = [
    dict(),  # debug: rope, rmsnorm, swiglu, topk MoE
    dict(position="learned", norm="layernorm", ffn="relu", bias=True, router="noisy_topk"),
    dict(ffn="gelu", router="switch", top_k=1, n_kv_head=2, n_shared_experts=1, moe_every=2),
    dict(capacity_factor=0.5),  # token dropping in training; inference stays dropless and exact
    dict(n_experts=0),
]


@pytest.mark.parametrize("changes", ARCHITECTURES)
def test_changing_a_later_token_leaves_earlier_logits_unchanged(changes):
    torch.manual_seed(0)
    model = GPT(get_preset("debug", **changes)).eval()
    idx = torch.randint(0, 512, (2, 24))
    t = 10
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 512
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_padding_targets_never_count_in_the_loss():
    torch.manual_seed(0)
    model = GPT(get_preset("debug")).eval()
    idx = torch.randint(0, 512, (2, 16))
    targets = torch.randint(0, 512, (2, 16))
    padded = targets.clone()
    padded[:, 10:] = IGNORE_INDEX
    with torch.no_grad():
        out = model(idx, padded)
        logits = out.logits[:, :10].reshape(-1, 512)
        expected = torch.nn.functional.cross_entropy(logits, targets[:, :10].reshape(-1))
    assert out.n_loss_tokens.item() == 20
    torch.testing.assert_close(out.loss, expected)
    # whatever the padded positions hold, the loss is the same
    other = padded.clone()
    idx2 = idx.clone()
    idx2[:, 11:] = 7  # later inputs cannot change earlier predictions either
    with torch.no_grad():
        torch.testing.assert_close(model(idx2, other).loss, out.loss)


def test_all_padding_batch_gives_zero_loss_not_nan():
    model = GPT(get_preset("debug"))
    idx = torch.randint(0, 512, (1, 8))
    out = model(idx, torch.full_like(idx, IGNORE_INDEX))
    assert out.loss.item() == 0.0 and out.n_loss_tokens.item() == 0
    out.loss.backward()  # still differentiable


@pytest.mark.parametrize("changes", ARCHITECTURES)
def test_kv_cache_prefill_then_decode_equals_full_forward(changes):
    torch.manual_seed(0)
    cfg = get_preset("debug", **changes)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache(cfg, batch_size=2)
        steps = [model(idx[:, :12], kv_cache=cache, start_pos=0).logits]
        steps.append(model(idx[:, 12:15], kv_cache=cache, start_pos=12).logits)  # a multi-token chunk
        for t in range(15, 20):
            steps.append(model(idx[:, t : t + 1], kv_cache=cache, start_pos=t).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_one_forward_pass_serves_decoding_with_a_tensor_slot_and_last_position_logits():
    """The decode protocol: a (1,) tensor start_pos (what a compiled step passes) and last_only give
    the same logits as the full forward's last position; last_only with targets is refused."""
    torch.manual_seed(0)
    cfg = get_preset("debug")
    model = GPT(cfg).eval()
    idx = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache(cfg, batch_size=2, max_len=16)
        last = model(idx[:, :9], kv_cache=cache, start_pos=0, last_only=True).logits
        step = model(idx[:, 9:], kv_cache=cache, start_pos=torch.tensor([9]), last_only=True).logits
    assert last.shape == (2, 1, cfg.vocab_size)
    torch.testing.assert_close(last, full[:, 8:9], atol=1e-5, rtol=0)
    torch.testing.assert_close(step, full[:, 9:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, idx, last_only=True)


def test_forward_rejects_sequences_longer_than_block_size():
    model = GPT(get_preset("debug"))
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_moe_outputs_one_stats_entry_per_moe_layer_and_aux_loss_uses_coefficients():
    cfg = get_preset("debug", n_layer=4, moe_every=2, aux_loss_coef=0.5, z_loss_coef=0.25)
    model = GPT(cfg)
    out = model(torch.randint(0, 512, (2, 8)))
    assert len(out.moe) == 2 == len(cfg.moe_layers) and cfg.moe_layers == [1, 3]
    expected = sum(0.5 * s.load_balance_loss + 0.25 * s.z_loss for s in out.moe)
    torch.testing.assert_close(out.aux_loss, expected)
    assert GPT(get_preset("debug-dense"))(torch.zeros(1, 4, dtype=torch.long)).aux_loss.item() == 0.0


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    cfg = get_preset("debug", router="noisy_topk", n_shared_experts=1, bias=True, position="learned",
                     norm="layernorm", z_loss_coef=0.01)
    model = GPT(cfg).train()
    idx = torch.randint(0, 512, (4, 32))
    out = model(idx, idx)
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPT(get_preset("debug-dense", dropout=0.5))
    idx = torch.randint(0, 512, (1, 16))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx).logits, model(idx).logits)
        model.train()
        assert not torch.equal(model(idx).logits, model(idx).logits)


def test_tied_embeddings_share_one_tensor():
    model = GPT(get_preset("debug", tie_embeddings=True))
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.num_params() == GPT(get_preset("debug")).num_params() - 512 * 64


def test_meta_device_build_then_materialize_matches_a_normal_build():
    cfg = get_preset("debug")
    with torch.device("meta"):
        meta_model = GPT(cfg)
    assert all(p.is_meta for p in meta_model.parameters())
    meta_model.to_empty(device="cpu")
    torch.manual_seed(0)
    meta_model.init_weights()
    normal = GPT(cfg)
    torch.manual_seed(0)
    normal.init_weights()  # init_weights alone sets every value: same RNG state, same numbers
    for (n1, p1), (n2, p2) in zip(meta_model.named_parameters(), normal.named_parameters()):
        assert n1 == n2
        assert torch.equal(p1, p2), n1
    torch.testing.assert_close(meta_model.rope_cos, normal.rope_cos)
    idx = torch.randint(0, 512, (1, 8))
    assert torch.isfinite(meta_model(idx).logits).all()


def test_bf16_autocast_forward_backward_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    model = GPT(get_preset("debug"))
    idx = torch.randint(0, 512, (2, 32))
    fp32 = model(idx, idx).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, idx)
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - fp32.item()) < 0.05
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_noisy_router_starts_with_zero_noise_weights_and_zero_selection_bias():
    model = GPT(get_preset("debug", router="noisy_topk"))
    for layer in model.moe_layers():
        assert torch.count_nonzero(layer.router.noise.weight) == 0
        assert torch.count_nonzero(layer.router.gate.weight) > 0
        assert torch.count_nonzero(layer.router.selection_bias) == 0


@pytest.mark.parametrize("n_head, n_kv_head", [(4, 4), (4, 2), (4, 1)])
def test_matmul_causal_attention_equals_sdpa_with_gradients(n_head, n_kv_head):
    from nanomoe.kernels.native import matmul_causal_attention as causal_attention

    torch.manual_seed(0)
    q = torch.randn(2, n_head, 17, 8, requires_grad=True)
    k = torch.randn(2, n_kv_head, 17, 8, requires_grad=True)
    v = torch.randn(2, n_kv_head, 17, 8, requires_grad=True)
    g = torch.randn(2, n_head, 17, 8)
    ours = causal_attention(q, k, v)
    ours.backward(g)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv_head != n_head)
    ref.backward(g)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    for mine, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(mine, t.grad, atol=1e-6, rtol=1e-5)


def test_long_sequences_use_sdpa_and_agree_with_the_matmul_path(monkeypatch):
    import nanomoe.kernels.native as model_module  # the native backend's CPU cut-off

    torch.manual_seed(0)
    model = GPT(get_preset("debug")).eval()
    idx = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        matmul = model(idx).logits
        monkeypatch.setattr(model_module, "MATMUL_ATTENTION_MAX_T", 8)  # force the SDPA path
        sdpa = model(idx).logits
    torch.testing.assert_close(matmul, sdpa, atol=1e-5, rtol=0)


def test_moe_routes_only_real_tokens_of_right_padded_rows():
    torch.manual_seed(0)
    model = GPT(get_preset("debug", aux_loss_coef=0.5, z_loss_coef=0.5)).eval()
    idx = torch.randint(0, 512, (1, 20))
    targets = idx.roll(-1, dims=1)
    padded_targets = targets.clone()
    padded_targets[:, 12:] = IGNORE_INDEX  # positions 12.. are padding
    with torch.no_grad():
        padded = model(idx, padded_targets)
        alone = model(idx[:, :12], targets[:, :12])
    torch.testing.assert_close(padded.loss, alone.loss)
    torch.testing.assert_close(padded.aux_loss, alone.aux_loss)  # balancing terms see real tokens only
    for a, b in zip(padded.moe, alone.moe):
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
    # ignored targets *before* a real one (a masked prompt) do not make tokens padding
    masked_prompt = targets.clone()
    masked_prompt[:, :5] = IGNORE_INDEX
    with torch.no_grad():
        out = model(idx, masked_prompt)
    assert sum(int(s.tokens_per_expert.sum()) for s in out.moe) == 20 * 2 * len(out.moe)


def _padded_batch(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    y[1, 10:] = IGNORE_INDEX  # right padding: the MoE layers route only the real tokens
    return x, y


def test_torch_compile_traces_an_moe_model_without_a_graph_break():
    """On the torch backend routing, the dispatch plan, the experts, balancing losses and load
    statistics read no value on the host (tests/test_sync_free_moe.py): in bf16 (grouped GEMM
    experts, the GPU path) dynamo traces the whole forward as one graph."""
    torch._dynamo.reset()
    model = GPT(get_preset("debug", kernels="torch")).train()

    def forward(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, y)

    explanation = torch._dynamo.explain(forward)(*_padded_batch(model.config))
    assert explanation.graph_break_count == 0, [b.reason.splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    # The default backend: the native plan's row count depends on the routing (a dynamic shape), and
    # in fp32 the torch backend's experts are its per-expert loop, run eagerly; nothing else breaks.
    explanation = torch._dynamo.explain(GPT(get_preset("debug")).train())(*_padded_batch(model.config))
    reasons = [b.reason.splitlines()[0] for b in explanation.break_reasons]
    assert all("disable" in r or "Dynamic shape operator" in r for r in reasons), reasons


def test_compiled_moe_training_step_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = GPT(get_preset("debug")).train()
    compiled_model = GPT(get_preset("debug")).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend="aot_eager")  # dynamo + autograd tracing, no C++ build
    x, y = _padded_batch(eager.config, seed=1)
    outs = []
    for m in (eager, compiled):
        torch.manual_seed(1)  # same dropout/noise draws
        out = m(x, y)
        (out.loss + out.aux_loss).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].loss, outs[0].loss)
    torch.testing.assert_close(outs[1].aux_loss, outs[0].aux_loss)
    for s_c, s_e in zip(outs[1].moe, outs[0].moe, strict=True):
        assert torch.equal(s_c.tokens_per_expert, s_e.tokens_per_expert)
    for (name, p_c), p_e in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, msg=name)
