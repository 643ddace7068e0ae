"""`nanomoe study`: several training configurations under the same time budget, compared honestly.

On a machine whose speed drifts, "equal wall clock" must not mean "whoever ran during a quiet minute
wins". So the budget is turned into steps once, for all runs together:

1. every run's trainer is built in this one process and the runs take turns, one step each, for
   WARMUP_ROUNDS rounds (not timed) and then `rounds` timed rounds, the order reversed every round
   so a drift in speed touches all runs alike;
2. each run's seconds per step is the median of its timed steps (its ratio to the first run's is
   what the interleaving makes robust); the budget buys run i floor(budget / s_i) steps;
3. each run trains for exactly that many steps with the ordinary trainer (fresh, from step 0), is
   evaluated on the whole validation split, and lands in study.json, study.md and study.png
   (validation bits/byte against training seconds = steps x measured seconds per step).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from .atomic_io import write_json_atomic, write_text_atomic
from .config import ModelConfig
from .errors import ConfigError
from .runtime import synchronize

log = logging.getLogger("nanomoe.study")

WARMUP_ROUNDS = 2


@dataclasses.dataclass
class StudyRun:
    label: str
    model_config: ModelConfig
    train_config: Any  # TrainConfig
    data_dir: Path


def check_same_tokenizer(runs: list[StudyRun]) -> None:
    """Runs compared on bits/byte of one validation text must read it through the same tokenizer."""
    first = runs[0]
    reference = (first.data_dir / "tokenizer.json").read_text()
    for run in runs[1:]:
        if (run.data_dir / "tokenizer.json").read_text() != reference:
            raise ConfigError(
                f"runs {first.label} and {run.label} read data dirs with different tokenizers ({first.data_dir} and "
                f"{run.data_dir}): a study compares runs on one validation text; prepare both from the same "
                "tokenizer (nanomoe prepare --tokenizer ...) or use one --data"
            )


def measure_interleaved(trainers: list, rounds: int) -> list[list[float]]:
    """Seconds of each trainer's timed steps, the trainers taking turns one step at a time."""
    times: list[list[float]] = [[] for _ in trainers]
    order = list(range(len(trainers)))
    for r in range(WARMUP_ROUNDS + rounds):
        for i in order:
            t0 = time.perf_counter()
            trainers[i].train_step()
            synchronize(trainers[i].device)  # a step queued on a GPU is not a step done
            seconds = time.perf_counter() - t0
            if r >= WARMUP_ROUNDS:
                times[i].append(seconds)
        order.reverse()
    return times


def run_study(runs: list[StudyRun], minutes: float, out: str | Path, *, rounds: int = 5,
              wandb_project: str = "") -> dict[str, Any]:
    """Measure, decide, train, evaluate, report. Returns what study.json holds."""
    from .training.trainer import Trainer

    if minutes <= 0:
        raise ConfigError(f"--minutes {minutes}: give a positive budget, e.g. --minutes 10")
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: time at least one step of each run")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty (an earlier study?); pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    budget = minutes * 60

    # --- 1. step times, interleaved in this process (throwaway trainers: nothing is saved) ---
    log.info("measuring step times: %d runs x (%d + %d) interleaved steps", len(runs), WARMUP_ROUNDS, rounds)
    calibration = [Trainer(r.model_config, r.train_config.replace(max_steps=1, max_minutes=0.0), out / ".calibration",
                           r.data_dir) for r in runs]
    times = measure_interleaved(calibration, rounds)
    del calibration
    per_step = [statistics.median(t) for t in times]
    steps = [max(1, math.floor(budget / s)) for s in per_step]
    method = (f"each run's step time is the median of {rounds} steps measured interleaved with the other runs' in one "
              f"process (after {WARMUP_ROUNDS} untimed rounds, the order reversed every round); the "
              f"{minutes:g}-minute budget buys run i floor({budget:g} s / its s/step) steps")
    for run, s, n in zip(runs, per_step, steps):
        log.info("%s: %.3f s/step (%.3fx the first run's) -> %d steps", run.label, s, s / per_step[0], n)

    # --- 2. train each run for its steps, evaluate on the whole validation split ---
    results = []
    for run, s, n, measured in zip(runs, per_step, steps, times):
        cfg = run.train_config.replace(max_steps=n, max_minutes=0.0, eval_every=max(1, n // 8), samples=0,
                                       wandb_project=wandb_project or run.train_config.wandb_project)
        trainer = Trainer(run.model_config, cfg, out / run.label, run.data_dir)
        result = trainer.fit()
        if result["stopped"]:  # Ctrl-C / SIGTERM: the run saved a checkpoint; the study ends here
            raise KeyboardInterrupt
        final = trainer.evaluate(whole_split=True)
        from .training.plots import read_metrics

        curve = [{"step": r["step"], "seconds": r["step"] * s, "bits_per_byte": r.get("bits_per_byte"),
                  "loss": r["loss"]} for r in read_metrics(out / run.label) if r["kind"] == "eval"]
        results.append({
            "label": run.label, "run_dir": str(out / run.label),
            "seconds_per_step": s, "step_time_ratio": s / per_step[0], "measured_step_seconds": measured,
            "steps": result["step"], "tokens": result["tokens_seen"],
            "training_seconds_actual": result["elapsed_seconds"],
            "val_loss": final["loss"], "val_bits_per_byte": final.get("bits_per_byte"),
            "val_tokens": final.get("tokens"), "curve": curve,
            "model": run.model_config.to_dict(), "train": cfg.to_dict(),
        })
        del trainer

    study = {"minutes": minutes, "budget_seconds": budget, "method": method, "data_dir": str(runs[0].data_dir),
             "runs": results}
    write_json_atomic(out / "study.json", study)
    write_text_atomic(out / "study.md", study_markdown(study))
    plot_study(study, out / "study.png")
    if wandb_project:
        log_study_to_wandb(study, wandb_project, out)
    return study


def study_markdown(study: dict[str, Any]) -> str:
    lines = [
        f"# Study: {study['minutes']:g} minutes of training per run",
        "",
        f"Data: `{study['data_dir']}`. Method: {study['method']}. Validation on the whole split.",
        "",
        "| run | s/step (measured) | ratio | steps | tokens | val loss | val bits/byte |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in study["runs"]:
        bpb = f"{r['val_bits_per_byte']:.4f}" if r["val_bits_per_byte"] is not None else "-"
        lines.append(f"| {r['label']} | {r['seconds_per_step']:.3f} | {r['step_time_ratio']:.3f} | {r['steps']} | "
                     f"{r['tokens'] / 1e6:.2f}M | {r['val_loss']:.4f} | {bpb} |")
    return "\n".join(lines) + "\n"


def plot_study(study: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in study["runs"]:
        points = [(c["seconds"], c["bits_per_byte"]) for c in r["curve"] if c["bits_per_byte"] is not None]
        line = ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=r["label"], alpha=0.85)
        if r["val_bits_per_byte"] is not None:  # the whole-split evaluation at the end
            ax.plot([r["steps"] * r["seconds_per_step"]], [r["val_bits_per_byte"]], "*", markersize=12,
                    color=line[0].get_color())
    ax.set_xlabel("training seconds (steps x interleaved-measured s/step)")
    ax.set_ylabel("validation bits/byte")
    ax.set_title(f"{study['minutes']:g}-minute study (star: whole validation split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_study_to_wandb(study: dict[str, Any], project: str, out: Path) -> None:
    """One W&B run (job_type "study") with the comparison table; each training run logged its own curves."""
    import wandb

    run = wandb.init(project=project, job_type="study", name=out.name, dir=str(out),
                     config={"minutes": study["minutes"], "method": study["method"]})
    columns = ["run", "seconds_per_step", "step_time_ratio", "steps", "tokens", "val_loss", "val_bits_per_byte"]
    table = wandb.Table(columns=columns, data=[[r["label"], r["seconds_per_step"], r["step_time_ratio"], r["steps"],
                                                r["tokens"], r["val_loss"], r["val_bits_per_byte"]]
                                               for r in study["runs"]])
    run.log({"study": table})
    run.finish()


__all__ = ["StudyRun", "check_same_tokenizer", "run_study", "study_markdown"]
