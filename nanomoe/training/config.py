"""Training configuration: a frozen dataclass, named recipes, and config-file loading.

A run is described by a model config (nanomoe.config.ModelConfig) and a TrainConfig. Both are
saved beside every checkpoint, so a run can be resumed or sampled from without the command line
that started it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig, closest, from_dict, load_config_file, parse_overrides
from ..errors import ConfigError
from ..presets import resolve_model_config

SCHEDULES = ("cosine", "wsd", "onecycle", "constant")
OPTIMIZERS = ("adamw", "muon")
MUON_LR_ADJUSTMENTS = ("match_rms_adamw", "original")
PRECISIONS = ("bf16", "fp16", "fp32")
DATA_MODES = ("packed", "documents")
STRATEGIES = ("single", "ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    # --- data ---
    data: str = "builtin"  # "builtin", "tinystories", or a prepared data dir
    data_mode: str = "packed"  # "packed" windows, or "documents" (one padded story per row)
    seq_len: int = 0  # tokens per training sequence; 0 = the model's block_size

    # --- length of the run: a time budget wins over max_steps, which wins over epochs ---
    max_steps: int = 0
    epochs: float = 0.0
    # minutes of training steps (evaluation and checkpoints not counted); the step count it buys is
    # measured early in the run and saved with it (training/budget.py)
    max_minutes: float = 0.0

    # --- batch ---
    batch_size: int = 16  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    # sequences per optimizer step over all processes; 0 = batch_size * grad_accum * world size. When
    # set, it wins over batch_size (= global_batch_size / (grad_accum * world size)), so the run trains
    # the same on any number of processes
    global_batch_size: int = 0

    # --- optimizer: AdamW (weight decay only on >= 2-D weights), or Muon for the hidden matrices ---
    optimizer: str = "adamw"  # "adamw", or "muon": Muon on the blocks' matrices, AdamW on the rest
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine and wsd decay to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    # "cosine" (linear warmup), "wsd" (warmup, stable, linear decay), "onecycle" (the original
    # NanoGPT-MoE project's), "constant"
    schedule: str = "cosine"
    warmup_steps: int = -1  # -1: 5% of the run (cosine, wsd); onecycle uses pct_start instead
    pct_start: float = 0.3  # onecycle: fraction of the run spent increasing the lr
    decay_frac: float = 0.2  # wsd: fraction of the run spent decaying the lr at the end
    # Muon (torch.optim.Muon; Jordan 2024, Liu et al. 2025): "match_rms_adamw" scales each matrix's
    # update to AdamW's RMS (Moonlight), so lr and weight_decay carry over; "original" is Keller
    # Jordan's sqrt(max(1, rows/cols)), with lr around 0.02
    muon_lr: float = 0.0  # 0: the same as lr
    muon_momentum: float = 0.95
    muon_adjust_lr: str = "match_rms_adamw"
    # Newton-Schulz iterations per matrix and step. Their cost grows with the number of matrices, not
    # tokens: an MoE with 8 experts does 4x its dense twin's (docs/training.md, "Muon"); fewer
    # iterations orthogonalize less exactly but cost proportionally less
    muon_ns_steps: int = 5
    # False: the routed experts' matrices stay on AdamW (Muon on attention, dense FFNs and shared
    # experts only). Each expert is orthogonalized on its own, so Muon's Newton-Schulz work on the
    # experts is n_experts / top_k times the dense twin's FFN work (docs/training.md, "Studies")
    muon_experts: bool = True

    # --- numerics and speed ---
    precision: str = "bf16"  # "bf16" autocast (CPU and GPU), "fp16" autocast + GradScaler (GPU), "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # CPU threads for torch; 0 = torch's default (one per core)

    # --- evaluation, logging, checkpoints ---
    eval_every: int = 200  # steps; 0 = once per epoch
    eval_batches: int = 50  # validation batches per evaluation; 0 = the whole split
    log_every: int = 10
    save_every: int = 500  # steps between `latest` checkpoints; 0 = only at the end
    keep_last: int = 2  # periodic checkpoints kept besides best, epoch checkpoints and the newest
    save_epochs: bool = False  # also keep a checkpoint at the end of every epoch (the NanoGPT-MoE project's habit)
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True
    samples: int = 3  # stories sampled at the end of the run
    sample_tokens: int = 200
    sample_prompt: str = "Once upon a time"

    # --- robustness ---
    max_bad_steps: int = 5  # consecutive non-finite losses tolerated (each step is skipped)

    # --- reproducibility and scale-out ---
    seed: int = 1337
    strategy: str = "single"  # "single", "ddp" or "fsdp" (launch with torchrun)

    # --- optional Weights & Biases logging (pip install nanomoe[wandb]); "" = off ---
    wandb_project: str = ""

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"invalid training config: {msg}")

        for f in dataclasses.fields(self):  # nan slips through every comparison below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f"{f.name} must be a finite number, got {value}")

        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "global_batch_size", "seq_len", "eval_every", "eval_batches", "save_every",
                     "keep_last", "samples", "sample_tokens", "threads"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs < 0:
            fail(f"epochs must be >= 0, got {self.epochs}")
        if self.max_minutes < 0:
            fail(f"max_minutes must be >= 0 (0: no time budget), got {self.max_minutes}")
        if not 0 < self.decay_frac <= 1:
            fail(f"decay_frac must be in (0, 1], got {self.decay_frac}")
        if self.optimizer not in OPTIMIZERS:
            fail(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.muon_adjust_lr not in MUON_LR_ADJUSTMENTS:
            fail(f"muon_adjust_lr must be one of {MUON_LR_ADJUSTMENTS}, got {self.muon_adjust_lr!r}")
        if self.muon_lr < 0 or not 0 <= self.muon_momentum < 1:
            fail("muon_lr must be >= 0 (0: the same as lr) and muon_momentum in [0, 1)")
        if not 1 <= self.muon_ns_steps <= 99:
            fail(f"muon_ns_steps must be in 1..99 (5 is the usual choice), got {self.muon_ns_steps}")
        if self.optimizer == "muon" and self.strategy == "fsdp":
            fail("optimizer muon does not run under FSDP (it orthogonalizes whole matrices, which FSDP shards "
                 "across processes): use --strategy ddp, or --set optimizer=adamw")
        if self.optimizer == "muon" and self.precision == "fp16":
            fail("optimizer muon does not take a gradient scaler (fp16): use --set precision=bf16")
        if self.lr <= 0:
            fail(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            fail(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            fail("beta1 and beta2 must be in [0, 1)")
        if not 0 < self.pct_start < 1:
            fail(f"pct_start must be in (0, 1), got {self.pct_start}")
        if self.schedule not in SCHEDULES:
            fail(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            fail(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.data_mode not in DATA_MODES:
            fail(f"data_mode must be one of {DATA_MODES}, got {self.data_mode!r}")
        if self.strategy not in STRATEGIES:
            fail(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.max_bad_steps < 1:
            fail(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_dict(cls, data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return from_dict(type(self), {**self.to_dict(), **changes})


# Named training recipes. "default" trains budget-moe on the built-in corpus for 2 minutes of training
# steps (the README's first command: clone to printed stories in under 5 minutes with the install).
# Warmup-stable-decay won the recipe search for the MoE and the dense twin alike. At 10 minutes both
# budget presets train best with Muon at lr 3e-3 (docs/training.md, "Studies"), yet the default stays
# AdamW at 2e-3: Muon refuses FSDP and fp16, and a default must run under every strategy.
RECIPES: dict[str, dict[str, Any]] = {
    "default": dict(max_minutes=2.0, batch_size=16, grad_accum=1, lr=2e-3, schedule="wsd", eval_every=250,
                    save_every=250),
    # The original NanoGPT-MoE TinyStories project's recipe: batch 32 x accumulation 2, AdamW lr 1e-3
    # with OneCycleLR, mixed precision, gradient checkpointing, one padded story per row, evaluation and a
    # checkpoint every epoch, best kept.
    "nanogpt-moe": dict(
        batch_size=32, grad_accum=2, lr=1e-3, schedule="onecycle", weight_decay=0.01, beta2=0.999,
        activation_checkpointing=True, data_mode="documents", eval_every=0, save_every=0, save_epochs=True,
        epochs=6.0, grad_clip=0.0,
    ),
    # Fast smoke runs (tests, CI).
    "debug": dict(max_steps=20, batch_size=4, eval_every=10, eval_batches=4, save_every=10, log_every=5, samples=1,
                  sample_tokens=32, tensorboard=False, plots=False),
}


def resolve_train_config(
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    **explicit: Any,
) -> TrainConfig:
    """Recipe, then the `[train]` section of a config file, then `--set` overrides, then explicit
    command-line flags (`--max-steps` and friends), each on top of the previous."""
    fields: dict[str, Any] = {}
    file_data = load_config_file(config_file) if config_file else {}
    recipe = recipe or file_data.get("recipe")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
        fields.update(RECIPES[recipe])
    fields.update(file_data.get("train", {}))
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    for item in overrides or []:  # --set accepts both model and train fields; keep the train ones
        key = item.split("=", 1)[0].strip()
        if key in train_names:
            fields.update(parse_overrides(TrainConfig, [item]))
        elif key not in model_names:
            raise ConfigError(
                f"--set {key}=...: {key!r} is neither a model nor a training field{closest(key, train_names | model_names)}; "
                f"training fields: {', '.join(sorted(train_names))}"
            )
    fields.update({k: v for k, v in explicit.items() if v is not None})
    later = {k for k, v in fields.items() if recipe is None or k not in RECIPES[recipe] or RECIPES[recipe][k] != v}
    if "max_minutes" not in later and later & {"max_steps", "epochs"}:
        fields["max_minutes"] = 0.0  # a length given after the recipe replaces the recipe's time budget
    return TrainConfig.from_dict(fields)


def split_overrides(overrides: list[str] | None) -> tuple[list[str], list[str]]:
    """Separate `--set key=value` items into (model overrides, train overrides)."""
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    model, train = [], []
    for item in overrides or []:
        (model if item.split("=", 1)[0].strip() in model_names else train).append(item)
    return model, train


__all__ = ["TrainConfig", "RECIPES", "resolve_train_config", "resolve_model_config", "split_overrides"]
