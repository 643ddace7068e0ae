"""GPT language model, dense or Mixture-of-Experts, readable top to bottom.

Architecture only: mixed precision, torch.compile, activation checkpointing and sharding are applied
from outside (see nanomoe/parallelize.py and nanomoe/training). The MoE layer lives in nanomoe/moe/.
Ops with more than one implementation (norms, attention, activations, loss, routing, experts) are
called through `self.kernels`, the table of the backend `config.kernels` chose (nanomoe/kernels).

Shape legend: B batch, T query positions, S key positions (T, or the KV cache slots read),
D model width, Hq query heads, Hkv key/value heads, d head width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .config import ModelConfig
from .generation import GenerationMixin
from .kernels import Kernels, select
from .moe import MoEFeedForward, MoEStats

IGNORE_INDEX = -100  # target value excluded from the loss (padding, or positions with no next token)


@contextlib.contextmanager
def _as_is(module: nn.Module):
    yield


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # mean cross-entropy over targets != IGNORE_INDEX
    n_loss_tokens: torch.Tensor | None = None  # how many targets the loss averaged over
    aux_loss: torch.Tensor | None = None  # MoE balancing terms times their coefficients (0 if dense)
    moe: list[MoEStats] = field(default_factory=list)  # one entry per MoE layer, in layer order


# ---------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), the norm of Llama and Mixtral."""

    def __init__(self, dim: int, eps: float = 1e-5, feeds_matmul: bool = False, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or select()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.feeds_matmul = feeds_matmul  # only matrix products read the output (a hint for the kernels)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps, self.feeds_matmul)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(config: ModelConfig, kernels: Kernels, feeds_matmul: bool = False) -> nn.Module:
    """feeds_matmul: the output is only read by matrix products (not by an fp32 router)."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps, feeds_matmul=feeds_matmul, kernels=kernels)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def _init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def rope_cache(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (block_size, d), in the half-split layout used by Llama/Mixtral."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    positions = torch.arange(config.block_size, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (block_size, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (block_size, d)
    return angles.cos(), angles.sin()


class KVCache:
    """Keys and values of every layer in preallocated (B, Hkv, max_len, d) buffers: a static cache.

    The one protocol of incremental decoding: `GPT.forward(..., kv_cache=cache, start_pos=s)` writes
    the new keys at slots [s, s + T) and attention reads the first `read_len` slots (all by
    default), under a mask that hides slots not written yet (and padding). Shapes never depend on
    the position, and `start_pos` may be a (1,) tensor, so one compiled decode step serves every
    token. One buffer per layer: an in-place write into a view of one big tensor would make a
    compiled graph copy the whole cache every step.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None, *, dtype=None, device=None):
        self.max_len = max_len or config.block_size
        shape = (batch_size, config.n_kv_head, self.max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.read_len = self.max_len  # slots attention reads (the caller may narrow it to those written)

    def update(self, layer: int, slots_T: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, Hkv, T, d) at `slots_T`; return the first `read_len` slots of the layer."""
        # (under autocast k and v may be bf16 while the cache has the weights' dtype)
        self.k[layer].index_copy_(2, slots_T, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots_T, v.to(self.v[layer].dtype))
        return self.k[layer][:, :, : self.read_len], self.v[layer][:, :, : self.read_len]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows [start, stop) of this one, sharing its buffers (writes land here too):
        a server keeps one cache and decodes the rows in use, or prefills one row."""
        view = object.__new__(KVCache)
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.max_len, view.read_len = self.max_len, self.max_len
        return view


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # one fused projection for q, k and v: a single matrix product instead of three
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def init_weights(self, std: float, resid_std: float) -> None:
        _init_linear(self.qkv, std)
        _init_linear(self.proj, resid_std)

    def forward(self, x_BTD, rope=None, kv_cache: KVCache | None = None, slots_T=None, attn_mask=None):
        """attn_mask: optional (B or 1, 1, T, S) bool, True where a query may see a key; None: causal.
        With kv_cache, the new keys go to cache slots `slots_T` and the queries read the cache."""
        B, T, _ = x_BTD.shape
        Hq, Hkv = self.n_head, self.n_kv_head
        qkv = self.qkv(x_BTD).view(B, T, Hq + 2 * Hkv, self.head_dim)
        q, k, v = self.kernels.attention_heads(qkv, rope, Hq, Hkv)  # (B, H, T, d), q and k rotated
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, slots_T, k, v)  # (B, Hkv, S, d)
        dropout_p = self.dropout if self.training else 0.0
        y = self.kernels.attention(q, k, v, attn_mask, attn_mask is None, dropout_p)  # (B, Hq, T, d)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Dense feed-forward: relu/gelu MLP, or SwiGLU with fused [gate | up] input projection."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or select()
        self.activation = activation
        self.fc = nn.Linear(dim, 2 * hidden if activation == "swiglu" else hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)

    def init_weights(self, std: float, resid_std: float) -> None:
        _init_linear(self.fc, std)
        _init_linear(self.proj, resid_std)

    def forward(self, x):
        return self.proj(self.kernels.activation(self.fc(x), self.activation))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int, kernels: Kernels):
        super().__init__()
        self.attn_norm = make_norm(config, kernels, feeds_matmul=True)
        self.attn = CausalSelfAttention(config, layer_idx, kernels)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.ffn_norm = make_norm(config, kernels, feeds_matmul=not self.is_moe)  # the router reads it in fp32
        if self.is_moe:
            shared = None
            if config.n_shared_experts > 0:
                shared = FeedForward(config.n_embd, config.n_shared_experts * config.expert_hidden, config.ffn,
                                     config.bias, kernels)
            self.ffn = MoEFeedForward(config, shared_expert=shared, kernels=kernels)
        else:
            self.ffn = FeedForward(config.n_embd, config.ffn_hidden, config.ffn, config.bias, kernels)
        self.ffn_dropout = nn.Dropout(config.dropout)

    @torch.no_grad()
    def init_weights(self, std: float, resid_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.attn.init_weights(std, resid_std)
        self.ffn_norm.reset_parameters()
        self.ffn.init_weights(std, resid_std)

    def forward(self, x, rope=None, kv_cache: KVCache | None = None, slots_T=None, attn_mask=None, valid=None):
        x = x + self.attn(self.attn_norm(x), rope, kv_cache, slots_T, attn_mask)
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
        # which implementation of the ops runs, decided once (for the device it is built on)
        self.kernels = select(config.kernels, torch.get_default_device())
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i, self.kernels) for i in range(config.n_layer)])
        self.final_norm = make_norm(config, self.kernels, feeds_matmul=True)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # rope tables are derived data: not saved in checkpoints, rebuilt by init_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, materialize=None) -> None:
        """(Re)initialize every parameter and buffer; also used after building on the meta device.

        Each part initializes its own parameters (`init_weights` of blocks, attention, FFNs, MoE
        layers), in a fixed order drawing from the CPU RNG. `materialize(module)`, a context
        manager, if given, surrounds each part: FSDP passes one that gathers the part's shards into
        full tensors and scatters them back (parallelize.init_sharded_weights)."""
        materialize = materialize or _as_is
        cfg = self.config
        std = cfg.init_std
        # residual projections scaled by 1/sqrt(2 * n_layer) (GPT-2) so the residual stream's variance
        # does not grow with depth
        resid_std = std / math.sqrt(2 * cfg.n_layer)
        with materialize(self.tok_emb):
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=std)
        if self.pos_emb is not None:
            with materialize(self.pos_emb):
                nn.init.normal_(self.pos_emb.weight, mean=0.0, std=std)
        for block in self.blocks:
            with materialize(block):
                block.init_weights(std, resid_std)
        with materialize(self.final_norm):
            self.final_norm.reset_parameters()
        if not cfg.tie_embeddings:
            with materialize(self.lm_head):
                nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
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
        start_pos: int | torch.Tensor = 0,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> ModelOutput:
        """idx (B, T) token ids at positions [start_pos, start_pos+T); targets (B, T) or None.

        One forward pass for training, evaluation, prefill and incremental decoding. Targets equal to
        IGNORE_INDEX (-100) never count in the loss. With `kv_cache` (a static `KVCache`) the new
        keys and values are written at cache slots [start_pos, start_pos+T) and the queries attend
        over the cache, each to the slots up to its own (`start_pos` may be a (1,) tensor, so a
        compiled step does not recompile per position). last_only: logits (B, 1, V) of the last
        position only (what sampling reads).

        Batches of prompts of different lengths (left-padded, see nanomoe/generation.py) pass
        `positions` (B, T), each row's own positions, and `attn_mask` (B, 1, T, S) bool, True where a
        query may attend to a key (S: the cache's read_len, or T without a cache).
        """
        B, T = idx.shape
        if isinstance(start_pos, int) and start_pos + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start_pos + T} positions exceeds block_size {self.config.block_size}; "
                "crop the input or use a model with a larger block_size"
            )
        if last_only and targets is not None:
            raise ValueError("last_only computes one position's logits; the loss needs them all")
        x = self.tok_emb(idx)  # (B, T, D)
        slots_T = start_pos + torch.arange(T, device=idx.device)  # cache slots, and positions by default
        rope = None
        if positions is None:  # every row at positions [start_pos, start_pos+T)
            if self.pos_emb is not None:
                x = x + self.pos_emb(slots_T)
            elif isinstance(start_pos, int):  # (T, 1, d): broadcast over the batch and the heads of (B, T, H, d)
                rope = (self.rope_cos[start_pos : start_pos + T, None], self.rope_sin[start_pos : start_pos + T, None])
            else:
                rope = (self.rope_cos[slots_T, None], self.rope_sin[slots_T, None])
        elif self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:  # (B, T, 1, d): one table per row, broadcast over heads
            rope = (self.rope_cos[positions].unsqueeze(2), self.rope_sin[positions].unsqueeze(2))
        x = self.emb_dropout(x)
        if kv_cache is not None and attn_mask is None:  # causal over cache slots: slot j <= the query's own
            slots_S = torch.arange(kv_cache.read_len, device=idx.device)
            attn_mask = (slots_S[None, :] <= slots_T[:, None])[None, None]  # (1, 1, T, S)

        # Trailing positions whose targets are all IGNORE_INDEX are padding (documents are padded on
        # the right) and, attention being causal, can never affect a real position: MoE layers route
        # only the other tokens. (Ignored targets before a real one, e.g. a masked prompt, stay routed.)
        valid = None
        if targets is not None and self.config.is_moe:
            has_target = (targets != IGNORE_INDEX).to(torch.int8)
            valid = has_target.flip(-1).cummax(dim=-1).values.flip(-1).bool()  # a real target at or after t
        x, moe_stats = self._run_blocks(x, rope, kv_cache, slots_T, attn_mask, valid)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.final_norm(x))  # (B, T, V)

        out = ModelOutput(logits=logits, moe=moe_stats, aux_loss=self.aux_loss(moe_stats))
        if targets is not None:
            # loss in fp32 and summed over valid targets, so padding never counts and an all-padding
            # batch gives 0 rather than NaN
            loss_sum = self.kernels.cross_entropy_sum(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                                                      IGNORE_INDEX)
            n = (targets != IGNORE_INDEX).sum()
            out.loss = loss_sum / n.clamp(min=1)
            out.n_loss_tokens = n
        return out

    def _run_blocks(self, x, rope, kv_cache, slots_T, attn_mask, valid) -> tuple[torch.Tensor, list[MoEStats]]:
        # A function of its own for torch.compile: on the native kernels the MoE dispatch (a plan whose
        # row count depends on the routing) is a graph break, and a break in a loop makes dynamo run the
        # whole frame eagerly. Here that frame is only the loop; each block, and the head and loss
        # after it, are still compiled. (The torch kernels' dispatch is sync-free: one graph.)
        moe_stats: list[MoEStats] = []
        for block in self.blocks:
            x, stats = block(x, rope, kv_cache, slots_T, attn_mask, valid)
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

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty static KV cache for `batch_size` rows of `max_len` slots (block_size by default),
        in the weights' dtype and on their device."""
        weight = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, dtype=weight.dtype, device=weight.device)

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
