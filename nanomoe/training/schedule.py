"""Learning-rate schedules as pure functions of the step.

No scheduler object holds state: the lr of step k depends only on (config, k, total steps), so
resuming at step k reproduces the schedule exactly and nothing needs unpickling.
"""

from __future__ import annotations

import math

from .config import TrainConfig

ONECYCLE_DIV_FACTOR = 25.0  # initial lr = max lr / 25 (torch.optim.lr_scheduler.OneCycleLR defaults)
ONECYCLE_FINAL_DIV_FACTOR = 1e4  # final lr = initial lr / 1e4
ONECYCLE_MOMENTUM = (0.85, 0.95)  # beta1 cycles between these, opposite to the lr


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, round(0.05 * total_steps))


def lr_and_beta1(cfg: TrainConfig, step: int, total_steps: int) -> tuple[float, float]:
    """Learning rate and AdamW beta1 for optimizer step `step` (0-based) of `total_steps`."""
    if cfg.schedule == "constant":
        return cfg.lr, cfg.beta1
    if cfg.schedule == "cosine":
        warmup = warmup_steps(cfg, total_steps)
        if step < warmup:
            return cfg.lr * (step + 1) / warmup, cfg.beta1
        pct = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return _cos_anneal(cfg.lr, cfg.lr * cfg.min_lr_ratio, pct), cfg.beta1
    if cfg.schedule == "wsd":
        # warmup-stable-decay (Hu et al. 2024, MiniCPM; Hagele et al. 2024): the peak lr until the
        # last decay_frac of the run, then linear to lr * min_lr_ratio at the last step
        warmup = warmup_steps(cfg, total_steps)
        if step < warmup:
            return cfg.lr * (step + 1) / warmup, cfg.beta1
        decay_steps = max(1, round(cfg.decay_frac * total_steps))
        decay_start = max(warmup, total_steps - decay_steps)
        if step < decay_start:
            return cfg.lr, cfg.beta1
        pct = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return cfg.lr + (cfg.lr * cfg.min_lr_ratio - cfg.lr) * pct, cfg.beta1

    # One-cycle policy (Smith & Topin 2018) with cosine annealing, two phases: warm up from
    # lr/25 to lr over pct_start of the run while beta1 falls from 0.95 to 0.85, then anneal to
    # lr/25/1e4 while beta1 rises back.
    initial = cfg.lr / ONECYCLE_DIV_FACTOR
    final = initial / ONECYCLE_FINAL_DIV_FACTOR
    low_m, high_m = ONECYCLE_MOMENTUM
    peak_step = float(cfg.pct_start * total_steps) - 1
    last_step = total_steps - 1
    if step <= peak_step:
        pct = step / peak_step if peak_step > 0 else 1.0
        return _cos_anneal(initial, cfg.lr, pct), _cos_anneal(high_m, low_m, pct)
    pct = (step - peak_step) / (last_step - peak_step) if last_step > peak_step else 1.0
    return _cos_anneal(cfg.lr, final, min(pct, 1.0)), _cos_anneal(low_m, high_m, min(pct, 1.0))
