"""Hugging Face interoperability: nanomoe <-> `LlamaForCausalLM` (dense) / `MixtralForCausalLM` (MoE).

Only the conversion of configs and weight names lives here; the model file stays free of it.
Weights are written in the classic Mixtral layout (`block_sparse_moe.experts.N.w1/w2/w3`), which
every transformers release loads (v5 fuses the experts on load).
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ModelConfig
from .errors import ConfigError


def hf_incompatibilities(cfg: ModelConfig) -> list[str]:
    """What would have to change for `cfg` to have a Hugging Face Llama/Mixtral equivalent."""
    problems = []
    if cfg.position != "rope":
        problems.append(f"position={cfg.position!r} (Llama/Mixtral use rotary positions: set position=rope)")
    if cfg.norm != "rmsnorm":
        problems.append(f"norm={cfg.norm!r} (Llama/Mixtral use RMSNorm: set norm=rmsnorm)")
    if cfg.ffn != "swiglu":
        problems.append(f"ffn={cfg.ffn!r} (Llama/Mixtral use SwiGLU: set ffn=swiglu)")
    if cfg.bias:
        problems.append("bias=True (Llama/Mixtral linear layers have no biases)")
    if cfg.is_moe:
        if cfg.router != "topk":
            problems.append(f"router={cfg.router!r} (Mixtral's router is a softmax top-k with renormalized "
                            "weights: router=topk)")
        if cfg.moe_every != 1:
            problems.append(f"moe_every={cfg.moe_every} (every Mixtral layer is MoE)")
        if cfg.n_shared_experts:
            problems.append("n_shared_experts > 0 (Mixtral has no shared experts)")
        if cfg.capacity_factor > 0:
            problems.append("capacity_factor > 0 (Mixtral is dropless)")
        if cfg.router_bias_update_rate > 0:
            problems.append("router_bias_update_rate > 0 (Mixtral has no expert-selection bias)")
    return problems


def check_hf_compatible(cfg: ModelConfig) -> None:
    problems = hf_incompatibilities(cfg)
    if problems:
        target = "MixtralForCausalLM" if cfg.is_moe else "LlamaForCausalLM"
        raise ConfigError(
            f"this model has no Hugging Face {target} equivalent: " + "; ".join(problems)
            + ". Train a model with those settings (e.g. --preset tiny-moe or tiny-llama) to export it."
        )


def hf_config_dict(cfg: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                   pad_token_id: int | None = None) -> dict[str, Any]:
    """The config.json of the equivalent Llama/Mixtral model."""
    check_hf_compatible(cfg)
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,  # transformers < 5
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers >= 5
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        attention_dropout=0.0,
        initializer_range=cfg.init_std,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        torch_dtype="float32",
    )
    if cfg.is_moe:
        return dict(
            common,
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            intermediate_size=cfg.expert_hidden,
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            output_router_logits=False,
            router_aux_loss_coef=cfg.aux_loss_coef,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    return dict(
        common,
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        intermediate_size=cfg.ffn_hidden,
        attention_bias=False,
        mlp_bias=False,
    )


def to_hf_config(cfg: ModelConfig, **token_ids):
    """A transformers LlamaConfig / MixtralConfig object (needs transformers installed)."""
    from transformers import LlamaConfig, MixtralConfig

    data = hf_config_dict(cfg, **token_ids)
    data.pop("architectures"), data.pop("model_type"), data.pop("torch_dtype")
    return (MixtralConfig if cfg.is_moe else LlamaConfig)(**data)


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under Llama/Mixtral names (classic Mixtral expert layout)."""
    cfg: ModelConfig = model.config
    check_hf_compatible(cfg)
    d, Hq, Hkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.tok_emb.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([Hq * d, Hkv * d, Hkv * d], dim=0)
        out[p + "self_attn.q_proj.weight"] = q
        out[p + "self_attn.k_proj.weight"] = k
        out[p + "self_attn.v_proj.weight"] = v
        out[p + "self_attn.o_proj.weight"] = block.attn.proj.weight
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        if block.is_moe:
            moe = block.ffn
            out[p + "block_sparse_moe.gate.weight"] = moe.router.gate.weight
            for e in range(cfg.n_experts):
                gate, up = moe.experts.w_in[e].t().chunk(2, dim=0)  # (H, D) each
                out[p + f"block_sparse_moe.experts.{e}.w1.weight"] = gate
                out[p + f"block_sparse_moe.experts.{e}.w3.weight"] = up
                out[p + f"block_sparse_moe.experts.{e}.w2.weight"] = moe.experts.w_out[e].t()
        else:
            gate, up = block.ffn.fc.weight.chunk(2, dim=0)
            out[p + "mlp.gate_proj.weight"] = gate
            out[p + "mlp.up_proj.weight"] = up
            out[p + "mlp.down_proj.weight"] = block.ffn.proj.weight
    out["model.norm.weight"] = model.final_norm.weight
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    return {name: t.detach().contiguous().clone() for name, t in out.items()}


def save_hf_model(model, out_dir, **token_ids) -> None:
    """Write config.json and model.safetensors that `AutoModelForCausalLM.from_pretrained` loads."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(model.config, **token_ids)
    save_file(to_hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
