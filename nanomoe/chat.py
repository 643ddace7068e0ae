"""The interactive story REPL behind `nanomoe chat`, testable without a terminal.

Type a prompt and the story streams back; an empty line starts a story from scratch. Lines that
start with "/" change settings (see HELP). `ChatSession.handle(line)` does one line and returns
False when the session should end; `run(session, lines)` drives it from any iterable of lines
(a pipe, a test's list) or from the terminal with line editing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TextIO

from .checked import number
from .errors import ConfigError

HELP = """\
Type a prompt and press Enter: the model continues it. An empty line starts a story from scratch.
Commands:
  /temp X        temperature (0 = greedy, always the most likely token)
  /topk N        keep the N most likely tokens (0 or off = all)
  /topp P        nucleus sampling: keep the most likely tokens up to probability P (1 or off = all)
  /rep X         repetition penalty (1 = off; 1.1-1.3 discourages repeating tokens)
  /max N         at most N new tokens per answer
  /seed N        sample with seed N every time (same prompt, same story); /seed off = random
  /stop TEXT     also stop when TEXT appears (repeatable); /stop off clears them
  /experts on    show which experts each token went to (MoE models); /experts off
  /experts layer N | all   show layer N only, or every MoE layer
  /settings      show the current settings
  /help          this help
  /quit          leave (or Ctrl-D). Ctrl-C stops a story being written.\
"""

# 16 distinguishable background-free ANSI foreground colors for expert ids
_COLORS = [31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96, 37, 90, 97, 39]


@dataclass
class ChatSettings:
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    repetition_penalty: float = 1.0
    max_new_tokens: int = 200
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    show_experts: bool = False
    experts_layer: int | None = None  # a model layer index; None = every MoE layer

    def describe(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            parts.append(f"{f.name}={'off' if value is None else value}")
        return ", ".join(parts)


class ChatSession:
    """One chat: a model, its tokenizer, settings, and where the story goes (`out`)."""

    def __init__(self, model, tokenizer, settings: ChatSettings | None = None, *, out: TextIO | None = None,
                 color: bool | None = None, compile: bool = False, echo: bool = False):
        from .generation import check_sampling

        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or ChatSettings()
        s = self.settings
        check_sampling(s.temperature, s.top_k, s.top_p, s.repetition_penalty)
        self.out = out or sys.stdout
        if color is None:
            color = hasattr(self.out, "isatty") and self.out.isatty() and "NO_COLOR" not in os.environ
        self.color = color
        self.compile = compile
        self.decoder = None  # with compile: one decoder for the whole session, so the step compiles once
        self.echo = echo  # print each prompt line back (when stdin is not a terminal, so transcripts read well)
        self.moe_layers = [i for i, block in enumerate(model.blocks) if block.is_moe]

    # -- output helpers ----------------------------------------------------------------------

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def info(self, text: str) -> None:
        """A status line (dim on a terminal)."""
        self.write(f"\033[2m{text}\033[0m\n" if self.color else f"{text}\n")

    # -- one line of input -------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Do what one input line asks; False means quit."""
        line = line.rstrip("\r\n")
        if self.echo:
            self.write(f"> {line}\n")
        if line.strip().startswith("/"):
            return self.command(line.strip())
        self.tell_story(line)
        return True

    def command(self, line: str) -> bool:
        name, _, arg = line[1:].partition(" ")
        name, arg = name.lower(), arg.strip()
        s = self.settings
        try:
            if name in ("quit", "exit", "q"):
                return False
            if name in ("help", "h", "?"):
                self.write(HELP + "\n")
            elif name in ("settings", "show"):
                self.info(s.describe())
            elif name in ("temp", "temperature"):
                s.temperature = _parse(arg, float, "a temperature such as 0.8 (0 = greedy)", low=0.0)
                self.info(f"temperature = {s.temperature}")
            elif name == "topk":
                value = _parse_optional(arg, int, "a number of tokens such as 40, or off", low=0)
                s.top_k = value or None
                self.info(f"top_k = {s.top_k or 'off'}")
            elif name == "topp":
                value = _parse_optional(arg, float, "a probability in (0, 1] such as 0.9, or off", low=0.0, high=1.0)
                if value == 0:
                    raise ConfigError("top_p must be > 0 (1 or off keeps every token)")
                s.top_p = None if value in (None, 1.0) else value
                self.info(f"top_p = {s.top_p or 'off'}")
            elif name in ("rep", "repetition", "penalty"):
                s.repetition_penalty = _parse(arg, float, "a repetition penalty such as 1.2 (1 = off)", low=0.0)
                if s.repetition_penalty == 0:
                    raise ConfigError("the repetition penalty must be > 0 (1 = off)")
                self.info(f"repetition_penalty = {s.repetition_penalty}")
            elif name in ("max", "max_new_tokens", "n"):
                s.max_new_tokens = _parse(arg, int, "a number of tokens such as 300", low=1)
                block = self.model.config.block_size
                note = f" (the model sees at most {block} positions, prompt included)" if s.max_new_tokens >= block else ""
                self.info(f"max_new_tokens = {s.max_new_tokens}{note}")
            elif name == "seed":
                s.seed = _parse_optional(arg, int, "an integer seed, or off")
                self.info(f"seed = {s.seed if s.seed is not None else 'off (random)'}")
            elif name == "stop":
                if not arg:
                    self.info(f"stop strings: {list(s.stop_strings) or 'none'} (and <|endoftext|>)")
                elif arg.lower() in ("off", "none", "clear"):
                    s.stop_strings = ()
                    self.info("stop strings cleared")
                else:
                    text = arg.encode().decode("unicode_escape") if "\\" in arg else arg  # allow /stop \n
                    s.stop_strings = (*s.stop_strings, text)
                    self.info(f"stop strings: {list(s.stop_strings)}")
            elif name == "experts":
                self.experts_command(arg)
            else:
                raise ConfigError(f"unknown command /{name}; /help lists the commands")
        except ConfigError as e:
            self.info(f"error: {e}")
        return True

    def experts_command(self, arg: str) -> None:
        s = self.settings
        words = arg.lower().split()
        if not self.moe_layers:
            raise ConfigError("this model is dense (no MoE layers): there are no experts to show")
        if not words or words[0] in ("on", "off"):
            s.show_experts = not words or words[0] == "on"
        elif words[0] == "all":
            s.experts_layer, s.show_experts = None, True
        elif words[0] == "layer" and len(words) == 2:
            layer = _parse(words[1], int, "a layer number")
            if layer not in self.moe_layers:
                raise ConfigError(f"layer {layer} is not an MoE layer; MoE layers are {self.moe_layers}")
            s.experts_layer, s.show_experts = layer, True
        else:
            raise ConfigError("use /experts on, /experts off, /experts all or /experts layer N")
        where = "all MoE layers" if s.experts_layer is None else f"layer {s.experts_layer}"
        self.info(f"experts: {'on, ' + where if s.show_experts else 'off'}")

    # -- a story -------------------------------------------------------------------------------

    def tell_story(self, prompt: str) -> None:
        from .generation import Decoder, random_seed, stream_text

        s = self.settings
        prompt_ids = self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eot_id]
        block = self.model.config.block_size
        if len(prompt_ids) >= block:
            self.info(f"error: the prompt is {len(prompt_ids)} tokens; this model sees at most {block} (shorten it)")
            return
        if self.compile and self.decoder is None:
            self.decoder = Decoder(self.model, 1, block, compile=True)
        self.write(prompt)
        n_tokens, pending = 0, None  # pending: (text piece, token) waiting for its experts (next step)
        usage: dict[int, dict[int, int]] = {layer: {} for layer in self.moe_layers}
        stopped_by_user = False
        t0 = time.perf_counter()
        gen = stream_text(
            self.model, self.tokenizer, [prompt_ids], s.max_new_tokens, stop_strings=s.stop_strings,
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
            seed=s.seed if s.seed is not None else random_seed(), compile=self.compile, decoder=self.decoder,
        )
        try:
            for step in gen:
                if step.tokens[0] is not None and not step.stopped[0]:
                    n_tokens += 1
                piece = step.pieces[0]
                if not s.show_experts:
                    self.write(piece)
                    continue
                # the experts of a step belong to the token fed in: the previous step's token
                if pending is not None:
                    self.write(self.annotate(pending, step.experts, usage))
                    pending = None
                if step.tokens[0] is not None and not step.finished[0]:
                    pending = piece
                else:
                    self.write(piece)
        except KeyboardInterrupt:
            stopped_by_user = True
        if pending is not None:
            self.write(pending)
        seconds = time.perf_counter() - t0
        self.write("\n")
        rate = n_tokens / seconds if seconds > 0 else 0.0
        note = " (stopped)" if stopped_by_user else ""
        self.info(f"[{n_tokens} tokens in {seconds:.2f} s, {rate:.1f} tokens/s{note}]")
        if s.show_experts and any(usage.values()):
            for layer, counts in usage.items():
                if counts and (s.experts_layer is None or layer == s.experts_layer):
                    total = sum(counts.values())
                    shares = " ".join(f"e{e}:{100 * c / total:.0f}%" for e, c in sorted(counts.items()))
                    self.info(f"  layer {layer} experts: {shares}")

    def annotate(self, piece: str, experts, usage: dict[int, dict[int, int]]) -> str:
        """`piece` followed by its experts, e.g. ` cat[3,1]` (one layer) or ` cat[3,1|0,2]` (all)."""
        s = self.settings
        chosen: list[list[int]] = []
        for layer, indices in zip(self.moe_layers, experts):
            ids = indices[0].tolist()  # row 0: (K,)
            for e in ids:
                usage[layer][e] = usage[layer].get(e, 0) + 1
            if s.experts_layer is None or layer == s.experts_layer:
                chosen.append(ids)
        if not chosen:
            return piece
        label = "[" + "|".join(",".join(map(str, ids)) for ids in chosen) + "]"
        if not self.color:
            return piece + label
        color = _COLORS[chosen[0][0] % len(_COLORS)]  # the token's first choice in the first shown layer
        return f"\033[{color}m{piece}\033[0m\033[2m{label}\033[0m"


def _parse(text: str, kind, what: str, low=None, high=None):
    try:
        return number(text, what, kind, minimum=low, maximum=high)
    except ConfigError:
        raise ConfigError(f"expected {what}, got {text!r}") from None


def _parse_optional(text: str, kind, what: str, low=None, high=None):
    if text.lower() in ("off", "none"):
        return None
    return _parse(text, kind, what, low, high)


def run(session: ChatSession, lines: Iterable[str] | None = None, *, interactive: bool | None = None) -> int:
    """Read lines (default: stdin) until /quit or end of input (Ctrl-D). On a terminal, show a
    prompt with line editing; Ctrl-C there clears the line (it stops a story while one is written)."""
    if lines is not None:
        for line in lines:
            if not session.handle(line):
                break
        return 0
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD, not a dead session
        sys.stdin.reconfigure(errors="replace")
    if interactive is None:
        interactive = sys.stdin.isatty()
    if not interactive:  # a pipe or a file: no prompt, every line echoed so the transcript reads well
        session.echo = True
        for line in sys.stdin:
            if not session.handle(line):
                break
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session.info("Type a prompt (empty = a story from scratch), /help for commands, Ctrl-D to quit.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            session.write("\n")
            return 0
        except KeyboardInterrupt:
            session.write("\n")
            continue
        if not session.handle(line):
            return 0
