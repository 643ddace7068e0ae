"""How the MoE layer's per-expert matrix products scale from one thread to two, timed in place.

Runs the layer of `nanomoe bench moe` (default shape: 4096 tokens, n_embd 256, 8 experts x hidden
1024, top-2, swiglu; bf16 autocast) forward+backward, and times every `torch.mm` / `torch.addmm`
call of the grouped expert Function (nanomoe/kernels/grouped_ffn.py) as it happens, at each thread count,
with the dense FFN of equal active FLOPs stepped in between. Prints JSON: per thread count the
median MoE step time, its time in expert products per step, and the dense step time.

    NANOMOE_KERNELS=torch python research/expert_mm_scaling.py [--threads 1,2] [--steps 8] [--dtype bf16]

(the torch kernels: the native ones make no torch.mm calls to time)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nanomoe.bench import moe as bench_moe
from nanomoe.malloc import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--expert-hidden", type=int, default=1024)
    args = parser.parse_args()

    keep_freed_memory()  # as the layer benchmark does
    shape = argparse.Namespace(
        tokens=4096, n_embd=256, expert_hidden=args.expert_hidden, n_experts=8, top_k=2, ffn="swiglu",
        router="topk", seed=0, no_hf=True,
    )
    candidates = bench_moe.build_candidates(shape, "cpu")
    xs, grad_out = bench_moe.make_inputs(shape, "cpu", n=8)
    step = bench_moe.make_step(*candidates["nanomoe"], xs, grad_out, args.dtype, "cpu")
    dense_step = bench_moe.make_step(*candidates["dense"], xs, grad_out, args.dtype, "cpu")

    spent = [0.0]
    real_mm, real_addmm = torch.mm, torch.addmm

    def timed(op):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = op(*a, **k)
            spent[0] += time.perf_counter() - t0
            return out

        return call

    report = {"shape": vars(shape), "dtype": args.dtype}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for _ in range(10):  # every batch's shapes seen (oneDNN compiles a kernel per shape)
            step()
            dense_step()
        steps, products, dense = [], [], []
        torch.mm, torch.addmm = timed(real_mm), timed(real_addmm)  # grouped_ffn calls torch.mm/addmm
        try:
            for _ in range(args.steps):
                spent[0] = 0.0
                t0 = time.perf_counter()
                step()
                steps.append(time.perf_counter() - t0)
                products.append(spent[0])
                t0 = time.perf_counter()
                dense_step()  # interleaved: the dense FFN of equal active FLOPs, for its scaling
                dense.append(time.perf_counter() - t0)
        finally:
            torch.mm, torch.addmm = real_mm, real_addmm
        report[f"threads_{threads}"] = {
            "step_ms": round(statistics.median(steps) * 1e3, 2),
            "expert_products_ms": round(statistics.median(products) * 1e3, 2),
            "dense_step_ms": round(statistics.median(dense) * 1e3, 2),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
