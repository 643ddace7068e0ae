"""The scheduler: one thread owns the model and the engine; requests join and leave its running
batch at token boundaries (continuous batching).

Each loop: take new requests and cancellations from the inbox, start waiting sequences while rows
are free (one prefill each), then one batched decode step over every running sequence, sampling
each row with its own settings and random generator (so a seeded request draws the same tokens
alone or batched with others). Events go back to each request's handler through a callback that
is safe to call from this thread (the HTTP layer passes one that puts into an asyncio queue).

A request with `n` choices runs as n sequences; choice i samples with seed + i.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..analysis import TokenText
from ..errors import ConfigError
from ..generation import TextStream, random_seed, sample_next
from .engine import Engine

log = logging.getLogger("nanomoe.serve")


@dataclass
class Request:
    """What to generate; `emit(event)` receives the events, from the scheduler's thread.

    Events (dicts): {"choice": i, "text": piece, "experts": per MoE layer [K] or None} for new
    text; {"choice": i, "finish_reason": "stop" | "length" | "cancelled", "routing": ... or None,
    "completion_tokens": n} when a choice ends; {"error": message} if decoding failed.
    """

    prompt: list[int]
    max_tokens: int
    emit: Callable[[dict], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    experts: bool = False  # report each token's experts (one step later: the token must be fed first)
    cancelled: bool = False  # set by the HTTP side (client gone); the scheduler drops it at the next token
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Sequence:
    """One choice of a request while it runs."""

    request: Request
    choice: int
    generator: torch.Generator
    text: TextStream
    tokens: list[int] = field(default_factory=list)  # generated so far (stop token excluded)
    feed: int | None = None  # the token the next step feeds in
    started: bool = False


class Scheduler:
    """Runs requests on `model` in a background thread: `start()`, `submit(request)`, `close()`."""

    def __init__(self, model, tokenizer, max_batch: int = 32, *, native: bool = True):
        self.engine = Engine(model, max_batch, native=native)
        self.tokenizer = tokenizer
        self.token_text = TokenText(tokenizer)
        self.max_batch = max_batch
        self.block_size = model.config.block_size
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[_Sequence] = []
        self._running: dict[int, _Sequence] = {}  # engine sequence id -> sequence
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="nanomoe-scheduler", daemon=True)
        self._accepting = True
        self._stop = threading.Event()
        self._cancel_all = threading.Event()

    # -- the HTTP side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        if not self._accepting:
            raise ConfigError("the server is shutting down")
        self._inbox.put(request)

    def busy(self) -> int:
        """Sequences running or waiting."""
        return len(self._running) + len(self._waiting) + self._inbox.qsize()

    def close(self, grace_s: float = 10.0) -> None:
        """Stop accepting; let running requests finish for up to grace_s, cancel the rest; stop."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self.busy() and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        self._cancel_all.set()
        self._stop.set()
        self._inbox.put(None)  # wake the loop
        self._thread.join(timeout=30)

    # -- the scheduler thread -----------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set() or self._running or self._waiting:
                self._take_inbox(block=not (self._running or self._waiting))
                if self._cancel_all.is_set():
                    for seq in [*self._waiting, *self._running.values()]:
                        seq.request.cancelled = True
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self._running:
                        self._step()
                except Exception as e:  # a bug or a broken model: fail what runs, keep serving
                    log.exception("decoding failed")
                    for seq in [*self._waiting, *self._running.values()]:
                        seq.request.emit({"error": f"decoding failed: {type(e).__name__}: {e}"})
                    for sid in list(self._running):
                        self.engine.remove(sid)
                    self._running.clear()
                    self._waiting.clear()

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                request = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if request is None:
                continue
            seed = request.seed if request.seed is not None else random_seed()
            device = self.engine.device
            for i in range(request.n):
                generator = torch.Generator(device=device).manual_seed(seed + i)
                self._waiting.append(_Sequence(request, i, generator, TextStream(self.tokenizer, request.stop_strings)))

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.request.cancelled]:
            self._waiting.remove(seq)
            self._finish(None, seq, "cancelled")
        for sid, seq in list(self._running.items()):
            if seq.request.cancelled:
                self._finish(sid, seq, "cancelled")

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting.pop(0)
            sid = next(self._ids)
            logits_V, _ = self.engine.add(sid, seq.request.prompt)
            self._running[sid] = seq
            self._sample([(sid, seq)], logits_V[None])

    def _step(self) -> None:
        sids, logits_BV, experts = self.engine.step({sid: seq.feed for sid, seq in self._running.items()})
        rows, live = [], []
        for b, sid in enumerate(sids):
            seq = self._running[sid]
            if seq.request.experts:  # the fed token's experts are known now: hand it out with them
                if self._emit_token(sid, seq, seq.feed, [e[b].tolist() for e in experts]):
                    continue
            rows.append(b)
            live.append((sid, seq))
        if live:
            self._sample(live, logits_BV[rows])

    def _sample(self, live: list[tuple[int, _Sequence]], logits_BV: torch.Tensor) -> None:
        """Sample the next token of every sequence in `live` (row b of logits_BV is live[b]'s).

        Rows whose requests sample alike run as one batch, each drawing from its own generator,
        so a row's token is the one it would get alone; top_p rows run one by one (the nucleus
        shortlist is decided for a whole batch)."""
        groups: dict[tuple, list[int]] = {}
        for b, (_, seq) in enumerate(live):
            r = seq.request
            key = (r.temperature, r.top_k, r.top_p) if r.top_p is None or r.top_p >= 1 else ("row", b)
            groups.setdefault(key, []).append(b)
        tokens: list[int] = [0] * len(live)
        for members in groups.values():
            r = live[members[0]][1].request
            logits = logits_BV[members] if len(members) < len(live) else logits_BV
            drawn = sample_next(logits, r.temperature, r.top_k, r.top_p, [live[b][1].generator for b in members])
            for b, token in zip(members, drawn.tolist()):
                tokens[b] = token
        for (sid, seq), token in zip(live, tokens):
            self._take(sid, seq, token)

    def _take(self, sid: int, seq: _Sequence, token: int) -> None:
        """The sequence's newly sampled token: hand it out now, or (experts reported) after the next step."""
        r = seq.request
        if r.experts and token not in r.stop_ids:
            seq.feed = token  # handed out after the next step, with its experts
            return
        if not self._emit_token(sid, seq, token, None):
            seq.feed = token

    def _emit_token(self, sid: int, seq: _Sequence, token: int, experts) -> bool:
        """Hand out `token`'s text; True when the sequence ended with it."""
        r = seq.request
        stopped = token in r.stop_ids
        if not stopped:
            seq.tokens.append(token)
        piece, finished = seq.text.add(token, stopped)
        reason = "stop" if finished else None
        if not finished and len(seq.tokens) >= r.max_tokens:
            piece += seq.text.finish()
            reason = "length"
        if piece or experts is not None:
            r.emit({"choice": seq.choice, "text": piece, "experts": experts})
        if reason is not None:
            self._finish(sid, seq, reason)
            return True
        return False

    def _finish(self, sid: int | None, seq: _Sequence, reason: str) -> None:
        if sid is not None:
            self.engine.remove(sid)
            del self._running[sid]
        r = seq.request
        routing = None
        if r.experts and reason != "cancelled" and seq.tokens:
            experts, weights = self.engine.route(r.prompt + seq.tokens)
            P = len(r.prompt)
            routing = {"layers": self.engine.moe_layers, "ids": seq.tokens,
                       "tokens": self.token_text.pieces(seq.tokens),
                       "experts": experts[P:], "weights": [[[round(w, 4) for w in k] for k in t] for t in weights[P:]]}
        r.emit({"choice": seq.choice, "finish_reason": reason, "routing": routing,
                "completion_tokens": len(seq.tokens)})
