"""Run logging: a JSONL metrics file, TensorBoard event files, a progress bar, plots at the end.

Only rank 0 writes (`enabled=False` on the others). metrics.jsonl is appended to; a resumed run
first drops the rows past the step it resumes from, so each (kind, step) appears once.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..mfu import Peak
from .plots import plot_run

log = logging.getLogger("nanomoe.train")

class _NoProgress:
    """Stands in for tqdm when the bar is off (other ranks, --no-progress, tests)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, row: dict) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, flush=True)

    def set_total(self, total: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Progress:
    def __init__(self, total: int | None, initial: int, peak: Peak | None) -> None:
        from tqdm.auto import tqdm

        self.peak_tflops = f" of {peak.flops / 1e12:.3g} TFLOP/s" if peak is not None else ""
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, smoothing=0.1)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, row: dict) -> None:
        self.bar.set_postfix_str(
            f"loss {row['loss']:.3f} lr {row['lr']:.2e} {row['tokens_per_s'] / 1000:.1f}k tok/s "
            f"MFU {row['mfu']:.2f}{self.peak_tflops}", refresh=False
        )

    def write(self, text: str) -> None:
        self.bar.write(text)

    def set_total(self, total: int) -> None:
        """A time budget's step count, known after the first steps."""
        self.bar.total = total
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.use_tensorboard = tensorboard
        self._tb = None
        self._wandb = None  # a Weights & Biases run when train_config.wandb_project is set
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # --- writers ---

    def _write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop the rows after `step` (a resume from there): what a killed segment logged past its
        last checkpoint is trained again and would otherwise appear twice."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                if int(row["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut by a crash
                continue
        from ..atomic_io import write_text_atomic

        write_text_atomic(self.metrics_path, "".join(f"{line}\n" for line in kept))

    def _tensorboard(self):
        if self._tb is None and self.enabled and self.use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSONL file still has everything
                self.use_tensorboard = False
                return None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        return self._tb

    def write_config(self, model_config, train_config, data_dir, data_meta, total_steps: int | None,
                     peak: Peak | None = None, kernels: str | None = None) -> None:
        """total_steps None: a time budget decides it in the first steps."""
        if not self.enabled:
            return
        from ..params import count_parameters

        counts = count_parameters(model_config)
        info = {
            "model": model_config.to_dict(),
            "train": train_config.to_dict(),
            "data_dir": str(data_dir),
            "data": {k: v for k, v in data_meta.items() if k != "tokenizer"},
            "total_steps": total_steps,
            "kernels": kernels,  # the kernel backend that ran (model.kernels asks; "auto" resolves per device)
            "total_params": counts.total,
            "active_params": counts.active,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "mfu_peak_flops": peak.flops if peak is not None else None,  # what MFU divides by (nanomoe/mfu.py)
            "mfu_peak": peak.describe() if peak is not None else None,
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        from ..atomic_io import write_json_atomic

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "run.json"
        if path.is_file():  # a resumed run: keep how it started, record each restart
            try:
                started = json.loads(path.read_text())
            except json.JSONDecodeError:
                started = {}
            started.setdefault("resumed", []).append(info)
            info = started
        write_json_atomic(path, info)
        if train_config.wandb_project:
            self._start_wandb(train_config.wandb_project, info)
        length = f"{total_steps} steps" if total_steps is not None else \
            f"{train_config.max_minutes:g} minutes of training steps"
        log.info("model: %.2fM parameters (%.2fM active per token); %s; run dir %s",
                 counts.total / 1e6, counts.active / 1e6, length, self.run_dir)

    def _start_wandb(self, project: str, info: dict) -> None:
        try:
            import wandb
        except ImportError:
            from ..errors import ConfigError

            raise ConfigError(f"--set wandb_project={project} needs Weights & Biases: pip install 'nanomoe[wandb]' "
                              "(or drop wandb_project)") from None
        # offline with WANDB_MODE=offline (synced later with `wandb sync RUN/wandb/offline-run-*`)
        self._wandb = wandb.init(project=project, name=self.run_dir.name, dir=str(self.run_dir), config=info,
                                 job_type="train")

    def _log_wandb(self, prefix: str, step: int, row: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def progress(self, total: int | None, initial: int, enabled: bool, peak: Peak | None = None):
        return _Progress(total, initial, peak) if enabled else _NoProgress()

    def log_train(self, step: int, row: dict[str, Any]) -> None:
        self._write({"kind": "train", "step": step, "time": time.time(), **row})
        self._log_wandb("train", step, row)
        tb = self._tensorboard()
        if tb is not None:
            for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "load_cv"):
                if row.get(key) is not None:
                    tb.add_scalar(f"train/{key}", row[key], step)

    def log_eval(self, step: int, result: dict[str, Any]) -> None:
        self._write({"kind": "eval", "step": step, "time": time.time(), **result})
        self._log_wandb("val", step, result)
        tb = self._tensorboard()
        if tb is not None:
            for key in ("loss", "perplexity", "bits_per_byte", "accuracy"):
                if result.get(key) is not None:
                    tb.add_scalar(f"val/{key}", result[key], step)
            moe = result.get("moe")
            if moe:
                for key in ("load_cv", "routing_entropy", "dropped_fraction", "dead_experts"):
                    tb.add_scalar(f"moe/{key}", moe[key], step)
                for i, layer in enumerate(moe["layers"]):
                    tb.add_scalars(f"moe/load_layer{i}",
                                   {f"expert{e}": f for e, f in enumerate(layer["load_fractions"])}, step)

    @staticmethod
    def format_eval(step: int, result: dict[str, Any]) -> str:
        parts = [f"step {step}", f"val loss {result['loss']:.4f}", f"ppl {result['perplexity']:.2f}"]
        if result.get("bits_per_byte") is not None:
            parts.append(f"bpb {result['bits_per_byte']:.3f}")
        parts.append(f"acc {result['accuracy']:.3f}")
        moe = result.get("moe")
        if moe:
            parts.append(f"load cv {moe['load_cv']:.3f}")
            parts.append(f"entropy {moe['routing_entropy']:.2f}")
            parts.append(f"dead experts {moe['dead_experts']}")
            if moe["dropped_fraction"] > 0:
                parts.append(f"dropped {moe['dropped_fraction']:.3f}")
        return " | ".join(parts)

    def finish(self, make_plots: bool = True) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self.enabled and make_plots and self.metrics_path.is_file():
            try:
                plot_run(self.run_dir)
            except Exception as e:  # a plotting problem must never cost a finished run
                log.warning("could not draw plots: %s", e)
