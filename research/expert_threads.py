"""Microbenchmark behind an idea that was tried and not adopted (docs/moe.md, "What was tried"):
the expert products of one MoE layer's forward run one after another on all threads (what
nanomoe does), against shared out among single-threaded worker threads, one per core (per-thread
`omp_set_num_threads(1)`, which leaves the caller's threads alone). bf16, contiguous or strided
(sliced from a stacked [gate | up] weight, as in the layer) expert weights.

    python research/expert_threads.py [--experts 8] [--rows 1024] [--n-embd 256] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import ctypes
from concurrent.futures import ThreadPoolExecutor

import torch

from nanomoe.bench.timing import time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1024, help="tokens per expert")
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    E, R, D, H = args.experts, args.rows, args.n_embd, args.hidden

    torch.manual_seed(0)
    bf16 = torch.bfloat16
    xs = torch.randn(E * R, D, dtype=bf16).split(R)
    w_in = torch.randn(E, D, 2 * H, dtype=bf16)
    strided = (w_in[:, :, :H].unbind(0), w_in[:, :, H:].unbind(0))
    contiguous = tuple([w.contiguous() for w in ws] for ws in strided)
    h, u = torch.empty(E * R, H, dtype=bf16).split(R), torch.empty(E * R, H, dtype=bf16).split(R)
    w_out = torch.randn(E, H, D, dtype=bf16).unbind(0)
    y = torch.empty(E * R, D, dtype=bf16).split(R)

    def expert(e: int, weights) -> None:
        torch.mm(xs[e], weights[0][e], out=h[e])
        torch.mm(xs[e], weights[1][e], out=u[e])
        torch.mm(h[e], w_out[e], out=y[e])

    workers = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, initializer=lambda: ctypes.CDLL(None).omp_set_num_threads(1))

    def in_order(weights) -> None:
        for e in range(E):
            expert(e, weights)

    def shared_out(weights) -> None:
        groups = [range(w, E, workers) for w in range(workers)]
        for future in [pool.submit(lambda g: [expert(e, weights) for e in g], g) for g in groups]:
            future.result()

    fns = {f"{how}_{layout}": (lambda f=f, w=w: f(w))
           for how, f in (("in_order", in_order), ("shared_out", shared_out))
           for layout, w in (("contiguous", contiguous), ("strided", strided))}
    ms = time_interleaved(fns, repeats=15, warmup=3)
    print(f"{E} experts x {R} rows, D {D}, H {H}, bf16, {workers} threads / workers; ms per forward:")
    for name, seconds in ms.items():
        print(f"  {name:<22} {seconds * 1e3:7.2f}")


if __name__ == "__main__":
    main()
