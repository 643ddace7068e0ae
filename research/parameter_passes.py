"""What a step spends on passes over the parameters alone, for an MoE preset and its dense twin:
a lower bound on `moe_over_dense_step_time` that no dispatch or kernel work can remove while the
weights are fp32 masters with fp32 AdamW state.

Every step, whatever the layer code, reads and writes each parameter a fixed number of times: the
fused AdamW update (parameter, gradient and two moments read; parameter and moments written), the
gradient norm for clipping, the bf16 copy of every matrix for the autocast products and the copy of
its bf16 gradient back into the fp32 `.grad`. An MoE has ~3x the dense twin's parameters for the
same FLOPs, so these memory-bound passes cost it more. This times each pass alone on the real
parameters of both presets (the trainer's own optimizer, interleaved), and a real training step of
the dense twin, and prints the ratio the MoE step could reach if everything else cost exactly what
the dense step's does:

    floor = (dense step + MoE passes - dense passes) / dense step

    python research/parameter_passes.py [--moe-preset tiny-moe] [--dense-preset tiny-dense] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from nanomoe.bench.timing import time_interleaved
from nanomoe.bench.train import make_trainer
from nanomoe.data import builtin_corpus_dir
from nanomoe.malloc import keep_freed_memory


def parameter_passes(trainer) -> dict:
    """The per-step parameter passes of `trainer`'s model, as callables over its real tensors."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    matrices = [p for p in params if p.dim() >= 2]  # what autocast / the expert kernels cast to bf16
    bf16_grads = [p.grad.to(torch.bfloat16) for p in matrices]
    grads = [p.grad for p in params]
    return {
        "adamw": lambda: trainer.optimizer.step(),
        "grad_norm": lambda: torch.nn.utils.get_total_norm(grads),
        "weight_casts": lambda: [p.to(torch.bfloat16) for p in matrices],
        "grad_copies": lambda: [p.grad.copy_(g) for p, g in zip(matrices, bf16_grads)],
    }, sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe-preset", default="tiny-moe")
    parser.add_argument("--dense-preset", default="tiny-dense")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=12, help="dense training steps timed for the step time")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    keep_freed_memory()  # as `nanomoe train` does

    opts = argparse.Namespace(set=[], batch_size=16, grad_accum=1, seq_len=0, precision="bf16", compile=False,
                              device="cpu", activation_checkpointing=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {p: make_trainer(p, opts, builtin_corpus_dir(), f"{tmp}/{p}") for p in (args.moe_preset,
                                                                                            args.dense_preset)}
        dense = trainers[args.dense_preset]
        for _ in range(4):
            dense.train_step()
        step_times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            dense.train_step()
            step_times.append(time.perf_counter() - t0)
        dense_step = statistics.median(step_times)

        fns, n_params = {}, {}
        for preset, trainer in trainers.items():
            passes, n_params[preset] = parameter_passes(trainer)
            fns.update({f"{preset}/{name}": fn for name, fn in passes.items()})
        seconds = time_interleaved(fns, repeats=args.repeats, warmup=2)

    report: dict = {"dense_step_ms": dense_step * 1e3, "threads": torch.get_num_threads(), "presets": {}}
    for preset in trainers:
        passes = {name.split("/", 1)[1]: s * 1e3 for name, s in seconds.items() if name.startswith(preset + "/")}
        report["presets"][preset] = {"parameters": n_params[preset], "ms": passes, "total_ms": sum(passes.values())}
    extra = report["presets"][args.moe_preset]["total_ms"] - report["presets"][args.dense_preset]["total_ms"]
    report["moe_extra_ms"] = extra
    report["moe_over_dense_floor"] = (report["dense_step_ms"] + extra) / report["dense_step_ms"]
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for preset, r in report["presets"].items():
        parts = "  ".join(f"{name} {ms:5.1f}" for name, ms in r["ms"].items())
        print(f"{preset:12s} {r['parameters'] / 1e6:5.1f}M parameters: {parts}  = {r['total_ms']:5.1f} ms")
    print(f"{args.dense_preset} training step {report['dense_step_ms']:.1f} ms; the MoE's parameter passes add "
          f"{extra:.1f} ms: moe_over_dense_step_time >= {report['moe_over_dense_floor']:.3f} from them alone")


if __name__ == "__main__":
    main()
