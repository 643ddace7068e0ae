"""Keep freed memory in the process on Linux/glibc, so big CPU tensors are not page-faulted anew.

Why: PyTorch allocates CPU tensors with malloc. glibc's malloc hands allocations above a dynamic
threshold (up to 32 MiB) to fresh mmaps, and gives the top of its heap back to the kernel whenever
more than ~2x that threshold is free. A training step allocates and frees hundreds of MB of
activations, so on the next step the same memory is faulted in again, page by page. On the 2-core
VM this was measured on, a fresh 32 MiB tensor costs ~6 ms to touch (vs 0.6 ms warm), which can be a
third of an MoE layer's step in bf16; whether a given model is hit depends on its allocation order
(see docs/moe.md). Telling glibc never to mmap and never to trim keeps the memory warm: the
process's peak memory stays resident, which is what a training loop needs anyway.

Equivalent to running with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Configure glibc malloc to reuse freed memory instead of returning it. True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok_mmap = mallopt(_M_MMAP_MAX, 0)
    ok_trim = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(ok_mmap and ok_trim)
