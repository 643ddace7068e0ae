"""Sampling from a GPT: a static KV cache, batches of prompts of different lengths, streaming.

Layers, from the bottom up:

- `sample_next`: one next token per row from logits (temperature, top-k, top-p, repetition penalty).
- `Decoder`: incremental decoding with a static KV cache. Prompts are left-padded into one batch;
  every row has its own positions and an attention mask that hides its padding, so a short prompt
  gives the same tokens whether it is alone or batched with longer ones. The one-token decode step
  has fixed shapes at every position (the cache is written at a tensor slot), so `torch.compile`
  builds it once and reuses it for every token; with the native kernels, models on the CPU run it as
  one C++ call instead (the decode step of nanomoe/kernels).
- `stream`: the token loop, one `Step` per new token position, with early stop per row.
- `generate` returns a (B, T + new) tensor (also `model.generate(...)`, through `GenerationMixin`,
  which `GPT` inherits; this module needs the model class only for type hints, so the model file
  can import it); `generate_batch` takes
  prompts of different lengths and returns each row's new tokens; `stream_text` adds incremental
  detokenization and stop strings for the CLI and the chat.

Shape legend: B batch (rows), T prompt positions (after left padding), S cache slots, V vocabulary,
K experts per token.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .checked import number
from .errors import ConfigError

if TYPE_CHECKING:
    from .model import GPT, KVCache

# ---------------------------------------------------------------------------------------------
# Sampling


def random_seed() -> int:
    """A fresh seed from the OS: what "no seed" means on the command line (torch's global generator
    starts from the same state in every new process, so every run would tell the same story)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   repetition_penalty: float = 1.0) -> None:
    """Raise ConfigError for sampling settings that make no sense (nan and inf included)."""
    number(temperature, "temperature")
    number(repetition_penalty, "repetition_penalty")
    if top_p is not None:
        number(top_p, "top_p")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"top_k must be >= 1, or 0/None to keep every token; got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (1 = keep every token), got {top_p}")
    if repetition_penalty <= 0:
        raise ConfigError(f"repetition_penalty must be > 0 (1 = none, 1.1-1.3 typical), got {repetition_penalty}")


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, sec. 4.1) on tokens already in the row: positive logits are
    divided by `penalty`, negative ones multiplied, so a seen token always becomes less likely."""
    penalized = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalized, logits_BV)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                *, repetition_penalty: float = 1.0, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 = greedy.

    top_k keeps the k most likely tokens, top_p the smallest set whose probability reaches p
    (nucleus sampling, Holtzman et al. 2019); both apply after the temperature. `seen` (B, V) bool
    marks tokens the repetition penalty applies to. `generator`: one for the batch, or one per row
    (row b then draws exactly what it would draw alone from generator[b]; without top_p, whose
    shortlist depends on the batch, its token is the one it would get alone).
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    vocab_ids = None  # when the candidates were narrowed: their token ids (B, k)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        logits, vocab_ids = torch.topk(logits, top_k, dim=-1)  # sorted, best first
    if top_p is not None and 0 < top_p < 1:
        probs = F.softmax(logits, dim=-1)  # over all candidates, sorted when top-k chose them
        if vocab_ids is None:
            probs, vocab_ids = _nucleus_shortlist(probs, top_p)
            logits = logits.gather(-1, vocab_ids)
        # drop a token when the more likely tokens before it already reach top_p (the best one stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop, float("-inf"))
    choice = _draw(F.softmax(logits, dim=-1), generator)  # (B, 1)
    if vocab_ids is not None:
        choice = vocab_ids.gather(-1, choice)
    return choice.squeeze(-1)


# Top-p first looks for the nucleus among this many most likely tokens: a full sort of the vocabulary
# is a sizable share of a small model's decode step (docs/generation.md)
NUCLEUS_SHORTLIST = 64


def _nucleus_shortlist(probs_BV: torch.Tensor, top_p: float):
    """The probabilities of the most likely tokens of every row, sorted, and their ids: the top
    NUCLEUS_SHORTLIST when they hold >= top_p in every row (every token after them would be
    dropped anyway), else the whole vocabulary."""
    if NUCLEUS_SHORTLIST < probs_BV.shape[-1]:
        values, ids = torch.topk(probs_BV, NUCLEUS_SHORTLIST, dim=-1)
        if bool((values.sum(dim=-1) >= top_p).all()):
            return values, ids
    return torch.sort(probs_BV, descending=True, dim=-1)


def _draw(probs_BV: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """One index per row with the given probabilities (B, 1), by inverting the cumulative sum at a
    uniform draw: the same distribution as torch.multinomial at a fraction of its cost for one draw.
    A token of probability 0 is never chosen (its cumulative sum equals its predecessor's).
    `generator` may be one per row: each row's uniform then comes from its own."""
    cdf = probs_BV.cumsum(dim=-1)
    if isinstance(generator, Sequence):
        if len(generator) != probs_BV.shape[0]:
            raise ConfigError(f"{len(generator)} generators for {probs_BV.shape[0]} rows")
        u = torch.cat([torch.rand(1, 1, generator=g, device=probs_BV.device, dtype=cdf.dtype) for g in generator])
    else:
        u = torch.rand(probs_BV.shape[0], 1, generator=generator, device=probs_BV.device, dtype=cdf.dtype)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return choice.clamp_(max=probs_BV.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------
# Static KV cache and the decoder


def _decode_step(model: GPT, tokens_B: torch.Tensor, cache: KVCache, slot: torch.Tensor, pad_B: torch.Tensor):
    """Logits (B, V) and per-MoE-layer expert choices [(B, K)] for one new token per row, written at
    cache slot `slot` ((1,) tensor). Row b's prompt started at slot pad_B[b] (left padding).

    `GPT.forward` itself, for one position per row over the cache (logits for that position only):
    under torch.compile a batch-1 step becomes one fused C++ loop nest.
    """
    slots_S = torch.arange(cache.read_len, device=tokens_B.device)
    visible_BS = (slots_S >= pad_B[:, None]) & (slots_S <= slot)  # this row's tokens, up to the new one
    out = model(tokens_B[:, None], kv_cache=cache, start_pos=slot, positions=(slot - pad_B)[:, None],
                attn_mask=visible_BS[:, None, None, :], last_only=True)
    return out.logits[:, 0], [s.expert_indices for s in out.moe]


_compiled_decode_step = None


def compiled_decode_step():
    """`_decode_step` under torch.compile, built once and shared by every Decoder (compiled code is
    reused whenever the model, batch size and cache length match; other shapes compile anew).

    Inductor options (their measurements: docs/generation.md):
    - decompose_mm_pass: a one-row matrix product becomes a vectorized loop that inductor fuses
      with the norms, rope and attention around it, instead of a BLAS call per weight matrix;
    - freezing: weights become constants of the compiled code, prepacked for oneDNN (AMX for
      bf16), for batched steps. The compiled step therefore keeps the weights it
      was compiled with: do not train a model further and then decode it with compile=True.
    """
    global _compiled_decode_step
    if _compiled_decode_step is None:
        # one compiled step per (model, batch, cache length, attention span): leave room for them
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        options = {"post_grad_fusion_options": {"decompose_mm_pass": {}}, "freezing": True}
        _compiled_decode_step = torch.compile(_decode_step, dynamic=False, options=options)
    return _compiled_decode_step


def decode_backend(model: GPT, compile: bool, native: bool = True) -> str:
    """Which one-token step a Decoder runs: "native" (the model's kernels have their own step for
    it: the native C++ step on the CPU), "compiled" (torch.compile, dense models) or "eager"."""
    if compile and native and model.kernels.decode_unsupported(model) is None:
        return "native"
    return "compiled" if compile and not model.config.is_moe else "eager"


def cache_length(n_positions: int, block_size: int, multiple: int = 64) -> int:
    """Cache slots for `n_positions`: rounded up to a multiple of 64 (so a compiled step is reused
    across nearby lengths), at most block_size."""
    return min(block_size, -(-n_positions // multiple) * multiple)


class Decoder:
    """Incremental decoding of a batch of prompts with a static KV cache.

        dec = Decoder(model, batch_size=2, max_len=128)
        logits_BV, experts = dec.prefill([[0, 17, 4], [0, 9]])   # prompts of different lengths
        logits_BV, experts = dec.step(logits_BV.argmax(-1))      # one new token per row

    `experts` holds, per MoE layer, the experts each row's token went to: (B, K) after a step,
    (B, T, K) after prefill (padding included). The prompt always runs through the model itself;
    with compile=True the one-token steps run compiled, `self.backend` says how:

    - "native": one C++ call per token, dense or MoE: the decode step of the model's native kernels
      (nanomoe/kernels/decode.py: CPU, fp32 or bf16 weights, eval mode). It reads the model's weights as they are when the decoder
      is built: build a new decoder after changing them.
    - "compiled": `torch.compile` of `_decode_step` for dense models (native=False, or where the
      native step does not apply or cannot be built); the first step pays the compile time.
    - "eager": compile=False, and MoE models without the native step: their dispatch sizes its
      buffers by how many tokens each expert got, which breaks a compiled graph at every layer
      (compiled decoding was slower than eager: docs/generation.md).

    Run it under torch.inference_mode().
    """

    def __init__(self, model: GPT, batch_size: int, max_len: int, *, compile: bool = False, native: bool = True,
                 cache: KVCache | None = None):
        """`cache`: decode into this one (batch_size rows, max_len slots) instead of a new one."""
        cfg = model.config
        if max_len > cfg.block_size:
            raise ConfigError(
                f"{max_len} positions do not fit the model's block_size ({cfg.block_size}); "
                "use a shorter prompt or fewer new tokens"
            )
        weight = model.tok_emb.weight
        self.model = model
        self.batch_size = batch_size
        if cache is None:
            cache = model.new_kv_cache(batch_size, max_len)
        elif cache.k[0].shape[0] != batch_size or cache.max_len != max_len:
            raise ConfigError(f"a cache of {cache.k[0].shape[0]} rows x {cache.max_len} slots given to a decoder "
                              f"of {batch_size} x {max_len}")
        self.cache = cache
        self.pad_B = torch.zeros(batch_size, dtype=torch.long, device=weight.device)
        self.next_slot = 0
        self._slot = torch.zeros(1, dtype=torch.long, device=weight.device)  # reused: no tensor built per token
        self.backend = decode_backend(model, compile, native)
        self._native = model.kernels.decode_step(model, self.cache) if self.backend == "native" else None
        if self.backend == "native" and self._native is None:  # the extension refused the model (it warned)
            self.backend = decode_backend(model, compile, native=False)
        self.compiled = self.backend == "compiled"
        self._step = compiled_decode_step() if self.compiled else _decode_step

    @property
    def device(self) -> torch.device:
        return self.pad_B.device

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def prefill(self, prompts: Sequence[Sequence[int]]):
        """Run the prompts (left-padded into one batch); return last-position logits (B, V) and experts."""
        if len(prompts) != self.batch_size:
            raise ConfigError(f"this decoder was built for {self.batch_size} prompts, got {len(prompts)}")
        idx_BT, pad_B = left_pad(prompts, device=self.device)
        B, T = idx_BT.shape
        if T >= self.max_len:
            raise ConfigError(f"a prompt of {T} tokens leaves no room in a cache of {self.max_len} positions")
        self.pad_B = pad_B
        positions_BT, mask_B1TS = padded_positions_and_mask(pad_B, T, self.max_len)
        self.cache.read_len = self.max_len
        out = self.model(idx_BT, kv_cache=self.cache, positions=positions_BT, attn_mask=mask_B1TS, last_only=True)
        self.next_slot = T
        return out.logits[:, -1], [s.expert_indices.view(B, T, -1) for s in out.moe]

    def _span(self) -> int:
        """Cache slots the next step attends over: the written ones rounded up to a multiple of 64,
        so a batched step reads a growing cache rather than the whole one (each span is compiled
        once). A compiled batch-1 step reads them all: its keys are a small share of the bytes a
        token reads, and one span means one compilation."""
        if self.compiled and self.batch_size == 1:
            return self.max_len
        return cache_length(self.next_slot + 1, self.max_len)

    def step(self, tokens_B: torch.Tensor):
        """Feed one token per row (B,); return the logits (B, V) for the next one and the experts."""
        if self.next_slot >= self.max_len:
            raise ConfigError(f"the cache holds {self.max_len} positions and is full")
        if self._native is not None:
            logits, experts = self._native(tokens_B, self.next_slot, self.pad_B)
        else:
            self.cache.read_len = self._span()
            logits, experts = self._step(self.model, tokens_B, self.cache, self._slot.fill_(self.next_slot), self.pad_B)
        self.next_slot += 1
        return logits, experts


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one (B, T) batch, padded on the left; and each row's padding (B,)."""
    if not prompts:
        raise ConfigError("no prompts to generate from")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ConfigError("every prompt needs at least one token (start with <|endoftext|> for a story from scratch)")
    T = max(lengths)
    rows = [[pad_id] * (T - len(p)) + [int(t) for t in p] for p in prompts]
    pad = [T - n for n in lengths]
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(pad, dtype=torch.long, device=device)


def padded_positions_and_mask(pad_B: torch.Tensor, T: int, S: int | None = None):
    """Positions (B, T) and attention mask (B, 1, T, S) for T left-padded queries at slots [0, T).

    Query i of row b sees keys j <= i that are not padding (j >= pad_B[b]). A padding query sees
    itself only (its output is never used, but a query that sees nothing would give NaN).
    """
    S = T if S is None else S
    slots_T = torch.arange(T, device=pad_B.device)
    slots_S = torch.arange(S, device=pad_B.device)
    positions_BT = (slots_T[None, :] - pad_B[:, None]).clamp(min=0)
    causal_TS = slots_S[None, :] <= slots_T[:, None]
    not_pad_BS = slots_S[None, :] >= pad_B[:, None]
    self_TS = slots_S[None, :] == slots_T[:, None]
    mask_BTS = causal_TS[None] & (not_pad_BS[:, None, :] | self_TS[None])
    return positions_BT, mask_BTS[:, None]


# ---------------------------------------------------------------------------------------------
# The token loop


@dataclass
class Step:
    """One new position of every row."""

    tokens: list[int | None]  # the new token of each row; None for rows that had already stopped
    stopped: list[bool]  # True for rows whose token is a stop token (the row ends with it)
    # per MoE layer (B, K): the experts that the token fed in to produce this step (the previous new
    # token, or the prompt's last token at the first step) was routed to
    experts: list[torch.Tensor] = field(default_factory=list)


class Generation:
    """Iterator of `Step`s for a batch of prompts (see `stream`); `stop(row)` ends a row early
    (used for stop strings), and generation ends when every row has stopped."""

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, stop_ids: Sequence[int] = (), seed: int | None = None,
                 use_cache: bool = True, compile: bool = False, decoder: Decoder | None = None):
        check_sampling(temperature, top_k, top_p, repetition_penalty)
        self.model = model
        self.prompts = [list(map(int, p)) for p in prompts]
        left_pad(self.prompts)  # validates
        longest = max(len(p) for p in self.prompts)
        block_size = model.config.block_size
        if longest > block_size:
            raise ConfigError(f"a prompt of {longest} tokens exceeds the model's block_size ({block_size}); shorten it")
        self.max_new_tokens = max(0, min(max_new_tokens, block_size - longest))
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.seed = seed
        self.use_cache = use_cache
        self.compile = compile
        self.decoder = decoder
        self.done = [False] * len(self.prompts)
        self.prefill_seconds = 0.0  # time to the first token's logits (prompt processing)

    def stop(self, row: int) -> None:
        self.done[row] = True

    def __iter__(self) -> Iterator[Step]:
        model = self.model
        B = len(self.prompts)
        device = model.tok_emb.weight.device
        generator = torch.Generator(device=device).manual_seed(self.seed) if self.seed is not None else None
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                if self.max_new_tokens == 0:
                    return
                seen_BV = None
                if self.sampling["repetition_penalty"] != 1.0:
                    seen_BV = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
                    for b, p in enumerate(self.prompts):
                        seen_BV[b, p] = True
                if self.use_cache:
                    decoder = self.decoder
                    needed = max(len(p) for p in self.prompts) + self.max_new_tokens
                    if decoder is None or decoder.batch_size != B or decoder.max_len < needed:
                        decoder = Decoder(model, B, cache_length(needed, model.config.block_size), compile=self.compile)
                    logits, experts = decoder.prefill(self.prompts)
                    experts = [e[:, -1] for e in experts]
                else:
                    sequences = [list(p) for p in self.prompts]
                    logits, experts = _full_forward(model, sequences)
                self.prefill_seconds = time.perf_counter() - t0
                for i in range(self.max_new_tokens):
                    nxt_B = sample_next(logits, generator=generator, seen=seen_BV, **self.sampling)
                    tokens = nxt_B.tolist()
                    # (a Python set: torch.isin is a sizable share of a small model's step)
                    stopped = [t in self.stop_ids for t in tokens]
                    step_tokens = [None if d else t for d, t in zip(self.done, tokens)]
                    step_stopped = [s and not d for d, s in zip(self.done, stopped)]
                    yield Step(step_tokens, step_stopped, experts)
                    self.done = [d or s for d, s in zip(self.done, stopped)]
                    if all(self.done) or i == self.max_new_tokens - 1:
                        break
                    if seen_BV is not None:
                        seen_BV[torch.arange(B, device=device), nxt_B] = True
                    if self.use_cache:
                        logits, experts = decoder.step(nxt_B)
                    else:
                        for seq, t in zip(sequences, tokens):
                            seq.append(t)
                        logits, experts = _full_forward(model, sequences)
        finally:
            model.train(was_training)


def _full_forward(model: GPT, sequences: list[list[int]]):
    """Without a cache: run whole sequences (left-padded), return last logits (B, V) and experts."""
    idx_BT, pad_B = left_pad(sequences, device=model.tok_emb.weight.device)
    B, T = idx_BT.shape
    positions_BT, mask_B1TS = padded_positions_and_mask(pad_B, T)
    out = model(idx_BT, positions=positions_BT, attn_mask=mask_B1TS)
    return out.logits[:, -1], [s.expert_indices.view(B, T, -1)[:, -1] for s in out.moe]


def stream(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options) -> Generation:
    """Generate from prompts of any lengths, one `Step` at a time:

        for step in stream(model, [[0, 5, 9], [0, 7]], 50, temperature=0.8, stop_ids=[eot]):
            print(step.tokens)   # e.g. [412, 3] then [17, None] once row 1 has stopped

    Options: temperature, top_k, top_p, repetition_penalty, stop_ids, seed, use_cache, compile,
    decoder (a `Decoder` to reuse, e.g. a compiled one).
    """
    return Generation(model, prompts, max_new_tokens, **options)


def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options) -> list[list[int]]:
    """The new tokens of each prompt (prompts may differ in length), up to and without a stop token."""
    new: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, max_new_tokens, **options):
        for row, (token, stopped) in enumerate(zip(step.tokens, step.stopped)):
            if token is not None and not stopped:
                new[row].append(token)
    return new


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             stop_id: int | None = None, stop_ids: Sequence[int] = (), seed: int | None = None,
             use_cache: bool = True, compile: bool = False) -> torch.Tensor:
    """Continue the prompts idx (B, T) by up to max_new_tokens; returns (B, T + new).

    Rows that produce a stop token (`stop_id` or any of `stop_ids`) keep emitting it, so the batch
    stays rectangular; generation ends early when every row has stopped. Prompts plus new tokens
    are cut to fit in block_size.
    """
    stops = list(stop_ids) + ([stop_id] if stop_id is not None else [])
    columns = []
    gen = stream(model, idx.tolist(), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, stop_ids=stops, seed=seed, use_cache=use_cache,
                 compile=compile)
    fill = stops[0] if stops else 0
    for step in gen:
        columns.append([fill if t is None else t for t in step.tokens])
    if not columns:
        return idx
    new = torch.tensor(columns, dtype=idx.dtype, device=idx.device).t()  # (B, new)
    return torch.cat([idx, new], dim=1)


class GenerationMixin:
    """`model.generate(idx, max_new_tokens, ...)`: the original NanoGPT-MoE TinyStories project's
    call, kept for its users (and nanoGPT's and Hugging Face's): the same as `generate(model, ...)`."""

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        return generate(self, idx, max_new_tokens, **options)


# ---------------------------------------------------------------------------------------------
# Text


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces as they become final.

    Byte-level BPE tokens can end in the middle of a UTF-8 character; such text decodes to U+FFFD
    and is held back until the next token completes it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # text emitted so far

    def add(self, token: int) -> str:
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""
        piece = full[len(self.text):]
        self.text = full
        return piece

    def flush(self) -> str:
        full = self.tokenizer.decode(self.ids)
        piece = full[len(self.text):]
        self.text = full
        return piece


@dataclass
class TextStep:
    """New text of every row after one step (empty for rows that stopped or are mid-character)."""

    pieces: list[str]
    tokens: list[int | None]  # as in Step: None for rows that had already stopped
    stopped: list[bool]  # as in Step: the row's token is a stop token (not part of the text)
    finished: list[bool]  # rows that ended at this step (stop token or stop string)
    experts: list[torch.Tensor] = field(default_factory=list)  # as in Step


def stream_text(model: GPT, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int, *,
                stop_strings: Sequence[str] = (), stop_at_eot: bool = True, **options) -> Iterator[TextStep]:
    """Stream the continuation of text prompts (or token lists) as text.

    Stops a row at <|endoftext|> (unless stop_at_eot=False), at any of `stop_strings` (the text is
    cut just before it), or after max_new_tokens. An empty prompt starts a story from scratch
    (from <|endoftext|>). Other options as for `stream`.
    """
    token_prompts = []
    for p in prompts:
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        token_prompts.append(ids or [tokenizer.eot_id])
    stop_ids = list(options.pop("stop_ids", ()))
    if stop_at_eot:
        stop_ids.append(tokenizer.eot_id)
    gen = stream(model, token_prompts, max_new_tokens, stop_ids=stop_ids, **options)
    texts = [TextStream(tokenizer, stop_strings) for _ in token_prompts]
    for step in gen:
        pieces, finished = [], []
        for row, (token, stopped) in enumerate(zip(step.tokens, step.stopped)):
            if token is None or texts[row].ended:
                pieces.append("")
                finished.append(False)
                continue
            piece, fin = texts[row].add(token, stopped)
            if fin:
                gen.stop(row)
            pieces.append(piece)
            finished.append(fin)
        yield TextStep(pieces, step.tokens, step.stopped, finished, step.experts)
    # rows cut by max_new_tokens: hand out what was held back
    ended = [t.ended for t in texts]
    tail = [t.finish() for t in texts]
    if any(tail):
        yield TextStep(tail, [None] * len(tail), [False] * len(tail), [not e for e in ended], [])


class TextStream:
    """One row's text as its tokens arrive: incremental detokenization, and stop strings (the text
    is cut just before the first one; text that could be the start of one is held back)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_strings = [s for s in stop_strings if s]
        self.longest_stop = max((len(s) for s in self.stop_strings), default=0)
        self.emitted = 0  # characters of the text already handed out
        self.ended = False

    def add(self, token: int, stopped: bool = False) -> tuple[str, bool]:
        """The new text after `token` (maybe "") and whether the row ends here: `stopped` says the
        token is a stop token (not part of the text), or the text reached a stop string."""
        dec = self.decoder
        if stopped:
            dec.flush()
        else:
            dec.add(token)
        fin, text = stopped, dec.text
        if self.stop_strings:
            # text already handed out never holds the start of a stop string (see below), so a new
            # occurrence starts at or after `emitted`
            hits = [i for i in (text.find(s, self.emitted) for s in self.stop_strings) if i >= 0]
            if hits:
                text, fin = text[: min(hits)], True
            elif not fin:  # hold back what could be the start of a stop string
                text = text[: max(self.emitted, len(text) - self.longest_stop + 1)]
        piece = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        self.ended = fin
        return piece, fin

    def finish(self) -> str:
        """What was held back, for a row cut by its token limit ("" for a row that ended itself)."""
        self.decoder.flush()
        piece = "" if self.ended else self.decoder.text[self.emitted:]
        self.emitted += len(piece)
        self.ended = True
        return piece
