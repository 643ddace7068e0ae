"""Hugging Face interoperability: nanomoe <-> `LlamaForCausalLM` (dense) / `MixtralForCausalLM` (MoE).

Only the conversion of configs and weight names lives here; the model file stays free of it.
Weights are written in the classic Mixtral layout (`block_sparse_moe.experts.N.w1/w2/w3`), which
every transformers release loads (v5 fuses the experts on load).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .atomic_io import temporary_dir, usual_permissions
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
        # noisy_topk exports: its noise is training-only, and at inference a softmax over the K kept logits
        # equals Mixtral's renormalized top-k of the full softmax
        if cfg.router == "switch":
            problems.append("router='switch' (Switch gates are the raw probabilities; Mixtral's router "
                            "renormalizes the top-k: router=topk)")
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
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(model.config, **token_ids)
    save_file(to_hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Full export: weights + config + tokenizer + generation defaults + model card, one folder that
# `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load.

EXPORT_MARKER = "nanomoe_export.json"  # provenance; also marks a folder `--force` may replace
EXPORT_FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_tokenizer(tokenizer):
    """The nanomoe tokenizer as a Hugging Face `tokenizers.Tokenizer` giving the same ids.

    Byte-level BPE is one already. The word tokenizer becomes a BPE model without merges and with
    `ignore_merges`: a piece in the vocabulary is one token, any other piece falls apart into its
    characters (unknown ones -> <|unknown|>), exactly nanomoe's word-then-character fallback.
    Both get a post-processor that puts <|endoftext|> in front when special tokens are added (the
    transformers default), because every training document starts after one.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    from .data.tokenizer import EOT, UNKNOWN, WORD_PIECE_RE

    if tokenizer.kind == "bpe":
        hf = HFTokenizer.from_str(tokenizer.hf.to_str())
    else:
        vocab = {token: i for i, token in enumerate(tokenizer.vocab)}
        try:
            model = models.BPE(vocab=vocab, merges=[], unk_token=UNKNOWN if UNKNOWN in vocab else None,
                               fuse_unk=False, ignore_merges=True)
        except TypeError:
            raise ConfigError("exporting a word tokenizer needs tokenizers >= 0.20 (BPE ignore_merges); "
                              "pip install -U tokenizers") from None
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PIECE_RE.pattern), behavior="isolated")
        hf.decoder = decoders.Fuse()  # pieces carry their own spaces: join them as they are
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokenizer.special_tokens])
    eot = tokenizer.eot_id
    prepend_eot = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B:1", special_tokens=[(EOT, eot)]
    )
    hf.post_processor = prepend_eot if hf.post_processor is None else processors.Sequence(
        [hf.post_processor, prepend_eot])
    return hf


def hf_special_tokens(tokenizer) -> dict[str, Any]:
    """transformers' special-token settings: <|endoftext|> is bos, eos and pad."""
    from .data.tokenizer import EOT, UNKNOWN

    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    if UNKNOWN in tokenizer.special_tokens:
        special["unk_token"] = UNKNOWN
    extra = [t for t in tokenizer.special_tokens if t not in (EOT, UNKNOWN)]
    if extra:
        special["additional_special_tokens"] = extra
    return special


def save_hf_tokenizer(tokenizer, out_dir, *, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for `AutoTokenizer`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tokenizer(tokenizer).save(str(out / "tokenizer.json"))
    special = hf_special_tokens(tokenizer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode must give the text back exactly
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def generation_config_dict(eot_id: int) -> dict[str, Any]:
    """Sampling defaults matching nanomoe's story samples (temperature 0.8, top-k 50)."""
    return {
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 50,
    }


def _model_card(model, tokenizer, config: dict[str, Any], info: dict[str, Any], dtype: str) -> str:
    cfg: ModelConfig = model.config
    arch = config["architectures"][0]
    total, active = model.num_params(), model.num_params(active_only=True)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [nanomoe, {config['model_type']}, {'mixture-of-experts' if cfg.is_moe else 'dense'}]",
        "---",
        "",
        f"# {info.get('name', 'nanomoe model')}",
        "",
        f"A {'Mixture-of-Experts' if cfg.is_moe else 'dense'} GPT trained with nanomoe and exported as `{arch}`.",
        "",
        "| | |",
        "|---|---|",
        (f"| architecture | `{arch}`: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} query heads / "
         f"{cfg.n_kv_head} key-value heads, rotary positions (theta {cfg.rope_theta:g}), RMSNorm, SwiGLU |"),
    ]
    if cfg.is_moe:
        lines.append(f"| experts | {cfg.n_experts} per layer, top-{cfg.top_k} routing, expert hidden width "
                     f"{cfg.expert_hidden} (trained with the `{cfg.router}` router) |")
    else:
        lines.append(f"| feed-forward | hidden width {cfg.ffn_hidden} |")
    lines += [
        f"| parameters | {total:,} total, {active:,} active per token |",
        f"| context | {cfg.block_size} tokens |",
        (f"| vocabulary | {cfg.vocab_size} ({'byte-level BPE' if tokenizer.kind == 'bpe' else 'word-level'} "
         "tokenizer) |"),
        f"| weights | `model.safetensors`, {dtype} |",
    ]
    for key, label in (("step", "training steps"), ("tokens_seen", "training tokens"),
                       ("data_source", "training data"), ("val_loss", "validation loss (nats/token)"),
                       ("checkpoint", "exported from")):
        if info.get(key) is not None:
            value = info[key]
            value = f"{value:,}" if isinstance(value, int) else (f"{value:.4f}" if isinstance(value, float) else value)
            lines.append(f"| {label} | {value} |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{info.get("name", "PATH")}")',
        f'model = AutoModelForCausalLM.from_pretrained("{info.get("name", "PATH")}")',
        'inputs = tokenizer("Once upon a time", return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=100)",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
        "The tokenizer puts `<|endoftext|>` in front of the text (every training document starts after one);",
        "pass `add_special_tokens=False` to leave it out. `<|endoftext|>` is also the end-of-text,",
        "beginning-of-text and padding token. `generation_config.json` samples at temperature 0.8 with",
        "top-k 50, as nanomoe's own samples do; `do_sample=False` gives the same greedy tokens as nanomoe.",
    ]
    if cfg.is_moe and cfg.router == "noisy_topk":
        lines += ["", "The router was trained with noisy top-k gating (Shazeer et al. 2017). The noise only",
                  "acts in training; at inference the gate is a softmax over the top-k logits, which is",
                  "what Mixtral computes, so the noise weights are not exported."]
    return "\n".join(lines) + "\n"


def export_hf(model, tokenizer, out_dir, *, dtype: str = "float32", overwrite: bool = False,
              info: dict[str, Any] | None = None) -> Path:
    """Write a folder `transformers` loads: config.json, model.safetensors, generation_config.json,
    tokenizer files, README.md (model card) and nanomoe_export.json (provenance).

    Written under a temporary name and renamed, so a crash never leaves a half export under
    `out_dir`. An existing non-empty `out_dir` is only replaced with `overwrite` and only when it is
    an earlier nanomoe export. `info`: name, step, tokens_seen, val_loss, data_source, checkpoint.
    """
    from safetensors.torch import save_file

    from . import __version__

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg: ModelConfig = model.config
    check_hf_compatible(cfg)
    if tokenizer is None:
        raise ConfigError("this checkpoint holds no tokenizer.json, which the export needs")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / EXPORT_MARKER).is_file():
            raise ConfigError(f"--out {out} is not empty and is not a nanomoe export; choose another directory "
                              "(nothing is ever written over files nanomoe did not make)")
        if not overwrite:
            raise ConfigError(f"--out {out} already holds an export; pass --force to replace it, or choose another")
    info = dict(info or {})
    eot = tokenizer.eot_id
    config = hf_config_dict(cfg, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    config["torch_dtype"] = config["dtype"] = dtype  # transformers < 5 reads torch_dtype, >= 5 dtype

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        weights = {name: t.to("cpu", DTYPES[dtype]) for name, t in to_hf_state_dict(model).items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config_dict(eot), indent=2) + "\n")
        save_hf_tokenizer(tokenizer, tmp, model_max_length=cfg.block_size)
        (tmp / "README.md").write_text(_model_card(model, tokenizer, config, info, dtype))
        provenance = {"format": EXPORT_FORMAT, "nanomoe_version": __version__,
                      "architecture": config["architectures"][0],
                      "dtype": dtype, "tokenizer_sha256": tokenizer.sha256, "model_config": cfg.to_dict(), **info}
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        provenance["files"] = written + [EXPORT_MARKER]
        (tmp / EXPORT_MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                usual_permissions(f)
        if out.exists():
            _refuse_foreign_files(out, set(provenance["files"]))
            old = out.parent / f".old-{out.name}-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except ConfigError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"could not write the export to {out}: {e.strerror or e}; free some space or choose "
                          "another --out") from None
    return out


def _refuse_foreign_files(out: Path, ours: set[str]) -> None:
    """--force replaces an earlier export, never files the user put beside it."""
    try:
        earlier = json.loads((out / EXPORT_MARKER).read_text()).get("files") or []
    except (OSError, ValueError, AttributeError):
        earlier = []
    known = ours | set(earlier)
    foreign = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                     and p.relative_to(out).as_posix() not in known)
    if foreign:
        raise ConfigError(f"--out {out} holds files the earlier export did not write ({', '.join(foreign[:5])}); "
                          "move them elsewhere or choose another --out (--force only replaces nanomoe's own files)")
