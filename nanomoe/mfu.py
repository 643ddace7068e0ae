"""MFU (model FLOPs utilization), defined once for the progress bar, metrics.jsonl, run.json,
`nanomoe bench train` and the README:

    MFU = model FLOPs per token (training: 3 x forward, from nanomoe/params.py) x tokens/s / peak

The peak is always the device's bf16 dense matrix-product peak, whatever the run's precision (an
fp32 run shows how much of the machine's fast path it leaves unused):

- a CUDA GPU in `CUDA_BF16_PEAKS`: its published dense bf16 tensor-core figure (not the 2:4-sparse one);
- the CPU, or a GPU not in the table: the best bf16 product throughput measured on this machine
  (square products of 1024, 2048 and 4096), measured once and cached in
  `~/.cache/nanomoe/peak_flops.json` (`$NANOMOE_CACHE`), keyed by the processor, the thread count
  and the torch version. `nanomoe bench peak --remeasure` measures again, on a quiet machine.
"""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic_io import write_json_atomic
from .config import ModelConfig
from .data import cache_root
from .params import flops_per_token

# (pattern in torch.cuda.get_device_name(), name, dense bf16 FLOP/s from the vendor's data sheet);
# the first match wins, so the more specific patterns come first
CUDA_BF16_PEAKS: tuple[tuple[str, str, float], ...] = (
    (r"\bH200\b", "NVIDIA H200", 989e12),
    (r"\bH100\b.*\bPCIe\b", "NVIDIA H100 PCIe", 756e12),
    (r"\bH100\b.*\bNVL\b", "NVIDIA H100 NVL", 835e12),
    (r"\bH100\b", "NVIDIA H100 SXM", 989e12),
    (r"\bA100\b", "NVIDIA A100", 312e12),
    (r"\bL40S\b", "NVIDIA L40S", 362e12),
    (r"\bL40\b", "NVIDIA L40", 181e12),
    (r"\bL4\b", "NVIDIA L4", 121e12),
    (r"\bA10\b", "NVIDIA A10", 125e12),
    (r"\bRTX 4090\b", "NVIDIA GeForce RTX 4090", 165e12),
    (r"\bRTX 3090\b", "NVIDIA GeForce RTX 3090", 71e12),
)
PEAK_SIZES = (1024, 2048, 4096)
CACHE_FILE = "peak_flops.json"


@dataclass(frozen=True)
class Peak:
    """What MFU divides by: `flops` (FLOP/s), where it comes from and for which device."""

    flops: float
    source: str  # "published" (the GPU table) or "measured" (this machine, cached)
    device: str
    by_size: dict[int, float] = field(default_factory=dict)  # measured peaks: FLOP/s per product size

    def describe(self) -> str:
        return f"{self.flops / 1e12:.2f} TFLOP/s, the {self.source} bf16 peak of {self.device}"


def mfu(model_config: ModelConfig, seq_len: int, tokens_per_s: float, peak: Peak) -> float:
    """The one MFU: training FLOPs per token (the calculator) x tokens/s / the bf16 peak."""
    return tokens_per_s * flops_per_token(model_config, seq_len)["train"] / peak.flops


def published_peak(device_name: str) -> Peak | None:
    """The table's entry for a CUDA device name, None when the GPU is not in it."""
    for pattern, name, flops in CUDA_BF16_PEAKS:
        if re.search(pattern, device_name):
            return Peak(flops, "published", name)
    return None


def peak_flops(device: torch.device | str = "cpu", *, remeasure: bool = False,
               cache_dir: str | Path | None = None) -> Peak:
    """The bf16 peak of `device`: published for a listed GPU, else measured once and cached."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        published = published_peak(name)
        if published is not None:
            return published
    else:
        name = f"{processor_name()} ({torch.get_num_threads()} threads)"
    key = f"{device.type}: {name}, torch {torch.__version__}"
    path = Path(cache_dir or cache_root()) / CACHE_FILE
    cached = _read_cache(path)
    if key in cached and not remeasure:
        entry = cached[key]
        return Peak(entry["flops"], "measured", name, {int(s): f for s, f in entry["by_size"].items()})
    by_size = {size: matmul_flops(size, device) for size in PEAK_SIZES}
    peak = Peak(max(by_size.values()), "measured", name, by_size)
    cached[key] = {"flops": peak.flops, "by_size": {str(s): f for s, f in by_size.items()},
                   "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        write_json_atomic(path, cached)
    except OSError:  # a read-only home: measure again next time
        pass
    return peak


def matmul_flops(size: int, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` bf16 (size x size) @ (size x size) products."""
    # a private generator: measuring mid-training must not move the training RNG (exact resume)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    best = float("inf")
    for i in range(repeats + 2):  # two warm-up products
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def processor_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["CUDA_BF16_PEAKS", "Peak", "mfu", "matmul_flops", "peak_flops", "processor_name", "published_peak"]
