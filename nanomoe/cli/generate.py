"""`nanomoe generate`: sample stories from a checkpoint, streamed as they are written.

Also home of the model-loading and sampling arguments `nanomoe chat` shares.
"""

from __future__ import annotations

import json
import sys
import time

from ..checked import arg
from . import add_command


def add_model_args(p, *, server: bool = False) -> None:
    """The checkpoint, device, dtype and thread options of every command that samples from a model
    (generate, chat, serve). A server picks its decode step itself (no --compile)."""
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="a run dir (its best.json, else latest.json) or a checkpoints/step-* dir")
    p.add_argument("--prefer", choices=["best", "latest"], default="best",
                   help="which checkpoint of a run dir to use (default best)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights and KV cache: fp32 (default, exact) or bf16 (half the memory traffic; pays "
                        "off with a compiled or native decode step: eager one-row bf16 products are slow on CPUs)")
    if not server:
        p.add_argument("--compile", action="store_true",
                       help="compiled decode steps: on the CPU a native C++ step, dense or MoE (~8-17x eager "
                            "at batch 1 in bf16; built once per machine, ~30 s), elsewhere torch.compile for dense "
                            "models (the first answer waits for the compilation)")
    p.add_argument("--threads", type=arg(int, "--threads", minimum=1),
                   help="CPU threads (default: torch's choice)" + (
                       "; with bf16 on a small CPU, try one core fewer than the machine has: the HTTP layer "
                       "needs one (docs/serve.md)" if server else ""))


def add_sampling_args(p, *, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=arg(int, "--max-new-tokens", minimum=1), default=max_new_tokens,
                   help=f"at most this many new tokens (default {max_new_tokens})")
    p.add_argument("--temperature", type=arg(float, "temperature", minimum=0), default=0.8, help="0 = greedy; higher = more varied (default 0.8)")
    p.add_argument("--top-k", type=arg(int, "--top-k", minimum=0), default=50, help="keep the k most likely tokens (default 50; 0 = all)")
    p.add_argument("--top-p", type=arg(float, "top_p", minimum=0, maximum=1, above=True), default=None, help="nucleus sampling: keep tokens up to probability p")
    p.add_argument("--repetition-penalty", type=arg(float, "repetition_penalty", minimum=0, above=True), default=1.0, help="> 1 discourages repeats (default 1 = off)")
    p.add_argument("--seed", type=arg(int, "--seed", minimum=0), default=None, help="same seed, same story (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="also stop when TEXT appears (repeatable); <|endoftext|> always stops")


def load_for_generation(args):
    """The checkpoint with its model ready to sample (dtype, device, threads), from the shared args."""
    import torch

    from ..errors import CheckpointError, ConfigError
    from ..runtime import resolve_device
    from ..training.checkpoint import load_checkpoint

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint, prefer=args.prefer, device=resolve_device(args.device))
    if ckpt.tokenizer is None:
        raise CheckpointError(f"{ckpt.path} has no tokenizer.json, so its tokens cannot be turned into text")
    if args.dtype == "bf16":
        ckpt.model.to(torch.bfloat16)
    return ckpt


def sampling_options(args) -> dict:
    from ..errors import ConfigError
    from ..generation import check_sampling

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    top_k = args.top_k or None
    top_p = None if args.top_p in (None, 1.0) else args.top_p
    check_sampling(args.temperature, top_k, top_p, args.repetition_penalty)
    from ..generation import random_seed

    seed = args.seed if args.seed is not None else random_seed()  # reported with --json: rerun a story
    return dict(temperature=args.temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=args.repetition_penalty, seed=seed)


def cmd_generate(args) -> int:
    """Generate stories from a trained checkpoint, streamed to stdout as they are written.

    Each prompt is continued until <|endoftext|>, a --stop string, or --max-new-tokens. With
    several prompts (--prompt repeated) or --num-samples > 1, all rows are generated as one batch
    and printed when done. Speed goes to stderr.

    Examples:
      nanomoe generate --checkpoint runs/tiny-moe --prompt "Once upon a time"
      nanomoe generate --checkpoint runs/tiny-moe --num-samples 4 --temperature 1.0 --top-p 0.9 --seed 1
      nanomoe generate --checkpoint runs/tiny-moe --prompt "The cat" --prompt "A big red ball" --json
    """
    from ..errors import ConfigError
    from ..generation import stream_text

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    options = sampling_options(args)
    ckpt = load_for_generation(args)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    prompts = args.prompt or [""]
    rows = [p for p in prompts for _ in range(args.num_samples)]
    block = model.config.block_size
    for p in prompts:
        n = len(tokenizer.encode(p))
        if n >= block:
            raise ConfigError(f"the prompt {p[:40]!r}... is {n} tokens; this model sees at most {block}; shorten it")

    streaming = len(rows) == 1 and not args.json
    texts = [""] * len(rows)
    stop_reason = ["max_new_tokens"] * len(rows)
    n_new = [0] * len(rows)
    if streaming:
        sys.stdout.write(rows[0])
        sys.stdout.flush()
    t0 = time.perf_counter()
    for step in stream_text(model, tokenizer, rows, args.max_new_tokens, stop_strings=args.stop,
                            compile=args.compile, **options):
        for i, piece in enumerate(step.pieces):
            texts[i] += piece
            if step.tokens[i] is not None and not step.stopped[i]:
                n_new[i] += 1
            if step.stopped[i]:
                stop_reason[i] = "endoftext"
            elif step.finished[i] and step.tokens[i] is not None:  # ended without a stop token
                stop_reason[i] = "stop_string"
        if streaming and step.pieces[0]:
            sys.stdout.write(step.pieces[0])
            sys.stdout.flush()
    seconds = time.perf_counter() - t0
    total = sum(n_new)
    for i in range(len(rows)):  # cut short by the context window, not by --max-new-tokens
        if stop_reason[i] == "max_new_tokens" and n_new[i] < args.max_new_tokens:
            stop_reason[i] = "context_full"
    if "context_full" in stop_reason:
        print(f"note: stopped when the model's context of {block} tokens (prompt included) was full; "
              f"--max-new-tokens {args.max_new_tokens} does not fit", file=sys.stderr)
    rate = total / seconds if seconds > 0 else 0.0

    if args.json:
        samples = [dict(prompt=p, text=t, new_tokens=n, stop_reason=r)
                   for p, t, n, r in zip(rows, texts, n_new, stop_reason)]
        print(json.dumps(dict(checkpoint=str(ckpt.path), samples=samples, seed=options["seed"], seconds=seconds,
                              tokens_per_s=rate,
                              settings=dict(options, max_new_tokens=args.max_new_tokens, stop=args.stop)), indent=2))
        return 0
    if streaming:
        sys.stdout.write("\n")
    else:
        for i, (p, t) in enumerate(zip(rows, texts)):
            if len(rows) > 1:
                print(f"--- sample {i + 1}/{len(rows)} ---")
            print(p + t)
    sys.stdout.flush()
    from ..generation import decode_backend

    compiled = decode_backend(ckpt.model, args.compile) == "compiled"
    note = "; torch.compile: the first call includes compiling" if compiled else ""
    print(f"[{total} tokens in {seconds:.2f} s: {rate:.1f} tokens/s{note}]", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "generate", cmd_generate)
    add_model_args(p)
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="text to continue (repeatable: the prompts run as one batch); default: a story from scratch")
    p.add_argument("--num-samples", type=arg(int, "--num-samples", minimum=1), default=1, help="stories per prompt (default 1)")
    add_sampling_args(p, max_new_tokens=200)
    p.add_argument("--json", action="store_true", help="print one JSON object with every sample")
