"""The highest MFU a preset's training step could reach on this machine if nothing but its matrix
products ran, each as fast as it runs alone: a ceiling for `nanomoe bench train`'s MFU.

It records every matrix product (mm, addmm, bmm, baddbmm, with shapes and call counts) of a few real
`Trainer.train_step`s under torch.profiler, then times each distinct product alone in bf16 (or fp32),
with all threads and with one thread (two one-thread products can run side by side, as the MoE
experts do: half the one-thread time is credited), keeping the faster. Their sum is the shortest a
step could take; the model FLOPs per step (from the calculator, as the bench counts them) over that
time, divided by the bf16 peak MFU always uses (nanomoe/mfu.py, `nanomoe bench peak`), is the ceiling. Everything else (softmax, norms, SwiGLU, casts, AdamW) only lowers the real MFU.

    python research/mfu_ceiling.py --preset tiny-moe [--json]
    python research/mfu_ceiling.py --preset tiny-dense
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from profile_train_step import profile_train_steps  # the script beside this one

from nanomoe.bench.timing import time_interleaved
from nanomoe.mfu import peak_flops

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def product_shapes(events) -> Counter:
    """(op, (batch, m, k, n)) -> calls, from profiler events recorded with shapes."""
    calls: Counter = Counter()
    for event in events:
        if event.key not in PRODUCTS:
            continue
        shapes = [s for s in event.input_shapes if s]
        if event.key in ("aten::addmm", "aten::baddbmm"):
            shapes = shapes[1:]  # the added term first
        (a, b) = shapes[:2]
        if len(a) == 2:
            key = (1, a[0], a[1], b[1])
        else:
            key = (a[0], a[1], a[2], b[2])
        calls[(event.key, key)] += event.count
    return calls


def time_product(shape, dtype, threads: int) -> float:
    batch, m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(batch, m, k, generator=gen).to(dtype)
    b = torch.randn(batch, k, n, generator=gen).to(dtype)
    fn = (lambda: torch.mm(a[0], b[0])) if batch == 1 else (lambda: torch.bmm(a, b))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inner = max(1, int(2e8 // max(2 * batch * m * k * n, 1)))  # ~0.1-0.5 ms per sample at least
        return time_interleaved({"p": fn}, repeats=5, warmup=2, inner=inner)["p"]
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    prof, trainer = profile_train_steps(args.preset, args.precision, args.batch_size, args.warmup, args.steps)
    calls = product_shapes(prof.key_averages(group_by_input_shape=True))
    tokens = trainer.sequences_per_step * trainer.seq_len
    threads = torch.get_num_threads()

    seconds = 0.0
    product_flops = 0.0
    for (_op, shape), count in calls.items():
        best = time_product(shape, dtype, threads)
        if threads > 1:
            best = min(best, time_product(shape, dtype, 1) / threads)
        seconds += best * count / args.steps
        batch, m, k, n = shape
        product_flops += 2 * batch * m * k * n * count / args.steps
    peak = peak_flops(torch.device("cpu")).flops
    model_flops = trainer.flops_per_token * tokens
    report = {
        "preset": args.preset,
        "precision": args.precision,
        "tokens_per_step": tokens,
        "distinct_products": len(calls),
        "product_calls_per_step": sum(calls.values()) / args.steps,
        "product_seconds_per_step": seconds,
        "product_flops_per_step": product_flops,
        "model_flops_per_step": model_flops,
        "products_flop_per_s": product_flops / seconds,
        "peak_flops": peak,
        "mfu_ceiling": model_flops / seconds / peak,
        "tokens_per_s_ceiling": tokens / seconds,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.preset} ({args.precision}, {tokens} tokens per step, {threads} threads): "
              f"{report['product_calls_per_step']:.0f} matrix products per step ({len(calls)} distinct shapes)")
        print(f"  products alone: {seconds * 1e3:.1f} ms per step, {product_flops / seconds / 1e9:.0f} GFLOP/s")
        print(f"  bf16 peak (nanomoe bench peak): {peak / 1e12:.2f} TFLOP/s")
        print(f"  MFU ceiling: {report['mfu_ceiling']:.3f}  ({report['tokens_per_s_ceiling']:.0f} tokens/s "
              f"if nothing else ran)")


if __name__ == "__main__":
    main()
