"""Native decode step (nanomoe/csrc/decode_step.cpp): which matrix-product kernel wins at which batch
size, and how a step's time grows with the position (attention reads the whole prefix).

    python research/native_decode_kernels.py [--preset tiny-llama] [--batches 1,2,4,8,16,32] [--json]

For every batch size, decode steps (no sampling, no Python loop around them beyond the step call)
run with each kernel forced in turn, interleaved, best of --repeats:
- matvec: four weight rows per pass, the batch-1 kernel;
- packed: weights repacked into vdpbf16ps pairs, up to 8 input rows per weight load;
- amx: the same packed weights through AMX tiles.
The defaults the decoder uses (packed from 2 rows, AMX from 8) come from this table. Then, with the
defaults, the time per step in windows of positions for batch 1 and the largest batch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nanomoe.generation import Decoder
from nanomoe.kernels import extension
from nanomoe.model import GPT
from nanomoe.presets import resolve_model_config

KERNELS = {"matvec": (1 << 30, 1 << 30), "packed": (1, 1 << 30), "amx": (1, 1)}  # (pack from, AMX from) rows
DEFAULT_PACK_MIN, DEFAULT_AMX_MIN = 2, 8


def steps_per_s(model, batch: int, steps: int, start: int = 1) -> float:
    """Decode steps per second at positions [start, start + steps)."""
    with torch.inference_mode():
        decoder = Decoder(model, batch, start + steps + 1, compile=True)
        assert decoder.backend == "native", decoder.backend
        decoder.prefill([[1]] * batch)
        decoder.next_slot = start  # earlier slots hold zeros: the timing does not depend on their values
        tokens = torch.ones(batch, dtype=torch.long)
        t0 = time.perf_counter()
        for _ in range(steps):
            decoder.step(tokens)
        return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-llama")
    p.add_argument("--batches", default="1,2,4,8,16,32")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    module = extension.load_extension()
    if module is None:
        raise SystemExit("the native decode step could not be built on this machine")
    cfg = resolve_model_config(args.preset, None, [])
    torch.manual_seed(0)
    model = GPT(cfg.replace(kernels="native")).eval().to(torch.bfloat16)
    batches = [int(b) for b in args.batches.split(",")]

    kernels: dict[int, dict[str, float]] = {}
    try:
        for batch in batches:
            best = {name: 0.0 for name in KERNELS}
            for _ in range(args.repeats):
                for name, (pack_min, amx_min) in KERNELS.items():
                    module.set_pack_min_batch(pack_min)
                    module.set_amx_min_batch(amx_min)
                    best[name] = max(best[name], batch * steps_per_s(model, batch, args.steps))
            kernels[batch] = {k: round(v) for k, v in best.items()}
    finally:
        module.set_pack_min_batch(DEFAULT_PACK_MIN)
        module.set_amx_min_batch(DEFAULT_AMX_MIN)

    by_position: dict[int, dict[str, float]] = {}
    windows = [w for w in (1, 64, 128, 192) if w + args.steps // 2 < cfg.block_size]
    for batch in sorted({1, max(batches)}):
        by_position[batch] = {
            f"{w}-{w + args.steps // 2}": round(1e6 / max(steps_per_s(model, batch, args.steps // 2, w)
                                                         for _ in range(args.repeats)))
            for w in windows
        }
    report = {"preset": args.preset, "threads": torch.get_num_threads(), "dtype": "bfloat16",
              "tokens_per_s_by_kernel": kernels, "us_per_step_by_position": by_position}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.preset}, bf16, {report['threads']} threads: tokens/s by kernel (best of {args.repeats})")
    print(f"{'rows':>6} " + " ".join(f"{k:>9}" for k in KERNELS))
    for batch, row in kernels.items():
        print(f"{batch:>6} " + " ".join(f"{row[k]:>9}" for k in KERNELS))
    for batch, row in by_position.items():
        print(f"batch {batch}, us per step by position: " + ", ".join(f"{k}: {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
