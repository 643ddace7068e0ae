"""Attention on CUDA: SDPA's fused kernels (flash / memory-efficient) at every length, in training,
prefill and batched decoding, grouped-query heads included. The CUDA tests run in scripts/gpu_check.sh
and skip elsewhere; the CPU test holds the head expansion they rely on to SDPA's own GQA mode."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanomoe.config import ModelConfig
from nanomoe.generation import Decoder
from nanomoe.kernels import reference
from nanomoe.model import GPT

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]  # the math kernel is not allowed


def test_expanded_kv_heads_equal_sdpa_grouped_query_mode():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 5, 16, generator=gen)
    k, v = torch.randn(2, 2, 7, 16, generator=gen), torch.randn(2, 2, 7, 16, generator=gen)
    mask = torch.rand(2, 1, 5, 7, generator=gen) > 0.3
    mask[..., 0] = True  # every query sees a key
    grouped = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    expanded = torch.nn.functional.scaled_dot_product_attention(
        q, reference.expand_kv_heads(k, 8), reference.expand_kv_heads(v, 8), attn_mask=mask)
    torch.testing.assert_close(expanded, grouped)
    # query head h reads key/value head h // 4
    assert torch.equal(reference.expand_kv_heads(k, 8)[:, 5], k[:, 1])


def _gqa_model(device: str, dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, block_size=256, n_layer=2, n_head=8, n_kv_head=2, n_embd=128,
                         n_experts=4, top_k=2, kernels="torch")
    return GPT(config).to(device=device, dtype=dtype)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("T", [64, 256])
def test_training_forward_backward_runs_on_fused_kernels(T):
    model = _gqa_model("cuda", torch.bfloat16)
    idx = torch.randint(0, 256, (4, T), device="cuda")
    with sdpa_kernel(FUSED):
        out = model(idx, targets=idx)
        out.loss.backward()
    reference_model = _gqa_model("cpu", torch.float32)
    expected = reference_model(idx.cpu(), targets=idx.cpu()).loss
    torch.testing.assert_close(out.loss.float().cpu(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@needs_cuda
def test_prefill_and_batched_decoding_run_on_fused_kernels():
    model = _gqa_model("cuda", torch.bfloat16).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]  # left padding: a mask in prefill and every step
    with torch.inference_mode(), sdpa_kernel(FUSED):
        decoder = Decoder(model, batch_size=3, max_len=64)
        logits, _ = decoder.prefill(prompts)
        for _ in range(4):
            logits, _ = decoder.step(logits.argmax(-1))
    assert torch.isfinite(logits).all()
