"""The native (C++) decode step: the same tokens and logits as the model's own forward pass, for
every dense architecture it claims, batched or not, fp32 and bf16; and a clean fallback elsewhere."""

import shutil

import pytest
import torch

from nanomoe import native
from nanomoe.generation import Decoder, generate_batch
from nanomoe.model import GPT
from nanomoe.presets import get_preset

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the native decode step")

ARCHITECTURES = {
    "llama": dict(),  # debug preset: rope, rmsnorm, swiglu
    "classic": dict(position="learned", norm="layernorm", ffn="relu", bias=True),
    "gelu-gqa": dict(ffn="gelu", n_kv_head=2, norm="layernorm", bias=False),
    "tied": dict(tie_embeddings=True, n_kv_head=1),
}


def make_dense(arch: str, **changes) -> GPT:
    torch.manual_seed(0)
    model = GPT(get_preset("debug", n_experts=0, **{**ARCHITECTURES[arch], **changes})).eval()
    with torch.no_grad():  # biases and norm weights away from their 0 / 1 init, so a wrong one shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def extension():
    module = native.load_extension()
    assert module is not None, f"the native decode step did not build: {native._build_error}"
    return module


def decode_logits(model, prompts, n_steps, *, compile):
    """Logits of prefill and of n_steps greedy steps (the tokens chosen from the eager logits, so both
    decoders see the same inputs)."""
    eager = Decoder(model, len(prompts), 64)
    other = Decoder(model, len(prompts), 64, compile=compile)
    out = []
    with torch.inference_mode():
        ref, _ = eager.prefill(prompts)
        other.prefill(prompts)
        for _ in range(n_steps):
            tokens = ref.float().argmax(-1)
            ref, _ = eager.step(tokens)
            got, _ = other.step(tokens)
            out.append((ref.float(), got.float()))
    return other, out


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("threads", [1, 2])
def test_native_step_matches_the_model_in_fp32(extension, arch, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # two threads split every product's rows and the attention heads
    try:
        model = make_dense(arch)
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


@pytest.mark.parametrize("batch", [1, 2, 9, 40])  # matrix-vector, packed AVX512-BF16, AMX tiles (one and two 32-row passes)
def test_native_step_in_bf16_matches_the_bf16_model(extension, batch):
    model = make_dense("llama", n_embd=64, n_head=4, n_kv_head=2).to(torch.bfloat16)  # K multiple of 32: AMX
    prompts = [[(7 * b + i) % 200 + 1 for i in range(1 + b % 5)] for b in range(batch)]
    decoder, pairs = decode_logits(model, prompts, 6, compile=True)
    assert decoder.backend == "native"
    for ref, got in pairs:
        # the native step keeps fp32 activations where the eager bf16 model rounds after every op:
        # they differ by bf16 rounding, far less than the logits' spread (a wrong row or weight
        # block gives differences of the order of the spread)
        spread = ref.std().item()
        assert (got - ref).abs().max().item() < 0.1 * spread


def test_native_step_reads_the_cache_the_prompt_filled_and_continues_it(extension):
    """Prefill through the model, then steps natively: the same as running the whole sequence."""
    model = make_dense("classic")
    sequence = [3, 1, 4, 1, 5, 9, 2, 6]
    decoder = Decoder(model, 1, 32, compile=True)
    with torch.inference_mode():
        decoder.prefill([sequence[:3]])
        for t in sequence[3:]:
            logits, _ = decoder.step(torch.tensor([t]))
        full = model(torch.tensor([sequence])).logits[0, -1]
    torch.testing.assert_close(logits[0], full, atol=2e-5, rtol=1e-5)


def test_bad_inputs_raise_instead_of_reading_past_the_weights(extension):
    model = make_dense("llama")
    decoder = Decoder(model, 1, 16, compile=True)
    with torch.inference_mode():
        decoder.prefill([[1, 2]])
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            decoder.step(torch.tensor([model.config.vocab_size]))
        decoder.next_slot = 16
        with pytest.raises(Exception, match="full"):
            decoder.step(torch.tensor([1]))


def test_models_the_native_step_does_not_cover_fall_back(monkeypatch):
    moe = GPT(get_preset("debug")).eval()
    assert native.unsupported_reason(moe) is not None
    assert Decoder(moe, 1, 16, compile=True).backend == "eager"
    dense = make_dense("llama")
    monkeypatch.setenv("NANOMOE_NATIVE_DECODE", "0")
    assert Decoder(dense, 1, 16, compile=True).backend == "compiled"
    monkeypatch.delenv("NANOMOE_NATIVE_DECODE")
    assert Decoder(dense, 1, 16).backend == "eager"
    mixed = make_dense("llama")
    mixed.lm_head.to(torch.bfloat16)
    assert "several dtypes" in native.unsupported_reason(mixed)
