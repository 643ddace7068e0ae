"""The native backend of the decode step (csrc/decode_step.cpp): one C++ call per new token.

`GPT.forward` over a static KV cache is the definition (tests/test_native_decode.py holds this step
to it, token for token). The step is not a custom operator: it is stateful (it keeps packed copies
of the weights), runs only under inference mode and has no gradient, so there is nothing for
torch.compile or autograd to see; `Kernels.decode_step` hands it to the Decoder.
"""

from __future__ import annotations

import warnings

import torch

from .extension import load_extension


def unsupported_reason(model) -> str | None:
    """Why `model` cannot decode natively, or None if it can."""
    weight = model.tok_emb.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}, the native step runs on the CPU"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"weights in {weight.dtype}; the native step reads float32 or bfloat16"
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1:
        return f"parameters of several dtypes ({sorted(map(str, dtypes))})"
    if model.training:
        return "the model is in training mode (dropout, router noise): call model.eval()"
    return None


def _named(**tensors) -> dict[str, torch.Tensor]:
    """The entries that exist (a model without biases has none to pass), detached and contiguous
    (the kernels read rows; a contiguous tensor is passed as it is, without a copy)."""
    return {k: t.detach().contiguous() for k, t in tensors.items() if t is not None}


def _layer_tensors(block, k_cache: torch.Tensor, v_cache: torch.Tensor) -> dict[str, torch.Tensor]:
    attn = block.attn
    entries = _named(attn_norm_w=block.attn_norm.weight, attn_norm_b=getattr(block.attn_norm, "bias", None),
                     qkv_w=attn.qkv.weight, qkv_b=attn.qkv.bias, proj_w=attn.proj.weight, proj_b=attn.proj.bias,
                     ffn_norm_w=block.ffn_norm.weight, ffn_norm_b=getattr(block.ffn_norm, "bias", None),
                     k_cache=k_cache, v_cache=v_cache)
    if not block.is_moe:
        ffn = block.ffn
        return entries | _named(fc_w=ffn.fc.weight, fc_b=ffn.fc.bias, out_w=ffn.proj.weight, out_b=ffn.proj.bias)
    moe, experts = block.ffn, block.ffn.experts
    shared = moe.shared_expert
    # experts store (E, in, out) for x @ w; the kernels read nn.Linear's (out, in) rows: transposed copies
    return entries | _named(
        gate_w=moe.router.gate.weight, selection_bias=moe.router.selection_bias,
        experts_in=experts.w_in.detach().transpose(1, 2).contiguous(), experts_in_b=experts.b_in,
        experts_out=experts.w_out.detach().transpose(1, 2).contiguous(), experts_out_b=experts.b_out,
        shared_fc_w=shared.fc.weight if shared is not None else None,
        shared_fc_b=shared.fc.bias if shared is not None else None,
        shared_out_w=shared.proj.weight if shared is not None else None,
        shared_out_b=shared.proj.bias if shared is not None else None,
    )


class NativeDecodeStep:
    """Callable (tokens_B, slot, pad_B) -> (logits (B, V) fp32, [per MoE layer (B, K) expert ids]),
    over the decoder's KVCache (model.py).

    Reads the model's dense weight matrices in place at batch 1; keeps packed copies of them for
    batches, transposed copies of expert weights (and packed ones for batches), and copies of the
    norms, biases, router and rope tables: build a new one after changing the model.
    """

    def __init__(self, module, model, cache):
        cfg = model.config
        rope = cfg.position == "rope"
        globals_ = _named(tok_emb=model.tok_emb.weight, lm_head=model.lm_head.weight,
                          pos_emb=model.pos_emb.weight if model.pos_emb is not None else None,
                          final_norm_w=model.final_norm.weight, final_norm_b=getattr(model.final_norm, "bias", None),
                          rope_cos=model.rope_cos if rope else None, rope_sin=model.rope_sin if rope else None)
        layers = [_layer_tensors(block, cache.k[i], cache.v[i]) for i, block in enumerate(model.blocks)]
        B, max_len = cache.k[0].shape[0], cache.max_len
        dims = [cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.ffn_hidden, cfg.vocab_size, cfg.block_size,
                B, max_len, cfg.n_experts, cfg.top_k if cfg.is_moe else 0, cfg.expert_hidden if cfg.is_moe else 0]
        self._moe = cfg.is_moe
        self._step = module.DecodeStep(globals_, layers, dims, [cfg.norm, cfg.position, cfg.ffn, cfg.router],
                                       float(cfg.norm_eps))

    def __call__(self, tokens_B: torch.Tensor, slot: int, pad_B: torch.Tensor):
        logits, experts = self._step.step(tokens_B, slot, pad_B)
        return logits, list(experts.unbind(0)) if self._moe else []


def native_decode_step(model, cache) -> NativeDecodeStep | None:
    """A native step for `model` over `cache`, or None when the model does not qualify or the
    extension cannot be built."""
    if unsupported_reason(model) is not None or (module := load_extension()) is None:
        return None
    try:
        return NativeDecodeStep(module, model, cache)
    except RuntimeError as e:  # e.g. weights whose shapes disagree with the config: decode another way
        warnings.warn(f"the native decode step does not take this model ({e}); decoding without it", stacklevel=2)
        return None
