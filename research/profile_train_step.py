"""Where a training step goes: torch.profiler self CPU time per op, per step, for a preset's real
`Trainer.train_step` on the built-in corpus (bf16 by default), plus the throughput of the MoE
layers' per-expert matrix products grouped by shape. The numbers in docs/training.md ("Speed")
come from this script.

    python research/profile_train_step.py --preset tiny-moe [--steps 5] [--warmup 4] [--rows 22]
    python research/profile_train_step.py --preset tiny-dense
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from nanomoe.bench.train import make_trainer
from nanomoe.data import builtin_corpus_dir
from nanomoe.malloc import keep_freed_memory

FFN_SHAPES_HINT = "products whose row count is a whole batch (B*T) are attention/LM-head; the rest are per-expert"


def profile_train_steps(preset: str, precision: str, batch_size: int, warmup: int, steps: int):
    """torch.profiler (with shapes) over `steps` real Trainer.train_step calls of `preset` on the
    built-in corpus, after `warmup` of them. Returns the profile and the trainer."""
    keep_freed_memory()  # as `nanomoe train` does
    opts = argparse.Namespace(set=[], batch_size=batch_size, grad_accum=1, seq_len=0, precision=precision,
                              compile=False, device="cpu", activation_checkpointing=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(preset, opts, builtin_corpus_dir(), f"{tmp}/run")
        for _ in range(warmup):
            trainer.train_step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                trainer.train_step()
    return prof, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rows", type=int, default=22, help="ops to list")
    args = parser.parse_args()

    prof, trainer = profile_train_steps(args.preset, args.precision, args.batch_size, args.warmup, args.steps)
    tokens = trainer.sequences_per_step * trainer.seq_len

    print(f"{args.preset}, {args.precision}, {tokens} tokens per step, {torch.get_num_threads()} threads; "
          f"self CPU ms per step:")
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        print(f"  {event.key:<45} {event.self_cpu_time_total / 1e3 / args.steps:8.1f} ms  "
              f"{event.count / args.steps:6.0f} calls")

    # matrix products by kind: whole-batch rows (attention projections, LM head) vs per-expert blocks
    kinds: dict[str, list[float]] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key != "aten::mm" or len(event.input_shapes) < 2 or len(event.input_shapes[0]) != 2:
            continue
        (m, k), (_, n) = event.input_shapes[0], event.input_shapes[1]
        kind = "whole batch" if tokens in (m, k) else "per expert"
        flops, ms = kinds.setdefault(kind, [0.0, 0.0])
        kinds[kind] = [flops + 2 * m * k * n * event.count, ms + event.self_cpu_time_total / 1e3]
    print(f"aten::mm ({FFN_SHAPES_HINT}):")
    for kind, (flops, ms) in kinds.items():
        print(f"  {kind:<12} {ms / args.steps:8.1f} ms per step  {flops / (ms / 1e3) / 1e9:7.0f} GFLOP/s")


if __name__ == "__main__":
    main()
