"""Eager against torch.compile for real training steps, in one process, interleaved.

Four trainers (the MoE preset and its dense twin, each eager and compiled) on the built-in corpus
take turns step by step, so a drift in the machine's speed hits all four alike; the median step
time of each is reported, with the compiled/eager speedups and the MoE/dense ratios both ways.
Compilation happens during the warmup (inductor needs a C++ compiler; ~15-40 s the first time).

    python research/train_compile_ab.py [--preset tiny-moe] [--dense-preset tiny-dense] [--steps 12] [--warmup 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from nanomoe.bench.train import make_trainer
from nanomoe.data import builtin_corpus_dir
from nanomoe.malloc import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--dense-preset", default="tiny-dense")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per trainer (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps: compilation, new expert shapes")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    keep_freed_memory()  # as `nanomoe train` does
    if args.threads:
        torch.set_num_threads(args.threads)
    options = argparse.Namespace(
        set=None, batch_size=args.batch_size, grad_accum=1, seq_len=0, precision="bf16", device="cpu",
        activation_checkpointing=False, compile=False,
    )
    data_dir = builtin_corpus_dir()
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in (args.preset, args.dense_preset):
            for compiled in (False, True):
                name = f"{preset}{'_compiled' if compiled else ''}"
                options.compile = compiled
                trainers[name] = make_trainer(preset, options, data_dir, f"{tmp}/{name}")
        warmup_s = {}
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                trainer.train_step()
            warmup_s[name] = time.perf_counter() - t0
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.steps):
            for name, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.train_step()
                times[name].append(time.perf_counter() - t0)

    tokens = args.batch_size * next(iter(trainers.values())).seq_len
    step_ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    moe, dense = args.preset, args.dense_preset
    report = {
        "step_ms": {k: round(v, 1) for k, v in step_ms.items()},
        "tokens_per_s": {k: round(tokens / v * 1e3) for k, v in step_ms.items()},
        "warmup_s": {k: round(v, 1) for k, v in warmup_s.items()},
        "compile_speedup": {p: round(step_ms[p] / step_ms[f"{p}_compiled"], 3) for p in (moe, dense)},
        "moe_over_dense_eager": round(step_ms[moe] / step_ms[dense], 3),
        "moe_over_dense_compiled": round(step_ms[f"{moe}_compiled"] / step_ms[f"{dense}_compiled"], 3),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
