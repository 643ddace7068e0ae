"""Cost of one `sample_next` call on the CPU, per sampling setting, for one row of a vocabulary.

    python research/sampling_cost.py [--vocab 2048] [--json]

"flat" logits are what a random-weight model gives (top-p must sort the whole vocabulary), "peaked"
what a trained one gives (the nucleus is among the 64 most likely tokens). Also the torch ops the
old path used (sort, multinomial), for comparison. Median microseconds of --calls calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nanomoe.generation import sample_next


def microseconds(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    flat = torch.randn(1, args.vocab)
    peaked = flat * 4
    g = torch.Generator().manual_seed(0)
    probs = flat.softmax(-1)
    report = {
        "greedy": microseconds(lambda: sample_next(flat, 0.0), args.calls),
        "temperature_1": microseconds(lambda: sample_next(flat, 1.0, generator=g), args.calls),
        "top_k_50": microseconds(lambda: sample_next(flat, 0.8, top_k=50, generator=g), args.calls),
        "top_p_0.9_flat": microseconds(lambda: sample_next(flat, 1.0, top_p=0.9, generator=g), args.calls),
        "top_p_0.9_peaked": microseconds(lambda: sample_next(peaked, 1.0, top_p=0.9, generator=g), args.calls),
        "torch_sort": microseconds(lambda: torch.sort(flat, descending=True, dim=-1), args.calls),
        "torch_multinomial": microseconds(lambda: torch.multinomial(probs, 1, generator=g), args.calls),
    }
    if args.json:
        print(json.dumps({"vocab": args.vocab, "threads": torch.get_num_threads(), "us": report}, indent=2))
        return
    for name, us in report.items():
        print(f"{name:20s} {us:8.1f} us")


if __name__ == "__main__":
    main()
