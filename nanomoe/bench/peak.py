"""`nanomoe bench peak`: the bf16 peak every MFU figure divides by (nanomoe/mfu.py)."""

from __future__ import annotations

import json

from ..cli import add_command


def cmd_bench_peak(args) -> int:
    """The bf16 matrix-product peak MFU is measured against, and where it comes from.

    A GPU in nanomoe.mfu.CUDA_BF16_PEAKS: its published dense bf16 figure. The CPU (or another
    GPU): the best of 1024/2048/4096 square bf16 products, measured once per machine and cached in
    ~/.cache/nanomoe/peak_flops.json; --remeasure measures again (do it on a quiet machine).
    """
    from ..mfu import peak_flops
    from ..runtime import resolve_device

    peak = peak_flops(resolve_device(args.device), remeasure=args.remeasure)
    report = {"peak_flops": peak.flops, "source": peak.source, "device": peak.device,
              "peak_flops_by_size": {str(s): f for s, f in peak.by_size.items()}, "peak": peak.describe()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(report["peak"])
        for size, flops in peak.by_size.items():
            print(f"  {size} x {size}: {flops / 1e12:.2f} TFLOP/s")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "peak", cmd_bench_peak)
    p.add_argument("--device", default="auto")
    p.add_argument("--remeasure", action="store_true", help="measure again instead of reading the cache")
    p.add_argument("--json", action="store_true")
