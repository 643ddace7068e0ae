"""Named model configurations. Any field can be overridden: `get_preset("tiny-moe", n_layer=4)` or
`--set n_layer=4` on the command line. `nanomoe params --preset NAME` shows what each one costs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig, load_config_file, parse_overrides
from .errors import ConfigError

# The modern recipe (Llama / Mixtral): rotary positions, RMSNorm, SwiGLU, no biases.
MODERN = dict(position="rope", norm="rmsnorm", ffn="swiglu", bias=False)
# The original NanoGPT-MoE TinyStories project's recipe (nanoGPT): learned positions, LayerNorm, 4x ReLU MLP, biases.
CLASSIC = dict(position="learned", norm="layernorm", ffn="relu", bias=True)

# tiny-moe and its dense twin, the shapes the budget presets below shrink.
TINY_MOE = dict(vocab_size=2048, block_size=256, n_layer=6, n_head=4, n_embd=256, n_experts=8, top_k=2,
                expert_hidden=512, router="topk", aux_loss_coef=0.01, z_loss_coef=0.001, **MODERN)
TINY_DENSE = dict(vocab_size=2048, block_size=256, n_layer=6, n_head=4, n_embd=256, ffn_hidden=1024, **MODERN)


@dataclass(frozen=True)
class Preset:
    description: str
    fields: dict[str, Any]


PRESETS: dict[str, Preset] = {
    "debug": Preset(
        "tiny MoE for tests: 2 layers, 4 experts, top-2",
        dict(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64, n_experts=4, top_k=2,
             expert_hidden=128, aux_loss_coef=0.01, **MODERN),
    ),
    "debug-dense": Preset(
        "tiny dense model for tests",
        dict(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64, ffn_hidden=256, **MODERN),
    ),
    "nanogpt-dense": Preset(
        "the original NanoGPT-MoE project's standard NanoGPT (~10M parameters)",
        dict(vocab_size=2048, block_size=1080, n_layer=8, n_head=8, n_embd=288, dropout=0.1, **CLASSIC),
    ),
    "nanogpt-moe": Preset(
        "the original NanoGPT-MoE project's trained MoE: 12 layers, 8 experts, top-2 noisy gating "
        "(see docs/nanogpt-moe.md)",
        dict(vocab_size=2048, block_size=1080, n_layer=12, n_head=8, n_embd=256, dropout=0.1,
             n_experts=8, top_k=2, router="noisy_topk", aux_loss_coef=0.01, **CLASSIC),
    ),
    "nanogpt-dense-modern": Preset(
        "nanogpt-dense with rope + rmsnorm + swiglu",
        dict(vocab_size=2048, block_size=1080, n_layer=8, n_head=8, n_embd=288, ffn_hidden=768, dropout=0.1,
             **MODERN),
    ),
    "nanogpt-moe-modern": Preset(
        "nanogpt-moe with rope + rmsnorm + swiglu experts and a Mixtral top-2 router",
        dict(vocab_size=2048, block_size=1080, n_layer=12, n_head=8, n_embd=256, dropout=0.1, n_experts=8,
             top_k=2, expert_hidden=683, router="topk", aux_loss_coef=0.01, **MODERN),
    ),
    "tiny-moe": Preset(
        "TinyStories MoE for a laptop CPU: 6 layers, 8 experts of which 2 active (the benchmarks' model)",
        TINY_MOE,
    ),
    "tiny-dense": Preset(
        "dense twin of tiny-moe: same active parameters per token (hidden = top_k * expert_hidden)",
        TINY_DENSE,
    ),
    # The winners of the size studies (docs/training.md, "Studies"): on a 2-core CPU, 10 minutes of
    # training buy ~1.5-2k steps, and a smaller step learns more in that time than a deeper model.
    "budget-moe": Preset(
        "the default: the MoE that trains best in minutes on a CPU (tiny-moe, 3 layers, experts 256 wide)",
        dict(TINY_MOE, n_layer=3, expert_hidden=256),
    ),
    "budget-dense": Preset(
        "budget-moe's dense twin (same active parameters: hidden = top_k * expert_hidden)",
        dict(TINY_DENSE, n_layer=3, ffn_hidden=512),
    ),
    "tiny-moe-switch": Preset(
        "tiny-moe with Switch top-1 routing and 8 experts twice as wide (same active FLOPs)",
        dict(vocab_size=2048, block_size=256, n_layer=6, n_head=4, n_embd=256, n_experts=8, top_k=1,
             expert_hidden=1024, router="switch", aux_loss_coef=0.01, z_loss_coef=0.001, **MODERN),
    ),
    "tiny-moe-classic": Preset(
        "tiny-moe in the NanoGPT-MoE project's style: learned positions, LayerNorm, ReLU experts, noisy top-2 gating",
        dict(vocab_size=2048, block_size=256, n_layer=6, n_head=4, n_embd=256, n_experts=8, top_k=2,
             expert_hidden=512, router="noisy_topk", aux_loss_coef=0.01, **CLASSIC),
    ),
    "tiny-llama": Preset(
        "dense Llama-style model of llama2.c's stories15M shape (6 x 288, SwiGLU 768) with a 2048 vocab",
        dict(vocab_size=2048, block_size=256, n_layer=6, n_head=6, n_embd=288, ffn_hidden=768, **MODERN),
    ),
    "moe-3b": Preset(
        "~3B-parameter MoE (the CPU-first MoE Transformer project's target): 24 layers, 8 experts top-2, "
        "GQA; ~1B active",
        dict(vocab_size=32000, block_size=2048, n_layer=24, n_head=16, n_kv_head=4, n_embd=2048, n_experts=8,
             top_k=2, expert_hidden=2240, router="topk", aux_loss_coef=0.01, z_loss_coef=0.001, **MODERN),
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named config with `overrides` applied (validated as a whole)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name].fields, **overrides})


def resolve_model_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: list[str] | None = None
) -> ModelConfig:
    """Preset, then the `[model]` section of a config file (or a bare model JSON such as a
    checkpoint's model.json), then `--set key=value` overrides, each on top of the previous."""
    fields: dict[str, Any] = {}
    file_data: dict[str, Any] = {}
    if config_file is not None:
        file_data = load_config_file(config_file)
        preset = preset or file_data.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        fields.update(PRESETS[preset].fields)
    if file_data:
        model_section = file_data.get("model", None)
        if model_section is None and "n_layer" in file_data:  # a bare model config
            model_section = file_data
        fields.update(model_section or {})
    fields.update(parse_overrides(ModelConfig, overrides))
    if not fields:
        raise ConfigError("no model given: pass --preset NAME (see `nanomoe params --list`) or --config FILE")
    return ModelConfig.from_dict(fields)
