"""Timing helpers shared by the benchmarks: interleaved repeats, medians, the machine's matmul peak."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 2, device="cpu", inner: int = 1
) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin so drifts in machine speed
    (thermal, other processes) hit every candidate alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def matmul_peak_flops(dtype: torch.dtype = torch.bfloat16, device="cpu", size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a large square matrix product: the 'peak' that MFU is relative to."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = time_interleaved({"mm": lambda: a @ b}, repeats=repeats, warmup=2, device=device)["mm"]
    return 2 * size**3 / seconds
