"""The decoding engine under the server: one model, one static KV cache of `max_batch` rows, and
sequences that join and leave it at token boundaries (continuous batching).

This is the only file of nanomoe/serve that knows how decoding is done (generation.Decoder,
the model's KVCache and its forward with a cache); the scheduler sees `add`, `step`, `remove`.

How the cache is laid out. Each sequence owns one row. Every row writes its next token at the same
cache slot, `slot` (what the batched decode step, native C++ or PyTorch, takes), and row r holds
its tokens in slots [pad[r], slot): its positions are slot - pad[r], as for a left-padded prompt,
so rows of different lengths share one step. A joining prompt is written into its row so that it
ends at `slot`. When `slot` reaches the end of the cache, the rows move left by the smallest pad
(the oldest sequence's first slot); a sequence never needs more slots than the model's block_size,
so there is always room. Rows in use are kept at the front, [0, n), and a step runs over the
smallest bucket of rows (1, 2, 4, ... max_batch) that holds them: one Decoder per bucket over a
view of the cache's first rows.

Shape legend: B rows of a step, V vocabulary, K experts per token, T prompt tokens.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..generation import Decoder, decode_backend, padded_positions_and_mask


class Engine:
    """Sequences, by id, decoded together. Use from one thread, under torch.inference_mode()."""

    def __init__(self, model, max_batch: int, *, native: bool = True):
        if max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
        model.eval()
        self.model = model
        self.max_batch = max_batch
        self.max_len = model.config.block_size  # slots per row: a sequence never needs more
        weight = model.tok_emb.weight
        self.device = weight.device
        self.cache = model.new_kv_cache(max_batch, self.max_len)
        self.pad = torch.zeros(max_batch, dtype=torch.long, device=weight.device)
        self.slot = 0
        self.rows: list[int] = []  # the sequence in each row in use, in row order
        self.moe_layers = [i for i, block in enumerate(model.blocks) if block.is_moe]
        # the native step where it applies; never torch.compile (a compilation per bucket and span)
        self.compile = native and decode_backend(model, compile=True) == "native"
        self._decoders: dict[int, Decoder] = {}
        self.backend = self._decoder(1).backend

    def __len__(self) -> int:
        return len(self.rows)

    def _decoder(self, n: int) -> Decoder:
        """The decoder over the first rows of the cache for a step of n sequences."""
        rows = min(self.max_batch, 1 << max(0, n - 1).bit_length())
        if rows not in self._decoders:
            self._decoders[rows] = Decoder(self.model, rows, self.max_len, compile=self.compile,
                                           cache=self.cache.rows(0, rows))
        return self._decoders[rows]

    def add(self, seq: int, prompt: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Start sequence `seq` with its prompt; return the logits for its first new token (V,) and
        the experts of the prompt's last token, per MoE layer (K,)."""
        T = len(prompt)
        if len(self.rows) == self.max_batch:
            raise ConfigError(f"all {self.max_batch} rows are in use")
        if not 0 < T < self.max_len:
            raise ConfigError(f"a prompt of {T} tokens does not fit a cache of {self.max_len} positions")
        if not self.rows:
            self.slot = T
        elif self.slot < T:  # room on the left for the prompt: move the others right
            self._move(self.slot - T)
        row = len(self.rows)
        self.pad[row] = self.slot - T
        positions_1S, mask_11SS = padded_positions_and_mask(self.pad[row:row + 1], self.slot, self.max_len)
        idx_1T = torch.tensor([prompt], dtype=torch.long, device=self.device)
        out = self.model(idx_1T, kv_cache=self.cache.rows(row, row + 1), start_pos=self.slot - T,
                         positions=positions_1S[:, -T:], attn_mask=mask_11SS[:, :, -T:])
        self.rows.append(seq)
        return out.logits[0, -1], [s.expert_indices.view(T, -1)[-1] for s in out.moe]

    def step(self, tokens: dict[int, int]) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
        """Feed one token to every sequence ({seq: token}); return the sequences in row order, the
        logits for their next tokens (B, V) and the experts each fed token went to, per MoE layer (B, K)."""
        n = len(self.rows)
        if n == 0:
            raise ConfigError("no sequences to decode")
        if self.slot >= self.max_len:
            self._move(int(self.pad[:n].min()))
        decoder = self._decoder(n)
        B = decoder.batch_size
        tokens_B = torch.zeros(B, dtype=torch.long, device=self.device)
        tokens_B[:n] = torch.tensor([tokens[seq] for seq in self.rows], dtype=torch.long)
        self.pad[n:B] = self.slot  # rows not in use: position 0, seeing only their own new slot
        decoder.next_slot, decoder.pad_B = self.slot, self.pad[:B]
        logits_BV, experts = decoder.step(tokens_B)
        self.slot += 1
        return list(self.rows), logits_BV[:n], [e[:n] for e in experts]

    def remove(self, seq: int) -> None:
        """End sequence `seq`: the last row in use moves into its row (rows in use stay at the front)."""
        row, last = self.rows.index(seq), len(self.rows) - 1
        if row != last:
            for buffer in self.cache.k + self.cache.v:
                buffer[row].copy_(buffer[last])
            self.pad[row] = self.pad[last]
            self.rows[row] = self.rows[last]
        self.rows.pop()

    def _move(self, shift: int) -> None:
        """Move every row in use `shift` slots left (right when negative), `slot` with them."""
        n, used = len(self.rows), self.slot
        if shift == 0 or shift > int(self.pad[:n].min()) or used - shift > self.max_len:
            raise ConfigError("a sequence outgrew the cache (longer than the model's block_size)")
        for buffer in self.cache.k + self.cache.v:
            if shift > 0:
                buffer[:n, :, :used - shift] = buffer[:n, :, shift:used].clone()
            else:
                buffer[:n, :, -shift:used - shift] = buffer[:n, :, :used].clone()
        self.pad[:n] -= shift
        self.slot -= shift

    def route(self, ids: list[int]) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """Experts and their router probabilities for every token of `ids`, from one forward pass
        (T, MoE layers, K): what the playground shows on hover."""
        out = self.model(torch.tensor([ids], dtype=torch.long, device=self.device))
        experts = [s.expert_indices for s in out.moe]  # per layer (T, K)
        probs = [s.router_probs.float().gather(-1, e) for s, e in zip(out.moe, experts)]
        return (torch.stack(experts, 1).tolist() if experts else [[] for _ in ids],
                torch.stack(probs, 1).tolist() if probs else [[] for _ in ids])
