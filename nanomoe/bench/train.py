"""`nanomoe bench train`: training throughput (tokens/s) and MFU of real training steps.

The steps are the trainer's own (`Trainer.train_step`: data loading, forward, backward, AdamW) on
the built-in corpus. MFU is nanomoe/mfu.py's, as in the progress bar: FLOPs per token from the
calculator over the device's bf16 peak (published for known GPUs, else measured once per machine
and cached; `--remeasure-peak` measures again). The MoE preset and its dense twin are stepped
alternately so both see the same machine conditions.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

from ..cli import add_command


def make_trainer(preset: str, args, data_dir, run_dir):
    from ..data import read_meta
    from ..presets import resolve_model_config
    from ..training.config import TrainConfig
    from ..training.trainer import Trainer

    model_cfg = resolve_model_config(preset, None, args.set)
    model_cfg = model_cfg.replace(vocab_size=int(read_meta(data_dir)["vocab_size"]))
    train_cfg = TrainConfig(
        batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len, precision=args.precision,
        max_steps=10**9, eval_every=10**9, save_every=0, log_every=10**9, samples=0, tensorboard=False,
        plots=False, progress=False, compile=args.compile, device=args.device,
        activation_checkpointing=args.activation_checkpointing, seed=0,
    )
    return Trainer(model_cfg, train_cfg, run_dir, data_dir)


def run(args) -> dict:
    import torch

    from ..data import builtin_corpus_dir
    from ..malloc import keep_freed_memory
    from ..mfu import mfu, peak_flops

    keep_freed_memory()  # as `nanomoe train` does

    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = builtin_corpus_dir()
    presets = [args.preset] + ([args.dense_preset] if args.dense_preset not in (None, "none") else [])
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {p: make_trainer(p, args, data_dir, f"{tmp}/{p}") for p in presets}
        device = next(iter(trainers.values())).device
        peak = peak_flops(device, remeasure=args.remeasure_peak)
        for trainer in trainers.values():
            for _ in range(args.warmup):
                trainer.train_step()
        times: dict[str, list[float]] = {p: [] for p in presets}
        for _ in range(args.steps):
            for p, trainer in trainers.items():  # interleaved: same conditions for both
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainer.train_step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[p].append(time.perf_counter() - t0)

    results = {}
    for p, trainer in trainers.items():
        step = statistics.median(times[p])
        tokens = trainer.sequences_per_step * trainer.seq_len
        tokens_per_s = tokens / step
        results[p] = {
            "step_seconds": step,
            "step_seconds_each": times[p],
            "tokens_per_step": tokens,
            "tokens_per_s": tokens_per_s,
            "flops_per_token_train": trainer.flops_per_token,
            "mfu": mfu(trainer.model_config, trainer.seq_len, tokens_per_s, peak),
        }
    main = results[args.preset]
    report = {
        "preset": args.preset,
        "tokens_per_s": main["tokens_per_s"],
        "mfu": main["mfu"],
        "peak_flops": peak.flops,
        "peak_flops_by_size": {str(s): f for s, f in peak.by_size.items()},  # measured peaks only
        "peak": peak.describe(),
        "peak_source": peak.source,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "seq_len": next(iter(trainers.values())).seq_len,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "device": str(device),
        "models": results,
    }
    if len(presets) == 2:
        report["dense_preset"] = args.dense_preset
        report["moe_over_dense_step_time"] = main["step_seconds"] / results[args.dense_preset]["step_seconds"]
        # the same ratio step by step: each MoE step against the dense step right after it, which a
        # drifting machine (a VM's speed moves by tens of percent within minutes) slows alike
        pairs = [m / d for m, d in zip(times[args.preset], times[args.dense_preset])]
        report["moe_over_dense_step_time_pairwise"] = statistics.median(pairs)
    return report


def cmd_bench_train(args) -> int:
    """Training tokens/s and MFU (model FLOPs / the device's bf16 peak) of real training steps.

    Steps the MoE preset and its dense twin alternately on the built-in corpus and reports
    tokens_per_s, mfu and moe_over_dense_step_time. With --nproc N, launches N processes
    (torchrun, gloo on CPU) and reports the scaling efficiency against 1 process.
    """
    if args.nproc > 1:
        from .train_distributed import run_distributed_bench

        report = run_distributed_bench(args)
    else:
        report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if "models" not in report:  # distributed report
        for key, value in report.items():
            print(f"{key:28s} {value}")
        return 0
    print(f"MFU against {report['peak']} (`nanomoe bench peak`)")
    for name, r in report["models"].items():
        print(f"{name:12s} step {r['step_seconds'] * 1000:7.1f} ms  {r['tokens_per_s']:9.0f} tok/s  "
              f"MFU {r['mfu']:.3f}  ({r['tokens_per_step']} tokens/step, {r['flops_per_token_train'] / 1e6:.1f} "
              "MFLOP/token)")
    if "moe_over_dense_step_time" in report:
        print(f"MoE / dense step time: {report['moe_over_dense_step_time']:.3f} (step by step: "
              f"{report['moe_over_dense_step_time_pairwise']:.3f})")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "train", cmd_bench_train)
    p.add_argument("--preset", default="tiny-moe")
    p.add_argument("--dense-preset", default="tiny-dense", help="the dense twin for the step-time ratio; 'none' skips it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model overrides applied to both presets")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=0, help="0 = the model's block_size")
    p.add_argument("--precision", choices=["bf16", "fp32", "fp16"], default="bf16")
    p.add_argument("--steps", type=int, default=10, help="measured steps per model (median reported)")
    p.add_argument(
        "--warmup", type=int, default=10,
        help="untimed steps per model: an MoE meets new expert row counts (oneDNN compiles a kernel for "
        "each) for its first ~10 steps; with --compile, also the compilation",
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) for the distributed measurement")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="fsdp", help="with --nproc > 1")
    p.add_argument("--remeasure-peak", action="store_true",
                   help="measure the bf16 peak again (CPU, unlisted GPUs) instead of using the cached one")
    p.add_argument("--json", action="store_true")
