"""This machine's memory bandwidth as PyTorch's own kernels see it: a copy, a read (a sum) and a
write (a fill) of a buffer much larger than the caches, at one thread and at all threads. The
memory-bound passes of a training step (AdamW, casts, norms, gathers) cannot beat these.

    python research/memory_bandwidth.py [--mb 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def best_seconds(fn, repeats: int) -> float:
    fn()  # touch the pages first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="buffer size in MB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    n_bytes = args.mb << 20
    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    all_threads = torch.get_num_threads()
    report: dict[str, dict[str, float]] = {}
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        passes = {  # bytes moved by each
            "copy": (lambda: dst.copy_(src), 2 * n_bytes),
            "read": (lambda: src.sum(), n_bytes),
            "write": (lambda: dst.fill_(1.0), n_bytes),
        }
        report[str(threads)] = {name: moved / best_seconds(fn, args.repeats) / 1e9 for name, (fn, moved) in passes.items()}
    torch.set_num_threads(all_threads)
    if args.json:
        print(json.dumps({"gb_per_s_by_threads": report, "mb": args.mb}, indent=2))
        return
    for threads, rates in report.items():
        print(f"{threads} thread(s): " + "  ".join(f"{name} {rate:5.1f} GB/s" for name, rate in rates.items()))


if __name__ == "__main__":
    main()
