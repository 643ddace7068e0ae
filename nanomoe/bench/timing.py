"""Timing helpers shared by the benchmarks: interleaved repeats, medians, CPU ticks taken by other processes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# A sample during which other processes used more than this much CPU time (in clock ticks, usually
# 10 ms each) is thrown away and taken again: on a small shared machine one busy neighbour can
# double a timing, and the median of a handful of repeats does not hide that.
_FOREIGN_TICKS_ALLOWED = 1
_MAX_RETRIES_PER_SAMPLE = 5


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process) from /proc, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return busy, int(mine[11]) + int(mine[12])  # utime + stime, all threads


def foreign_ticks(before, after) -> int:
    if before is None or after is None:
        return 0
    return (after[0] - before[0]) - (after[1] - before[1])


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 7,
    warmup: int = 2,
    device="cpu",
    inner: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin so drifts in machine speed
    (thermal, other processes) hit every candidate alike. On Linux, a sample during which another
    process took CPU time is retaken (a few times at most).

    `clock=time.process_time` measures this process's CPU time instead of wall time: immune to
    being descheduled on a shared machine, and equal to wall time for single-threaded CPU work
    (with several threads it adds their times up, spin-waits included)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    attempts = _MAX_RETRIES_PER_SAMPLE + 1 if clock is time.perf_counter else 1  # CPU time needs no retakes
    for _ in range(repeats):
        for name, fn in fns.items():
            for _attempt in range(attempts):
                sync(device)
                ticks = cpu_ticks()
                t0 = clock()
                for _ in range(inner):
                    fn()
                sync(device)
                seconds = (clock() - t0) / inner
                if foreign_ticks(ticks, cpu_ticks()) <= _FOREIGN_TICKS_ALLOWED:
                    break
            samples[name].append(seconds)
    return {name: statistics.median(s) for name, s in samples.items()}
