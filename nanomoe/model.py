"""GPT language model, dense or Mixture-of-Experts, readable top to bottom.

Architecture only: mixed precision, torch.compile, activation checkpointing and sharding are applied
from outside (see nanomoe/parallelize.py and nanomoe/training). The MoE layer lives in moe.py.

Shape legend: B batch, T query positions, S key positions (T plus any cached prefix),
D model width, Hq query heads, Hkv key/value heads, d head width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .generation import GenerationMixin
from .moe import GroupedExperts, MoEFeedForward, MoEStats, Router, ffn_activation
from .ops import RMSNorm, apply_rope, attention_heads, causal_attention_probs, cross_entropy_sum

IGNORE_INDEX = -100  # target value excluded from the loss (padding, or positions with no next token)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # mean cross-entropy over targets != IGNORE_INDEX
    n_loss_tokens: torch.Tensor | None = None  # how many targets the loss averaged over
    aux_loss: torch.Tensor | None = None  # MoE balancing terms times their coefficients (0 if dense)
    moe: list[MoEStats] = field(default_factory=list)  # one entry per MoE layer, in layer order


# ---------------------------------------------------------------------------------------------
# Building blocks


def make_norm(config: ModelConfig, feeds_matmul: bool = False) -> nn.Module:
    """feeds_matmul: the output is only read by matrix products (not by an fp32 router)."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps, feeds_matmul=feeds_matmul)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cache(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (block_size, d), in the half-split layout used by Llama/Mixtral."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    positions = torch.arange(config.block_size, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (block_size, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (block_size, d)
    return angles.cos(), angles.sin()


# Up to this length, causal attention runs as two batched matrix products around a softmax.
MATMUL_ATTENTION_MAX_T = 384


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v for q (B, Hq, T, d) and k, v (B, Hkv, T, d).

    Why not F.scaled_dot_product_attention: for short sequences on the CPU, batched matrix products
    around a softmax train ~1.4x faster at T=256 and ~3x at T=128 than
    its flash kernel, whose backward is slow; past ~512 positions flash is faster and needs no
    (T, T) scores in memory. Grouped-query heads share their key/value head without copies.
    """
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv  # query heads per key/value head
    q = q.reshape(B * Hkv, G * T, d)  # rows (g, t): the G query heads of one key/value head
    k, v = k.reshape(B * Hkv, T, d), v.reshape(B * Hkv, T, d)
    probs = causal_attention_probs(q, k, d**-0.5)  # native: scale, mask and softmax in one pass
    if probs is None:
        dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
        mask = torch.full((T, T), float("-inf"), device=q.device, dtype=dtype).triu(1).repeat(G, 1)  # (G*T, T)
        scores = torch.baddbmm(mask.expand(B * Hkv, G * T, T), q, k.transpose(1, 2), alpha=d**-0.5)
        # the softmax kernels accumulate half-precision inputs in fp32; an explicit fp32 result would
        # only add two (T, T) conversions per layer
        probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.bmm(probs, v).view(B, Hq, T, d)


class KVCache:
    """Keys and values of past positions for every layer, preallocated to `max_len` (a static cache)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None, *, dtype=None, device=None):
        max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, Hkv, T, d) at positions [start_pos, start_pos+T); return all keys/values so far."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; position {end - 1} does not fit")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # one fused projection for q, k and v: a single matrix product instead of three
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x_BTD, rope=None, kv_cache: KVCache | None = None, start_pos: int = 0, attn_mask=None):
        """attn_mask: optional (B, 1, T, S) bool, True where a query may see a key; it replaces the
        causal rule (the caller builds causality and padding into it)."""
        B, T, _ = x_BTD.shape
        Hq, Hkv = self.n_head, self.n_kv_head
        qkv = self.qkv(x_BTD).view(B, T, Hq + 2 * Hkv, self.head_dim)
        heads = attention_heads(qkv, rope, Hq, Hkv) if kv_cache is None else None  # native: one pass
        if heads is not None:
            q, k, v = heads  # (B, H, T, d), contiguous
        else:
            # split, not slicing: the backward of a split is one cat, of a slice zeros plus a copy
            qk, v = qkv.split([Hq + Hkv, Hkv], dim=2)
            if rope is not None:  # q and k heads rotated together: half the kernels of two calls
                qk = apply_rope(qk, *rope)
            q, k = qk.split([Hq, Hkv], dim=2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, d)

        mask, is_causal = None, True
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)  # (B, Hkv, S, d)
            if start_pos > 0:
                is_causal = False
                if T > 1:  # query i sits at absolute position start_pos + i and sees keys <= it
                    S = k.shape[2]
                    mask = torch.ones(T, S, dtype=torch.bool, device=x_BTD.device).tril(diagonal=S - T)
        if attn_mask is not None:
            mask, is_causal = attn_mask, False
        dropout_p = self.dropout if self.training else 0.0
        if is_causal and mask is None and T <= MATMUL_ATTENTION_MAX_T:
            y = causal_attention(q, k, v, dropout_p)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, enable_gqa=Hkv != Hq
            )  # (B, Hq, T, d)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Dense feed-forward: relu/gelu MLP, or SwiGLU with fused [gate | up] input projection."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool):
        super().__init__()
        self.activation = activation
        self.fc = nn.Linear(dim, 2 * hidden if activation == "swiglu" else hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.proj(ffn_activation(self.fc(x), self.activation))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config, feeds_matmul=True)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.ffn_norm = make_norm(config, feeds_matmul=not self.is_moe)  # the router reads it in fp32
        if self.is_moe:
            shared = None
            if config.n_shared_experts > 0:
                shared = FeedForward(config.n_embd, config.n_shared_experts * config.expert_hidden, config.ffn, config.bias)
            self.ffn = MoEFeedForward(config, shared_expert=shared)
        else:
            self.ffn = FeedForward(config.n_embd, config.ffn_hidden, config.ffn, config.bias)
        self.ffn_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache: KVCache | None = None, start_pos: int = 0, attn_mask=None, valid=None):
        x = x + self.attn(self.attn_norm(x), rope, kv_cache, start_pos, attn_mask)
        stats = None
        if self.is_moe:
            h, stats = self.ffn(self.ffn_norm(x), valid)
        else:
            h = self.ffn(self.ffn_norm(x))
        x = x + self.ffn_dropout(h)
        return x, stats


# ---------------------------------------------------------------------------------------------
# The model


class GPT(GenerationMixin, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.final_norm = make_norm(config, feeds_matmul=True)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # rope tables are derived data: not saved in checkpoints, rebuilt by init_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter and buffer. Also used after building on the meta device.

        Walks `named_modules()` once, touching each module's own parameters only when visiting it:
        parallelize.init_sharded_weights relies on that to materialize one module at a time."""
        cfg = self.config
        std = cfg.init_std
        # residual projections scaled by 1/sqrt(2 * n_layer) (GPT-2) so the residual stream's variance
        # does not grow with depth
        resid_std = std / math.sqrt(2 * cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("attn.proj", "ffn.proj", "shared_expert.proj"))
                nn.init.normal_(module.weight, mean=0.0, std=resid_std if is_residual else std)
                if name.endswith("router.noise"):  # Shazeer et al.: the noise std starts at softplus(0)
                    nn.init.zeros_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.w_in, mean=0.0, std=std)
                nn.init.normal_(module.w_out, mean=0.0, std=resid_std)
                if module.b_in is not None:
                    nn.init.zeros_(module.b_in)
                    nn.init.zeros_(module.b_out)
            elif isinstance(module, Router):
                module.selection_bias.zero_()
        if cfg.position == "rope":
            device = self.tok_emb.weight.device
            cos, sin = rope_cache(cfg, device=None if device.type == "meta" else device)
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """idx (B, T) token ids at positions [start_pos, start_pos+T); targets (B, T) or None.

        Targets equal to IGNORE_INDEX (-100) never count in the loss. With `kv_cache`, keys and values
        are stored and earlier positions are read from it (incremental decoding).

        Batches of prompts of different lengths (left-padded, see nanomoe/generation.py) pass
        `positions` (B, T), each row's own positions, and `attn_mask` (B, 1, T, S) bool, True where a
        query may attend to a key; `start_pos` then only says where the cache stores the new keys.
        """
        B, T = idx.shape
        if start_pos + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start_pos + T} positions exceeds block_size {self.config.block_size}; "
                "crop the input or use a model with a larger block_size"
            )
        x = self.tok_emb(idx)  # (B, T, D)
        rope = None
        if positions is None:  # every row at positions [start_pos, start_pos+T)
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(start_pos, start_pos + T, device=idx.device))
            else:
                # (T, 1, d): broadcast over the batch and the heads of (B, T, H, d)
                rope = (self.rope_cos[start_pos : start_pos + T, None], self.rope_sin[start_pos : start_pos + T, None])
        elif self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:  # (B, T, 1, d): one table per row, broadcast over heads
            rope = (self.rope_cos[positions].unsqueeze(2), self.rope_sin[positions].unsqueeze(2))
        x = self.emb_dropout(x)

        # Trailing positions whose targets are all IGNORE_INDEX are padding (documents are padded on
        # the right) and, attention being causal, can never affect a real position: MoE layers route
        # only the other tokens. (Ignored targets before a real one, e.g. a masked prompt, stay routed.)
        valid = None
        if targets is not None and self.config.is_moe:
            has_target = (targets != IGNORE_INDEX).to(torch.int8)
            valid = has_target.flip(-1).cummax(dim=-1).values.flip(-1).bool()  # a real target at or after t
            if bool(valid.all()):
                valid = None
        x, moe_stats = self._run_blocks(x, rope, kv_cache, start_pos, attn_mask, valid)
        logits = self.lm_head(self.final_norm(x))  # (B, T, V)

        out = ModelOutput(logits=logits, moe=moe_stats, aux_loss=self.aux_loss(moe_stats))
        if targets is not None:
            # loss in fp32 and summed over valid targets, so padding never counts and an all-padding
            # batch gives 0 rather than NaN
            loss_sum = cross_entropy_sum(logits.view(-1, logits.shape[-1]), targets.reshape(-1), IGNORE_INDEX)
            n = (targets != IGNORE_INDEX).sum()
            out.loss = loss_sum / n.clamp(min=1)
            out.n_loss_tokens = n
        return out

    def _run_blocks(self, x, rope, kv_cache, start_pos, attn_mask, valid) -> tuple[torch.Tensor, list[MoEStats]]:
        # A function of its own for torch.compile: the MoE dispatch is a graph break, and a break in a
        # loop makes dynamo run the whole frame eagerly. Here that frame is only the loop; each block,
        # and the head and loss after it, are still compiled.
        moe_stats: list[MoEStats] = []
        for block in self.blocks:
            x, stats = block(x, rope, kv_cache, start_pos, attn_mask, valid)
            if stats is not None:
                moe_stats.append(stats)
        return x, moe_stats

    def aux_loss(self, moe_stats: list[MoEStats]) -> torch.Tensor:
        """Sum over MoE layers of the balancing terms weighted by their config coefficients."""
        total = self.tok_emb.weight.new_zeros((), dtype=torch.float32)
        cfg = self.config
        for s in moe_stats:
            if cfg.aux_loss_coef > 0:
                total = total + cfg.aux_loss_coef * s.load_balance_loss
            if cfg.z_loss_coef > 0:
                total = total + cfg.z_loss_coef * s.z_loss
        return total

    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.ffn for b in self.blocks if b.is_moe]

    @torch.no_grad()
    def update_router_biases(self, tokens_per_expert: list[torch.Tensor]) -> None:
        """Aux-loss-free balancing step; call after optimizer.step() with each MoE layer's
        tokens_per_expert (summed over micro-batches, and over ranks when data-parallel)."""
        for layer, load in zip(self.moe_layers(), tokens_per_expert, strict=True):
            layer.update_selection_bias(load)

    def num_params(self, active_only: bool = False) -> int:
        """Parameter count (shared tensors once). Active: what one token touches (top_k of E experts)."""
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if not active_only:
            return total
        inactive = 0
        for layer in self.moe_layers():
            per_expert = sum(p[0].numel() for p in layer.experts.parameters())
            inactive += (layer.n_experts - layer.top_k) * per_expert
        return total - inactive
