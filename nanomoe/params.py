"""Parameter, FLOP and memory calculator, computed from the config alone (no model is built).

Counts are exact: tests check them against `sum(p.numel())` of the real model built on the meta
device. FLOPs and memory are estimates whose assumptions are written next to each formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    token_embedding: int
    position_embedding: int
    attention: int  # all layers: fused qkv + output projection (+ biases)
    norms: int  # all layers + final norm
    dense_ffn: int  # feed-forward of non-MoE layers
    router: int  # gate (+ noise) projections of MoE layers
    experts: int  # all routed experts of all MoE layers
    experts_active: int  # the top_k experts one token uses, all MoE layers
    shared_experts: int
    lm_head: int  # 0 when tied to the token embedding

    @property
    def total(self) -> int:
        return (
            self.token_embedding + self.position_embedding + self.attention + self.norms + self.dense_ffn
            + self.router + self.experts + self.shared_experts + self.lm_head
        )

    @property
    def active(self) -> int:
        return self.total - self.experts + self.experts_active

    @property
    def embedding(self) -> int:
        return self.token_embedding + self.position_embedding


def _ffn_weights(dim: int, hidden: int, activation: str) -> int:
    """Weight-matrix entries of one feed-forward net (SwiGLU has a fused [gate | up] input)."""
    in_width = 2 * hidden if activation == "swiglu" else hidden
    return dim * in_width + hidden * dim


def _ffn_params(dim: int, hidden: int, activation: str, bias: bool) -> int:
    in_width = 2 * hidden if activation == "swiglu" else hidden
    return _ffn_weights(dim, hidden, activation) + ((in_width + dim) if bias else 0)


def norm_params(cfg: ModelConfig) -> int:
    """Parameters of one norm layer (gain, and a bias for a biased LayerNorm)."""
    return cfg.n_embd * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


def _attention_weights(cfg: ModelConfig) -> int:
    """Weight-matrix entries of one attention layer: fused qkv and the output projection."""
    return cfg.n_embd * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim + cfg.n_head * cfg.head_dim * cfg.n_embd


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    D, d = cfg.n_embd, cfg.head_dim
    attention_biases = ((cfg.n_head + 2 * cfg.n_kv_head) * d + D) if cfg.bias else 0

    n_moe = len(cfg.moe_layers)
    n_dense = cfg.n_layer - n_moe
    per_expert = _ffn_params(D, cfg.expert_hidden, cfg.ffn, cfg.bias)
    router_per_layer = cfg.n_experts * D * (2 if cfg.router == "noisy_topk" else 1)
    shared_per_layer = (
        _ffn_params(D, cfg.n_shared_experts * cfg.expert_hidden, cfg.ffn, cfg.bias) if cfg.n_shared_experts else 0
    )
    return ParamCounts(
        token_embedding=cfg.vocab_size * D,
        position_embedding=cfg.block_size * D if cfg.position == "learned" else 0,
        attention=cfg.n_layer * (_attention_weights(cfg) + attention_biases),
        norms=(2 * cfg.n_layer + 1) * norm_params(cfg),
        dense_ffn=n_dense * _ffn_params(D, cfg.ffn_hidden, cfg.ffn, cfg.bias),
        router=n_moe * router_per_layer,
        experts=n_moe * cfg.n_experts * per_expert,
        experts_active=n_moe * cfg.top_k * per_expert,
        shared_experts=n_moe * shared_per_layer,
        lm_head=0 if cfg.tie_embeddings else cfg.vocab_size * D,
    )


def parameter_shapes(cfg: ModelConfig) -> list[tuple[int, ...]]:
    """The shape of every parameter tensor of the model, in model order (tested against the real
    model). FSDP shards each tensor on its first dimension, so the shapes, not only the counts,
    decide how much each rank holds."""
    D, d = cfg.n_embd, cfg.head_dim

    def linear(n_in: int, n_out: int, bias: bool) -> list[tuple[int, ...]]:
        return [(n_out, n_in)] + ([(n_out,)] if bias else [])

    def ffn(hidden: int) -> list[tuple[int, ...]]:
        in_width = 2 * hidden if cfg.ffn == "swiglu" else hidden
        return linear(D, in_width, cfg.bias) + linear(hidden, D, cfg.bias)

    norm = [(D,)] * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    shapes: list[tuple[int, ...]] = [(cfg.vocab_size, D)]
    if cfg.position == "learned":
        shapes.append((cfg.block_size, D))
    for i in range(cfg.n_layer):
        shapes += norm + linear(D, (cfg.n_head + 2 * cfg.n_kv_head) * d, cfg.bias)
        shapes += linear(cfg.n_head * d, D, cfg.bias) + norm
        if cfg.is_moe_layer(i):
            E, H = cfg.n_experts, cfg.expert_hidden
            in_width = 2 * H if cfg.ffn == "swiglu" else H
            shapes += [(E, D)] * (2 if cfg.router == "noisy_topk" else 1)
            shapes += [(E, D, in_width), (E, H, D)] + ([(E, in_width), (E, D)] if cfg.bias else [])
            if cfg.n_shared_experts:
                shapes += ffn(cfg.n_shared_experts * H)
        else:
            shapes += ffn(cfg.ffn_hidden)
    shapes += norm
    if not cfg.tie_embeddings:
        shapes.append((cfg.vocab_size, D))
    return shapes


def fsdp_shard_numel(cfg: ModelConfig, gpus: int) -> int:
    """Elements one rank holds when FSDP2 shards every parameter on dim 0 over `gpus` ranks.

    Each rank's shard is ceil(dim0 / gpus) rows (the last ranks' padded): an expert tensor
    (E, D, H) with fewer experts than ranks gives every rank a whole expert, not 1/gpus of them."""
    return sum(-(-shape[0] // gpus) * math.prod(shape[1:]) for shape in parameter_shapes(cfg))


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Matrix-product FLOPs per token (multiply-add = 2 FLOPs), forward and training (3x forward:
    the backward pass costs two products per forward product).

    - Every weight matrix a token touches costs 2 FLOPs per entry: attention projections, the dense
      FFN or the router plus top_k experts (+ shared experts), and the LM head (also when tied).
      The noisy router's noise projection counts too (it runs in training).
    - Attention scores and the weighted sum of values cost 2 * 2 * d_attn per (query, key) pair; a
      causal mask means a query at position t sees t+1 keys, (seq_len + 1) / 2 on average.
    - Embedding lookups, norms, activations, softmax and biases are not counted (not matmuls).
    """
    seq_len = seq_len or cfg.block_size
    D = cfg.n_embd
    n_moe = len(cfg.moe_layers)
    moe_layer = (
        cfg.n_experts * D * (2 if cfg.router == "noisy_topk" else 1)
        + cfg.top_k * _ffn_weights(D, cfg.expert_hidden, cfg.ffn)
        + (_ffn_weights(D, cfg.n_shared_experts * cfg.expert_hidden, cfg.ffn) if cfg.n_shared_experts else 0)
    )
    matmul_weights = (
        cfg.n_layer * _attention_weights(cfg)
        + (cfg.n_layer - n_moe) * _ffn_weights(D, cfg.ffn_hidden, cfg.ffn)
        + n_moe * moe_layer
        + cfg.vocab_size * D
    )
    attention_forward = cfg.n_layer * 4 * cfg.n_head * cfg.head_dim * (seq_len + 1) / 2
    forward = 2 * matmul_weights + attention_forward
    return {
        "forward": forward,
        "train": 3 * forward,
        "matmul_weights": matmul_weights,
        "attention_forward": attention_forward,
        "seq_len": seq_len,
    }


def activation_elements_per_token(cfg: ModelConfig) -> dict[str, float]:
    """Elements autograd saves per token for the backward pass, split by storage dtype.

    `low`: tensors produced by matrix products (bf16 under autocast, fp32 otherwise);
    `fp32`: the residual stream, norm statistics, router and loss tensors (always fp32).
    An estimate: it lists the saved inputs/outputs of each op in model.py and nanomoe/moe.
    """
    D, d = cfg.n_embd, cfg.head_dim
    q_width, kv_width = cfg.n_head * d, cfg.n_kv_head * d
    low, fp32 = 0.0, 0.0
    for i in range(cfg.n_layer):
        fp32 += 2 * D  # inputs of the two norms (residual stream)
        low += D  # qkv input (norm output)
        low += q_width + 2 * kv_width  # q, k, v saved by attention
        low += q_width  # attention output = proj input
        fp32 += cfg.n_head  # attention logsumexp
        if cfg.dropout > 0:
            fp32 += 2 * D / 4  # two residual dropout masks (1 byte each)
        if cfg.is_moe_layer(i):
            H, K = cfg.expert_hidden, cfg.top_k
            in_w = 2 * H if cfg.ffn == "swiglu" else H
            fp32 += D + 2 * cfg.n_experts  # router input, router probabilities and logits
            low += K * (D + in_w + H + D)  # gathered inputs, pre-activation, activation, outputs
            if cfg.n_shared_experts:
                Hs = cfg.n_shared_experts * H
                low += D + (2 * Hs if cfg.ffn == "swiglu" else Hs) + Hs
        else:
            H = cfg.ffn_hidden
            low += D + (2 * H if cfg.ffn == "swiglu" else H) + H  # fc input, pre-activation, activation
    fp32 += D  # final norm input
    low += D  # lm head input
    fp32 += 2 * cfg.vocab_size  # fp32 logits and their softmax for the loss
    return {"low": low, "fp32": fp32}


def memory_estimate(
    cfg: ModelConfig, batch_size: int, seq_len: int | None = None, gpus: int = 1
) -> dict[str, dict[str, float]]:
    """Training memory in bytes, for fp32 and bf16-autocast training, with/without activation
    checkpointing, and per GPU when parameters, gradients and AdamW states are sharded by FSDP over
    `gpus` devices, as nanomoe.parallelize.shard_model does it (FSDP2, one unit per block):
    - one device, bf16 autocast: the bf16 copies of the weights that the matrix products cast and
      autograd keeps for the backward pass (`weight_casts`, 2 bytes per matmul parameter);
    - 16 bytes per sharded parameter: fp32 weights, fp32 gradients, AdamW m and v, each tensor split
      on dim 0 into ceil(dim0 / gpus) rows per rank (`fsdp_shard_numel`: the expert tensors hold
      whole experts, so past n_experts ranks they stop shrinking);
    - unsharded, in the compute dtype: two blocks' parameters and gradients (the current block and the
      prefetched one), plus the root unit (embeddings, final norm, head), which FSDP2 keeps gathered
      from the forward pass to the end of the backward pass; with bf16 compute, one block's gradients
      also in fp32 (the reduce-scatter runs in fp32)."""
    seq_len = seq_len or cfg.block_size
    counts = count_parameters(cfg)
    P = counts.total
    tokens = batch_size * seq_len
    act = activation_elements_per_token(cfg)
    block_input = cfg.n_embd * 4  # what activation checkpointing keeps per layer (fp32 residual)
    n_moe = len(cfg.moe_layers)
    per_layer = (counts.attention + counts.norms - norm_params(cfg)) / cfg.n_layer  # attention + 2 norms
    largest_block = per_layer + max(
        (counts.router + counts.experts + counts.shared_experts) / n_moe if n_moe else 0,
        counts.dense_ffn / (cfg.n_layer - n_moe) if cfg.n_layer > n_moe else 0,
    )
    root_unit = counts.embedding + counts.lm_head + norm_params(cfg)
    # what autocast casts to bf16 for a matrix product: all but the embedding lookups, the norms and
    # the fp32 router; a tied head casts the token embedding
    cast_params = P - counts.embedding - counts.norms - counts.router
    if cfg.tie_embeddings:
        cast_params += counts.token_embedding
    shard_numel = fsdp_shard_numel(cfg, gpus)

    result = {}
    for precision, low_bytes in (("fp32", 4), ("bf16", 2)):
        per_token = act["low"] * low_bytes + act["fp32"] * 4
        per_layer_token = (per_token - 2 * cfg.vocab_size * 4) / cfg.n_layer
        activations = per_token * tokens
        # checkpointing: block inputs of every layer + one block recomputed + logits
        checkpointed = (cfg.n_layer * block_input + per_layer_token + 2 * cfg.vocab_size * 4) * tokens
        weights, grads, optimizer = 4 * P, 4 * P, 8 * P  # fp32 master weights, grads, AdamW m and v
        weight_casts = cast_params * low_bytes if low_bytes < 4 else 0
        state = weights + grads + optimizer + weight_casts
        row = {
            "weights": weights,
            "gradients": grads,
            "optimizer": optimizer,
            "weight_casts": weight_casts,
            "activations": activations,
            "activations_checkpointed": checkpointed,
            "total": state + activations,
            "total_checkpointed": state + checkpointed,
        }
        if gpus > 1 or precision == "bf16":
            unsharded = (2 * largest_block + root_unit) * low_bytes * 2  # params + grads in compute dtype
            if low_bytes < 4:
                unsharded += 4 * largest_block  # fp32 copy of one block's gradients for the reduce-scatter
            sharded_state = 16 * shard_numel  # the gathered bf16 blocks above replace the weight casts
            row["fsdp_shard_params"] = shard_numel
            row["fsdp_per_gpu"] = sharded_state + unsharded + activations
            row["fsdp_per_gpu_checkpointed"] = sharded_state + unsharded + checkpointed
        result[precision] = {k: int(round(v)) for k, v in row.items()}
    return result


def calculate(
    cfg: ModelConfig, *, batch_size: int = 1, seq_len: int | None = None, gpus: int = 1
) -> dict:
    """Everything `nanomoe params` prints, as one JSON-serializable dict."""
    counts = count_parameters(cfg)
    flops = flops_per_token(cfg, seq_len)
    return {
        "total_params": counts.total,
        "active_params": counts.active,
        "embedding_params": counts.embedding,
        "non_embedding_params": counts.total - counts.embedding,
        "active_non_embedding_params": counts.active - counts.embedding,
        "components": {
            "token_embedding": counts.token_embedding,
            "position_embedding": counts.position_embedding,
            "attention": counts.attention,
            "norms": counts.norms,
            "dense_ffn": counts.dense_ffn,
            "router": counts.router,
            "experts": counts.experts,
            "experts_active": counts.experts_active,
            "shared_experts": counts.shared_experts,
            "lm_head": counts.lm_head,
        },
        "flops_per_token_train": flops["train"],
        "flops_per_token_forward": flops["forward"],
        "flops_per_token_attention_forward": flops["attention_forward"],
        "seq_len": flops["seq_len"],
        "batch_size": batch_size,
        "gpus": gpus,
        "memory_bytes": memory_estimate(cfg, batch_size, seq_len, gpus),
    }
