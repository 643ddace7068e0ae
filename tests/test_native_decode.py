"""The native (C++) decode step: the same tokens and logits as the model's own forward pass, for
every dense architecture it claims, batched or not, fp32 and bf16; and a clean fallback elsewhere."""

import copy
import platform
import shutil

import pytest
import torch

from nanomoe.generation import Decoder, generate_batch
from nanomoe.kernels import decode
from nanomoe.kernels import extension as build
from nanomoe.model import GPT
from nanomoe.presets import get_preset

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the native decode step")

ARCHITECTURES = {
    "llama": dict(n_experts=0),  # debug preset: rope, rmsnorm, swiglu
    "classic": dict(n_experts=0, position="learned", norm="layernorm", ffn="relu", bias=True),
    "gelu-gqa": dict(n_experts=0, ffn="gelu", n_kv_head=2, norm="layernorm", bias=False),
    "tied": dict(n_experts=0, tie_embeddings=True, n_kv_head=1),
    # MoE: the debug preset is rope, rmsnorm, swiglu, 4 experts, top-2 "topk" router
    "mixtral": dict(),
    "nanogpt-moe": dict(position="learned", norm="layernorm", ffn="relu", bias=True, router="noisy_topk"),
    "switch-shared": dict(ffn="gelu", router="switch", top_k=1, n_kv_head=2, n_shared_experts=2, moe_every=2),
    "aux-free": dict(router_bias_update_rate=1e-3),
}


def make_model(arch: str, **changes) -> GPT:
    torch.manual_seed(0)
    model = GPT(get_preset("debug", **{"kernels": "native", **ARCHITECTURES[arch], **changes})).eval()
    with torch.no_grad():  # biases and norm weights away from their 0 / 1 init, so a wrong one shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for layer in model.moe_layers():  # a selection bias that changes which experts win
            layer.router.selection_bias.copy_(torch.randn(layer.n_experts) * 0.05)
    return model


@pytest.fixture(scope="module")
def extension():
    module = build.load_extension()
    assert module is not None, f"the native decode step did not build: {build.build_error()}"
    return module


def decode_logits(model, prompts, n_steps, *, compile):
    """Logits and experts of n_steps greedy steps, eager and the other decoder (the tokens chosen
    from the eager logits, so both decoders see the same inputs)."""
    eager = Decoder(model, len(prompts), 64)
    other = Decoder(model, len(prompts), 64, compile=compile)
    out = []
    with torch.inference_mode():
        ref, _ = eager.prefill(prompts)
        other.prefill(prompts)
        for _ in range(n_steps):
            tokens = ref.float().argmax(-1)
            ref, ref_experts = eager.step(tokens)
            got, got_experts = other.step(tokens)
            out.append((ref.float(), got.float()))
            assert len(got_experts) == len(ref_experts)
            for a, b in zip(ref_experts, got_experts):
                assert torch.equal(a, b), "the native router chose other experts"
    return other, out


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("threads", [1, 2])
def test_native_step_matches_the_model_in_fp32(extension, arch, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # two threads split every product's rows and the attention heads
    try:
        model = make_model(arch)
        prompts = [[1, 2, 3, 4, 5], [6, 7], [8]]  # left padding of different lengths
        decoder, pairs = decode_logits(model, prompts, 12, compile=True)
        assert decoder.backend == "native"
        for ref, got in pairs:
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
        eager_tokens = generate_batch(model, prompts, 20, temperature=0)
        assert generate_batch(model, prompts, 20, temperature=0, compile=True) == eager_tokens
        assert generate_batch(model, prompts, 20, temperature=0, use_cache=False) == eager_tokens
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("batch", [1, 2, 9, 40])  # matrix-vector, packed AVX512-BF16, AMX tiles (one and two 32-row passes)
def test_native_step_in_bf16_tracks_the_same_weights_in_fp32(extension, arch, batch):
    model = make_model(arch, n_kv_head=2).to(torch.bfloat16)  # n_embd 64, hidden 128: AMX tiles (K % 32 == 0)
    reference = copy.deepcopy(model).float()  # the same (bf16) weights, fp32 arithmetic
    prompts = [[(7 * b + i) % 200 + 1 for i in range(1 + b % 5)] for b in range(batch)]
    exact = Decoder(reference, batch, 64)
    decoder = Decoder(model, batch, 64, compile=True)
    assert decoder.backend == "native"
    agree = total = 0
    with torch.inference_mode():
        ref, _ = exact.prefill(prompts)
        decoder.prefill(prompts)
        for _ in range(6):
            tokens = ref.argmax(-1)
            ref, ref_experts = exact.step(tokens)
            got, got_experts = decoder.step(tokens)
            # the native step keeps fp32 activations and rounds only the products' inputs to bf16:
            # far less than the logits' spread (a wrong row or weight block is of its order)
            assert (got - ref).abs().max().item() < 0.1 * ref.std().item()
            for a, b in zip(ref_experts, got_experts):
                agree += int((a == b).sum())
                total += a.numel()
    if total:  # rounding may flip a near-tie between two experts, rarely
        assert agree >= 0.9 * total


@pytest.mark.slow
def test_the_portable_build_without_avx512_gives_the_same_logits(extension):
    """Most laptops have no AVX-512: the same source built for baseline x86-64 (scalar fallbacks
    everywhere) must compile and match the model. Its own build, cached like the main one."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the baseline build is an x86-64 target")
    portable = build.build_extension(["-O3", "-march=x86-64", "-fopenmp"])
    assert not portable.has_avx512_bf16()
    for arch in ("llama", "nanogpt-moe"):
        model = make_model(arch)
        prompts = [[1, 2, 3], [4]]
        eager, other = Decoder(model, 2, 32), Decoder(model, 2, 32)
        step = decode.NativeDecodeStep(portable, model, other.cache)
        with torch.inference_mode():
            ref, _ = eager.prefill(prompts)
            other.prefill(prompts)
            for slot in range(3, 8):
                tokens = ref.argmax(-1)
                ref, ref_experts = eager.step(tokens)
                got, got_experts = step(tokens, slot, other.pad_B)
                torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
                assert all(torch.equal(a, b) for a, b in zip(ref_experts, got_experts))


def test_native_step_reads_the_cache_the_prompt_filled_and_continues_it(extension):
    """Prefill through the model, then steps natively: the same as running the whole sequence."""
    model = make_model("classic")
    sequence = [3, 1, 4, 1, 5, 9, 2, 6]
    decoder = Decoder(model, 1, 32, compile=True)
    with torch.inference_mode():
        decoder.prefill([sequence[:3]])
        for t in sequence[3:]:
            logits, _ = decoder.step(torch.tensor([t]))
        full = model(torch.tensor([sequence])).logits[0, -1]
    torch.testing.assert_close(logits[0], full, atol=2e-5, rtol=1e-5)


def test_bad_inputs_raise_instead_of_reading_past_the_weights(extension):
    model = make_model("llama")
    decoder = Decoder(model, 1, 16, compile=True)
    with torch.inference_mode():
        decoder.prefill([[1, 2]])
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            decoder.step(torch.tensor([model.config.vocab_size]))
        decoder.next_slot = 16
        with pytest.raises(Exception, match="full"):
            decoder.step(torch.tensor([1]))


def test_odd_layouts_decode_natively_and_bad_shapes_fall_back(extension):
    # a non-contiguous weight (as a transposed copy leaves it) is fine: the step reads a contiguous copy
    model = make_model("llama")
    w = model.blocks[0].attn.proj.weight
    model.blocks[0].attn.proj.weight = torch.nn.Parameter(w.detach().t().contiguous().t())
    assert not model.blocks[0].attn.proj.weight.is_contiguous()
    decoder, pairs = decode_logits(model, [[1, 2, 3]], 4, compile=True)
    assert decoder.backend == "native"
    for ref, got in pairs:
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    # weights that disagree with the config would be read out of bounds: refused, decoded otherwise
    grown = make_model("llama")
    grown.lm_head.weight = torch.nn.Parameter(torch.randn(grown.config.vocab_size + 8, grown.config.n_embd))
    with pytest.warns(UserWarning, match="lm_head has shape"):
        assert Decoder(grown, 1, 16, compile=True).backend != "native"


def test_a_decoder_keeps_the_kernel_thresholds_it_was_built_with(extension):
    """Changing the AMX threshold later must not make a built decoder read past its padded buffers."""
    model = make_model("llama").to(torch.bfloat16)

    def one_step(decoder):
        with torch.inference_mode():
            decoder.prefill([[1, 2], [3]])
            return decoder.step(torch.tensor([4, 5]))[0]

    built_before = Decoder(model, 2, 16, compile=True)  # 2 rows: the packed kernel, not AMX
    try:
        extension.set_amx_min_batch(1)
        changed = one_step(built_before)
    finally:
        extension.set_amx_min_batch(8)
    # the same kernel as a decoder built and run at the default: bitwise the same logits (AMX would
    # sum in another order, and read 32-row blocks its buffers were not padded for)
    assert torch.equal(changed, one_step(Decoder(model, 2, 16, compile=True)))


def test_models_the_native_step_does_not_cover_fall_back(monkeypatch):
    dense, moe = make_model("llama"), make_model("mixtral")
    assert Decoder(dense, 1, 16).backend == "eager"  # compile=False
    # the torch kernels have no step of their own
    dense_torch, moe_torch = make_model("llama", kernels="torch"), make_model("mixtral", kernels="torch")
    assert Decoder(dense_torch, 1, 16, compile=True).backend == "compiled"
    assert Decoder(moe_torch, 1, 16, compile=True).backend == "eager"  # the graph breaks at every MoE layer
    assert Decoder(dense, 1, 16, compile=True, native=False).backend == "compiled"
    assert Decoder(moe, 1, 16, compile=True, native=False).backend == "eager"
    half = make_model("llama").to(torch.float16)
    assert "float16" in decode.unsupported_reason(half)
    mixed = make_model("llama")
    mixed.lm_head.to(torch.bfloat16)
    assert "several dtypes" in decode.unsupported_reason(mixed)
    training = make_model("llama").train()  # dropout and router noise are not in the native step
    assert "training mode" in decode.unsupported_reason(training)
