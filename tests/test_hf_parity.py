"""Pin the model to an independent implementation: Hugging Face Llama (dense) and Mixtral (MoE)."""

import pytest
import torch

from nanomoe.errors import ConfigError
from nanomoe.hf import check_hf_compatible, save_hf_model
from nanomoe.model import GPT
from nanomoe.presets import get_preset

transformers = pytest.importorskip("transformers")


def randomized(model: GPT) -> GPT:
    """Random weights everywhere, norms included, so no component can hide behind an init of 1 or 0."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    return model.eval()


def hf_logits(model: GPT, tmp_path, idx):
    save_hf_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf, hf(idx).logits


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_dense_matches_llama(tmp_path, n_kv_head):
    cfg = get_preset("debug-dense", n_kv_head=n_kv_head, rope_theta=500.0, norm_eps=1e-6)
    model = randomized(GPT(cfg))
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    hf, expected = hf_logits(model, tmp_path, idx)
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_topk_moe_matches_mixtral(tmp_path, top_k):
    cfg = get_preset("debug", router="topk", top_k=top_k, n_experts=4, n_kv_head=2, norm_eps=1e-6)
    model = randomized(GPT(cfg))
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    hf, expected = hf_logits(model, tmp_path, idx)
    assert type(hf).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, expected, atol=1e-5, rtol=0)


def test_tied_embeddings_round_trip(tmp_path):
    cfg = get_preset("debug-dense", tie_embeddings=True)
    model = randomized(GPT(cfg))
    idx = torch.randint(0, cfg.vocab_size, (1, 16))
    _, expected = hf_logits(model, tmp_path, idx)
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, expected, atol=1e-5, rtol=0)


def test_models_without_hf_equivalent_are_refused_with_what_to_change():
    with pytest.raises(ConfigError, match="position=rope") as err:
        check_hf_compatible(get_preset("nanogpt-moe"))
    assert "norm=rmsnorm" in str(err.value) and "ffn=swiglu" in str(err.value)
    with pytest.raises(ConfigError, match="router=topk"):  # noisy_topk exports (noise is training-only); switch not
        check_hf_compatible(get_preset("debug", router="switch"))
    with pytest.raises(ConfigError, match="shared experts"):
        check_hf_compatible(get_preset("debug", n_shared_experts=1))
