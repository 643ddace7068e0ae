"""`nanomoe bench train --nproc N --strategy ddp|fsdp`: data-parallel training throughput and scaling.

Launches N processes with torchrun (gloo on CPU, nccl on GPUs), each stepping the trainer's own
`train_step` with a micro-batch of `--batch-size` sequences, and compares with one process:

- tokens_per_s: all N processes together (threads per process = cores / N on the CPU);
- tokens_per_s_1proc: one process with the same per-process batch and threads (one worker alone);
- scaling_efficiency = tokens_per_s / (N * tokens_per_s_1proc): 1.0 means the collectives cost nothing;
- tokens_per_s_1proc_all_cores: one process with the global batch and every core, and
  speedup_vs_1proc_all_cores: whether splitting this machine into processes pays at all (on a CPU
  it rarely does: one process already uses every core; the point here is that it works and costs little);
- cpu_efficiency: CPU seconds per token of one process / of N processes (summed over ranks). Wall
  times on a shared machine swing with whatever else runs; CPU time shows what distribution costs in
  work (collectives, copies) and hardly moves with the load.

Runs are interleaved (N-process, 1-process, 1-process all cores, repeated) and medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _worker(opts) -> None:
    """One process of the measurement (under torchrun, or alone). Rank 0 writes the result file."""
    import torch

    from ..data import builtin_corpus_dir, read_meta
    from ..malloc import keep_freed_memory
    from ..presets import resolve_model_config
    from ..runtime import DistContext, resolve_device
    from ..training.config import TrainConfig
    from ..training.trainer import Trainer

    if opts.threads:
        torch.set_num_threads(opts.threads)
    keep_freed_memory()  # as `nanomoe train` does
    data_dir = builtin_corpus_dir()
    model_cfg = resolve_model_config(opts.preset, None, opts.set or [])
    model_cfg = model_cfg.replace(vocab_size=int(read_meta(data_dir)["vocab_size"]))
    train_cfg = TrainConfig(
        batch_size=opts.batch_size, grad_accum=opts.grad_accum, seq_len=opts.seq_len, precision=opts.precision,
        max_steps=10**9, eval_every=10**9, save_every=0, log_every=10**9, samples=0, tensorboard=False, plots=False,
        progress=False, device=opts.device, strategy=opts.strategy, seed=0, threads=opts.threads,
        activation_checkpointing=opts.activation_checkpointing,
    )
    ctx = DistContext.from_env(resolve_device(opts.device).type)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(model_cfg, train_cfg, tmp, data_dir, dist=ctx)
            for _ in range(opts.warmup):
                trainer.train_step()
            seconds, cpu_seconds = [], []
            for _ in range(opts.steps):
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                trainer.train_step()  # ends with an all-reduce of the metrics: every rank is done
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - t0)
                cpu_seconds.append(time.process_time() - c0)
        # CPU seconds of all processes per step (median of each rank's steps, summed over ranks)
        cpu_step = ctx.all_reduce_sum(torch.tensor([statistics.median(cpu_seconds)], dtype=torch.float64)).item()
        if ctx.is_main:
            step = statistics.median(seconds)
            tokens = trainer.sequences_per_step * trainer.seq_len
            Path(opts.result).write_text(json.dumps({
                "step_seconds": step, "tokens_per_step": tokens, "tokens_per_s": tokens / step,
                "cpu_seconds_per_token": cpu_step / tokens, "threads": torch.get_num_threads(),
                "world_size": ctx.world_size,
            }))
    finally:
        ctx.shutdown()


def _launch(opts: dict, nproc: int, threads: int, batch_size: int, strategy: str, timeout: float,
            activation_checkpointing: bool = False) -> dict:
    """One measurement: `nproc` processes (torchrun) or one plain process; returns rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        worker = ["--worker", f"--threads={threads}", f"--batch-size={batch_size}", f"--strategy={strategy}",
                  f"--result={result}"]
        worker += [f"--{k.replace('_', '-')}={v}" for k, v in opts.items() if k != "set" and v is not None]
        worker += ["--activation-checkpointing"] if activation_checkpointing else []
        worker += [f"--set={item}" for item in opts["set"]]
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
        cmd = [sys.executable, *launcher, "-m", "nanomoe.bench.train_distributed", *worker]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not result.is_file():
            from ..errors import NanoMoEError

            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise NanoMoEError(f"the {nproc}-process benchmark run failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result.read_text())


def run_distributed_bench(args) -> dict:
    """N-process throughput against 1 process, for `nanomoe bench train --nproc N --strategy S`.

    `args` carries preset, nproc, strategy, steps, warmup, batch_size (per process), grad_accum,
    seq_len, precision, device, threads (per process; 0 = cores / nproc), set, and optionally
    repeats (default 2)."""
    from ..errors import ConfigError

    nproc, strategy = int(args.nproc), args.strategy
    if nproc < 2:
        raise ConfigError("--nproc must be >= 2 for the distributed benchmark")
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"--strategy must be ddp or fsdp, got {strategy!r}")
    cores = os.cpu_count() or 1
    device = getattr(args, "device", "auto") or "auto"
    on_gpu = device.startswith("cuda") or (device == "auto" and _cuda_available())
    threads = getattr(args, "threads", 0) or max(1, cores // nproc)
    opts = {k: getattr(args, k, None) for k in ("preset", "steps", "warmup", "grad_accum", "seq_len", "precision")}
    activation_checkpointing = bool(getattr(args, "activation_checkpointing", False))
    opts["device"] = device
    opts["set"] = list(getattr(args, "set", None) or [])
    timeout = 600.0
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    runs: dict[str, list[dict]] = {"n": [], "one": [], "all": []}
    for _ in range(max(1, int(getattr(args, "repeats", 2) or 2))):
        runs["n"].append(_launch(opts, nproc, threads, args.batch_size, strategy, timeout, activation_checkpointing))
        runs["one"].append(_launch(opts, 1, threads, args.batch_size, "single", timeout, activation_checkpointing))
        if not on_gpu:  # one GPU process cannot use the other GPUs: there is no "all cores" baseline
            runs["all"].append(_launch(opts, 1, cores, args.batch_size * nproc, "single", timeout,
                                       activation_checkpointing))

    def median(kind: str, key: str = "tokens_per_s") -> float:
        return statistics.median(r[key] for r in runs[kind])

    tokens_per_s, one = median("n"), median("one")
    report = {
        "preset": args.preset,
        "strategy": strategy,
        "nproc": nproc,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_1proc": one,
        "scaling_efficiency": tokens_per_s / (nproc * one),
        "cpu_seconds_per_token": median("n", "cpu_seconds_per_token"),
        "cpu_seconds_per_token_1proc": median("one", "cpu_seconds_per_token"),
        "cpu_efficiency": median("one", "cpu_seconds_per_token") / median("n", "cpu_seconds_per_token"),
        "step_seconds": median("n", "step_seconds"),
        "step_seconds_1proc": median("one", "step_seconds"),
        "tokens_per_step": runs["n"][0]["tokens_per_step"],
        "batch_size_per_process": args.batch_size,
        "threads_per_process": threads,
        "precision": args.precision,
        "activation_checkpointing": activation_checkpointing,
        "repeats": len(runs["n"]),
        "cpu_cores": cores,
    }
    if runs["all"]:
        report["tokens_per_s_1proc_all_cores"] = median("all")
        report["speedup_vs_1proc_all_cores"] = tokens_per_s / median("all")
    if load_before is not None:  # other work on the machine skews wall times: say how busy it was
        report["load_average_1min_before_after"] = [load_before, os.getloadavg()[0]]
    return report


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="worker of nanomoe bench train --nproc (launched by it)")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--strategy", default="single")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=0)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--set", action="append")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--result", required=True)
    _worker(parser.parse_args(argv))


if __name__ == "__main__":
    from ..runtime import exit_worker

    main()
    exit_worker(0)
