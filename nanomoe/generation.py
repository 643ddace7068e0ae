"""Sampling from a GPT with a KV cache.

`generate` is what `GPT.generate` calls: prefill the prompt once, then decode one token at a time
reading earlier keys and values from the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import GPT, KVCache


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = (cumulative - F.softmax(sorted_logits, dim=-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, stop_id: int | None = None,
             seed: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Continue the prompts idx (B, T) by up to max_new_tokens; returns (B, T + new).

    Rows that produce `stop_id` keep emitting it (so the batch stays rectangular); generation
    ends early when every row has stopped. Prompts plus new tokens must fit in block_size.
    """
    B, T = idx.shape
    block_size = model.config.block_size
    max_new_tokens = min(max_new_tokens, block_size - T)
    if max_new_tokens <= 0:
        return idx
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    cache = KVCache(model.config, B, T + max_new_tokens, dtype=model.tok_emb.weight.dtype, device=idx.device) \
        if use_cache else None
    out = idx
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    try:
        logits = model(idx, kv_cache=cache, start_pos=0).logits[:, -1] if use_cache else model(idx).logits[:, -1]
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if stop_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, stop_id), nxt)
                finished |= nxt == stop_id
            out = torch.cat([out, nxt.unsqueeze(1)], dim=1)
            if (stop_id is not None and finished.all()) or i == max_new_tokens - 1:
                break
            if use_cache:
                logits = model(nxt.unsqueeze(1), kv_cache=cache, start_pos=out.shape[1] - 1).logits[:, -1]
            else:
                logits = model(out).logits[:, -1]
    finally:
        model.train(was_training)
    return out
