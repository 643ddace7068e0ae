"""`nanomoe bench generate`: decoding speed in tokens/s.

Three measurements, each a full `generate_batch` call (prompt, then `--new-tokens` greedy tokens,
no early stop) timed end to end:

- batch 1 with the static KV cache (the fast path: the native C++ step on the CPU, else
  torch.compile for a dense model; eager with --no-compile),
- batch 1 without a cache (every token reruns the whole sequence: the baseline the cache beats),
- `--batch-size` rows (32) with the cache: batched throughput, new tokens of all rows per second.

Compile time is measured apart (the first call pays it) and never counted in tokens/s. When the
native step applies, the same cases also run through torch.compile (`*_torch_compile` keys). The weights
are random unless --checkpoint is given: speed does not depend on their values. Run it on a quiet
machine; each number is the median of --repeats runs, the candidates interleaved.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

from ..cli import add_command

# CPU ticks (10 ms) other processes may use during one timed run before it is taken again
FOREIGN_TICKS_ALLOWED = 5


def load_model(args):
    import torch

    from ..model import GPT
    from ..runtime import resolve_device

    if args.checkpoint:
        from ..training.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        model, name = ckpt.model, str(ckpt.path)
    else:
        from ..presets import resolve_model_config

        cfg = resolve_model_config(args.preset, None, args.set)
        needed = args.prompt_tokens + args.new_tokens
        if cfg.block_size < needed:  # a longer rope table costs nothing per token; the shape stays the same
            cfg = cfg.replace(block_size=needed)
        torch.manual_seed(0)
        model, name = GPT(cfg), args.preset
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    return model.to(resolve_device(args.device)).eval(), name


def run(args) -> dict:
    import torch

    from ..errors import ConfigError
    from ..generation import Decoder, cache_length, decode_backend, generate_batch
    from .timing import cpu_ticks, foreign_ticks

    for flag in ("new_tokens", "prompt_tokens", "batch_size", "repeats"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, model_name = load_model(args)
    cfg = model.config
    n_new = min(args.new_tokens, cfg.block_size - args.prompt_tokens)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=g).tolist()

    @dataclass
    class Case:
        batch_size: int
        use_cache: bool = True
        compile: bool = False
        temperature: float = 0.0  # greedy unless said otherwise
        top_p: float | None = None
        native: bool = True  # False: torch.compile even where the native step applies

        def __call__(self) -> float:
            """Seconds for one generate_batch call (and building its decoder, as generate_batch does)."""
            t0 = time.perf_counter()
            decoder = None
            if self.use_cache:
                max_len = cache_length(len(prompt) + n_new, cfg.block_size)
                decoder = Decoder(model, self.batch_size, max_len, compile=self.compile, native=self.native)
            out = generate_batch(model, [prompt] * self.batch_size, n_new, temperature=self.temperature,
                                 top_p=self.top_p, use_cache=self.use_cache, decoder=decoder, seed=0)
            seconds = time.perf_counter() - t0
            assert all(len(row) == n_new for row in out)  # no stop tokens: every row runs to the end
            return seconds

    batched = f"batch{args.batch_size}"
    backend = decode_backend(model, args.compile)
    cases = {"batch1": Case(1, compile=args.compile)}
    if backend != "eager":
        cases["batch1_eager"] = Case(1)
    cases["batch1_nocache"] = Case(1, use_cache=False)
    cases[batched] = Case(args.batch_size, compile=args.compile)
    cases["batch1_sampled"] = Case(1, compile=args.compile, temperature=1.0, top_p=0.9)
    if backend == "native" and not cfg.is_moe:  # what torch.compile reaches on the same model, for comparison
        cases["batch1_torch_compile"] = Case(1, compile=True, native=False)
        cases[f"{batched}_torch_compile"] = Case(args.batch_size, compile=True, native=False)
    elif backend == "native":  # MoE models decode eagerly without it
        cases[f"{batched}_eager"] = Case(args.batch_size)

    first_call = {name: case() for name, case in cases.items()}  # warm-up; a compiled case compiles here
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, case in cases.items():  # interleaved, so a busy moment hits every case alike
            for _attempt in range(3):  # retake a sample during which other processes used the CPU
                ticks = cpu_ticks()
                seconds = case()
                if foreign_ticks(ticks, cpu_ticks()) <= FOREIGN_TICKS_ALLOWED:
                    break
            samples[name].append(seconds)
    steady = {name: statistics.median(s) for name, s in samples.items()}

    def tokens_per_s(name: str) -> float:
        return cases[name].batch_size * n_new / steady[name]

    report = {
        "model": model_name,
        "device": str(model.tok_emb.weight.device),
        "n_params": model.num_params(),
        "dtype": str(model.tok_emb.weight.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "compile": backend != "eager",
        "backend": backend,  # native (C++ step), compiled (torch.compile) or eager
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": n_new,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "tokens_per_s_batch1": tokens_per_s("batch1"),
        "tokens_per_s_batch1_nocache": tokens_per_s("batch1_nocache"),
        f"tokens_per_s_{batched}": tokens_per_s(batched),
        "tokens_per_s_batch1_sampled": tokens_per_s("batch1_sampled"),
    }
    for name in ("batch1_eager", f"{batched}_eager"):
        if name in cases:
            report[f"tokens_per_s_{name}"] = tokens_per_s(name)
    if backend != "eager":
        compiled = [n for n in cases if n in ("batch1", batched) or n.endswith("_torch_compile")]
        report["compile_seconds"] = {n: max(0.0, first_call[n] - steady[n]) for n in compiled}
    for name in cases:
        if name.endswith("_torch_compile"):
            report[f"tokens_per_s_{name}"] = tokens_per_s(name)
    report["seconds"] = steady
    return report


def cmd_bench_generate(args) -> int:
    """Decoding speed: tokens/s at batch 1 with and without the KV cache, and batched throughput.

    Examples:
      nanomoe bench generate                       # tiny-llama (llama2.c's stories15M shape), random weights
      nanomoe bench generate --preset tiny-moe --json
      nanomoe bench generate --checkpoint runs/tiny-moe --no-compile
    """
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {report['model']} ({report['n_params'] / 1e6:.2f}M parameters, {report['dtype']}, "
          f"{report['threads']} threads, decode step: {report['backend']}), "
          f"{report['prompt_tokens']}-token prompt + {report['new_tokens']} new tokens, greedy")
    b = args.batch_size
    rows = [
        ("batch 1, KV cache", report["tokens_per_s_batch1"]),
        ("batch 1, KV cache, eager", report.get("tokens_per_s_batch1_eager")),
        ("batch 1, no cache", report["tokens_per_s_batch1_nocache"]),
        (f"batch {b}, KV cache", report[f"tokens_per_s_batch{b}"]),
        ("batch 1, sampled (T=1, top-p 0.9)", report["tokens_per_s_batch1_sampled"]),
        (f"batch {b}, KV cache, eager", report.get(f"tokens_per_s_batch{b}_eager")),
        ("batch 1, torch.compile instead", report.get("tokens_per_s_batch1_torch_compile")),
        (f"batch {b}, torch.compile instead", report.get(f"tokens_per_s_batch{b}_torch_compile")),
    ]
    for label, value in rows:
        if value is not None:
            print(f"  {label:36s} {value:10.0f} tokens/s")
    if "compile_seconds" in report:
        c = report["compile_seconds"]
        print("  compile time (not counted above): " + ", ".join(f"{k} {v:.1f} s" for k, v in c.items()))
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "generate", cmd_bench_generate)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny-llama", help="model shape with random weights (default: tiny-llama)")
    source.add_argument("--checkpoint", help="run directory or checkpoint to load instead of a preset")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset field (repeatable)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row (default: 256)")
    p.add_argument("--prompt-tokens", type=int, default=1, help="prompt length in tokens (default: 1)")
    p.add_argument("--batch-size", type=int, default=32, help="rows of the batched measurement (default: 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median counts")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16",
                   help="weights and KV cache (default bf16: half the bytes per token of fp32)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, or auto (CUDA when present); "
                   "every case ends by reading its tokens on the host, so the timings include the GPU's work")
    p.add_argument("--compile", action=argparse_bool(), default=True,
                   help="torch.compile the decode step (default: on; --no-compile for eager)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction
