"""The MoE layer with and without the native expert kernels (csrc/experts.cpp), in one process.

Forward+backward of the layer of `nanomoe bench moe` (4096 tokens, n_embd 256, 8 experts, top-2),
stepped in turn through the native kernels and through the torch backend (its grouped Function in
Python; the layer's kernels switched between steps), with the dense FFN of equal active FLOPs in
between: a drift in the machine's speed hits all three alike. Prints medians and ratios as JSON.

    python research/native_experts_ab.py [--expert-hidden 1024] [--dtype bf16|fp32] [--ffn swiglu] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nanomoe.bench import moe as bench_moe
from nanomoe.kernels import NATIVE, TORCH
from nanomoe.malloc import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expert-hidden", type=int, default=1024)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--ffn", choices=["swiglu", "relu", "gelu"], default="swiglu")
    parser.add_argument("--steps", type=int, default=16, help="timed steps of each (median reported)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    keep_freed_memory()  # as the layer benchmark does
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = argparse.Namespace(
        tokens=4096, n_embd=256, expert_hidden=args.expert_hidden, n_experts=8, top_k=2, ffn=args.ffn,
        router="topk", seed=0, no_hf=True,
    )
    candidates = bench_moe.build_candidates(shape, "cpu")
    xs, grad_out = bench_moe.make_inputs(shape, "cpu", n=8)
    moe_step = bench_moe.make_step(*candidates["nanomoe"], xs, grad_out, args.dtype, "cpu")
    dense_step = bench_moe.make_step(*candidates["dense"], xs, grad_out, args.dtype, "cpu")
    layer = candidates["nanomoe"][0]
    runs = {"native": (NATIVE, moe_step), "python": (TORCH, moe_step), "dense": (NATIVE, dense_step)}

    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(args.steps + 1):
        for name, (kernels, step) in runs.items():
            layer.router.kernels = layer.experts.kernels = kernels
            for _ in range(9 if rep == 0 else 1):  # warmup: every batch's shapes once
                t0 = time.perf_counter()
                step()
                elapsed = time.perf_counter() - t0
            if rep:
                times[name].append(elapsed)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(json.dumps({
        "shape": vars(shape), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "ms": {k: round(v, 2) for k, v in ms.items()},
        "native_vs_dense": round(ms["native"] / ms["dense"], 3),
        "python_vs_dense": round(ms["python"] / ms["dense"], 3),
        "native_speedup": round(ms["python"] / ms["native"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
