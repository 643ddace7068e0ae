"""The training loop: AdamW, lr schedule, gradient accumulation and clipping, mixed precision,
honest evaluation, atomic checkpoints with exact resume, logging, and a clean stop on signals.

The loop never waits for the GPU between logging intervals: a step's numbers (loss, aux loss,
gradient norm, expert loads, whether the step was applied) stay on the device as a `StepResult`
and are read together, one sync, at log, evaluation and checkpoint steps (`read_steps`). A step
with a non-finite loss or gradient norm is skipped on the device (the fused AdamW kernel's
`found_inf`), and the skips are counted when the flags are read.

Data parallelism plugs in through `DistContext` (rank-aware logging and saving, per-rank seeds,
sharded data, reduced metrics; nanomoe/runtime.py) and `nanomoe.parallelize` (activation
checkpointing, FSDP2 / DDP wrappers, torch.compile, applied from outside the model).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..data import BatchLoader, check_compatible, load_tokenizer, read_meta
from ..errors import CheckpointError, ConfigError, NanoMoEError
from ..evaluation import bytes_per_token, evaluate
from ..generation import generate
from ..mfu import mfu, peak_flops
from ..model import IGNORE_INDEX
from ..parallelize import build_model, no_sync, parallelize
from ..params import flops_per_token
from ..runtime import (
    DistContext,
    autocast_context,
    check_precision,
    configure_device,
    describe_device,
    full_value,
    host_reads_are_free,
    is_fsdp,
    micro_batch_size,
    resolve_device,
    synchronize,
)
from . import checkpoint as ckpt
from .budget import TimeBudget, format_duration
from .config import TrainConfig
from .logger import MetricsLogger
from .optimizers import adamw_param_groups, build_optimizer, load_optimizer_state
from .schedule import lr_and_beta1

log = logging.getLogger("nanomoe.train")


class TrainingError(NanoMoEError):
    """Training cannot continue (e.g. the loss kept diverging)."""


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups over all of `model`'s trainable parameters (training/optimizers.py)."""
    unique = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    return adamw_param_groups(unique, weight_decay)


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    bad_steps: int = 0
    elapsed_seconds: float = 0.0
    last_eval: dict[str, Any] = field(default_factory=dict)


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits.
    A second Ctrl-C interrupts immediately, except while that final checkpoint is being written
    (`saving`): then further signals wait for the save, and the user is told so once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self.saving = False
        self._told_waiting = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.saving:
            if not self._told_waiting:
                self._told_waiting = True
                log.warning("%s received while the final checkpoint is being written: waiting for it to finish",
                            signal.Signals(signum).name)
            return
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at the end of this step, then stopping "
                    "(Ctrl-C again to abort without saving)", self.signal_name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def clip_grad_norm(parameters, max_norm: float, *, optimizer: torch.optim.Optimizer | None = None,
                   read_norm: bool | None = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (same result, bit for bit), without reading the norm on the host
    where that would stall a GPU, and without the no-op multiply where reading it is free.

    torch multiplies every gradient by min(1, max_norm / (norm + 1e-6)) unconditionally, to spare
    the GPU a sync. Where the norm lives on the CPU (`read_norm`, the default there) reading it costs
    nothing, so the multiply, a pass over all gradients (4x the dense twin's for an MoE), runs only
    when it changes something; on a GPU it always runs, as torch's does (`host_reads_are_free`).
    With `optimizer` (a fused torch optimizer) the gradients are not touched at all: the factor goes
    to the optimizer as `grad_scale` (the protocol GradScaler uses), by which its fused kernel
    divides each gradient as it reads it (leaving the clipped gradient behind, as torch's clipping
    would); on a GPU that factor is clamped to exactly 1 when nothing is clipped, which changes no
    bit. The caller steps and then
    calls `clear_grad_scale`.
    max_norm <= 0: no clipping, just the norm. Returns the total norm as a plain tensor (gathered
    once from its shards under FSDP).
    """
    if optimizer is not None:
        clear_grad_scale(optimizer)  # a factor left by an interrupted step must not scale this one
    params = [p for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # a DTensor under FSDP
    norm = full_value(total_norm)
    if max_norm <= 0:
        return norm
    if read_norm is None:
        read_norm = host_reads_are_free(norm.device)
    if read_norm and torch.isfinite(norm) and norm + 1e-6 <= max_norm:
        return norm  # nothing to clip
    if optimizer is not None:
        # a non-finite norm too: the trainer then skips the step (found_inf) and drops the gradients
        optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0).to(torch.float32).reshape(())
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
    return norm


def clear_grad_scale(optimizer: torch.optim.Optimizer) -> None:
    """Undo clip_grad_norm's `grad_scale` (and the trainer's `found_inf`) after the step."""
    for name in ("grad_scale", "found_inf"):
        if hasattr(optimizer, name):
            delattr(optimizer, name)


def count_targets(y: torch.Tensor) -> int:
    """Real (non-padding) targets of a host batch, counted with numpy: no torch op, so nothing a
    sync counter could mistake for reading a device value."""
    return int(np.count_nonzero(y.numpy() != IGNORE_INDEX))


@dataclass
class StepResult:
    """One optimizer step's numbers, left where they were computed so that the step is queued on
    the GPU without waiting for it. `read()` (or `read_steps` for several, one copy) fetches them."""

    lr: float
    tokens: int  # real targets of the step over all ranks (counted on the host)
    values: torch.Tensor  # float64, on the device: applied, loss sum, aux sum, grad norm, load cvs, load shares
    n_micro_batches: int
    world_size: int
    n_moe_layers: int

    def read(self) -> dict[str, Any] | None:
        """The step's metrics as Python numbers, or None when the step was skipped (non-finite)."""
        return self.metrics(self.values.tolist())

    def metrics(self, values: list[float]) -> dict[str, Any] | None:
        applied, loss_sum, aux_sum, grad_norm, *loads = values
        if not applied:
            return None
        metrics = {
            "loss": loss_sum / max(self.tokens, 1.0),
            "aux_loss": aux_sum / (self.n_micro_batches * self.world_size),
            "lr": self.lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens,
        }
        if self.n_moe_layers:
            cvs, shares = loads[:self.n_moe_layers], loads[self.n_moe_layers:]
            n_experts = len(shares) // self.n_moe_layers
            metrics["load_cv"] = sum(cvs) / len(cvs)
            metrics["expert_load"] = [shares[i:i + n_experts] for i in range(0, len(shares), n_experts)]
        return metrics


def read_steps(steps: list[StepResult]) -> list[dict[str, Any] | None]:
    """`StepResult.read()` for each of `steps`, fetched from the device in one copy (one sync)."""
    if not steps:
        return []
    flat = torch.cat([s.values for s in steps]).tolist()
    out, start = [], 0
    for s in steps:
        end = start + s.values.numel()
        out.append(s.metrics(flat[start:end]))
        start = end
    return out


class Trainer:
    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        run_dir: str | Path,
        data_dir: str | Path,
        *,
        resume_from: str | Path | None = None,
        dist=None,
        reset_missing_state: bool = False,
    ) -> None:
        self.cfg = train_config
        self.reset_missing_state = reset_missing_state
        self.dist = dist or DistContext()
        self.run_dir = Path(run_dir)
        self.data_dir = Path(data_dir)
        self.device = resolve_device(train_config.device, self.dist.local_rank)
        configure_device(self.device)
        if train_config.threads:
            torch.set_num_threads(train_config.threads)
        check_precision(train_config.precision, self.device)

        # --- data: check that the model fits it before spending any time ---
        self.data_meta = read_meta(self.data_dir)
        data_vocab = int(self.data_meta["vocab_size"])
        if model_config.vocab_size < data_vocab:
            raise ConfigError(
                f"the model's vocab_size ({model_config.vocab_size}) is smaller than the tokenizer's "
                f"({data_vocab}) of {self.data_dir}: set --set vocab_size={data_vocab} (or leave it unset to "
                "use the data's)"
            )
        self.seq_len = train_config.seq_len or model_config.block_size
        if self.seq_len > model_config.block_size:
            raise ConfigError(
                f"seq_len {self.seq_len} exceeds the model's block_size {model_config.block_size}: lower "
                f"--set seq_len or raise --set block_size"
            )
        self.tokenizer = load_tokenizer(self.data_dir / "tokenizer.json")
        if resume_from is not None:
            train_config = self.cfg = _keep_global_batch(train_config, resume_from, self.dist.world_size)
        self.batch_size = micro_batch_size(train_config, self.dist.world_size)  # per process and micro-step
        self.train_loader = BatchLoader(
            self.data_dir, "train", self.batch_size, self.seq_len, mode=train_config.data_mode,
            seed=train_config.seed, rank=self.dist.rank, world_size=self.dist.world_size,
        )
        self.val_loader = BatchLoader(
            self.data_dir, "val", self.batch_size, self.seq_len, mode=train_config.data_mode,
            seed=train_config.seed, rank=self.dist.rank, world_size=self.dist.world_size,
        )
        self.val_bytes_per_token = bytes_per_token(self.data_meta, "val")

        # --- length of the run ---
        self.sequences_per_step = self.batch_size * train_config.grad_accum * self.dist.world_size
        self.steps_per_epoch = max(1, self._samples_per_epoch() // self.sequences_per_step)
        self.budget = None
        if train_config.max_minutes:  # the step count is decided in the first steps (budget.py)
            world = self.dist.world_size
            self.budget = TimeBudget(train_config.max_minutes * 60,
                                     reduce_mean=lambda t: self.dist.all_reduce_sum(t) / world)
            self.total_steps = self.budget.total_steps
        elif train_config.max_steps:
            self.total_steps = train_config.max_steps
        elif train_config.epochs:
            self.total_steps = max(1, round(train_config.epochs * self.steps_per_epoch))
        else:
            raise ConfigError("the run has no length: pass --max-steps N or --set epochs=N")

        # --- model and optimizer ---
        self.model_config = model_config
        # built on the meta device, sharded under FSDP, then initialized from train_config.seed:
        # identical initial weights on every rank and for every strategy
        self.model = build_model(model_config, train_config, self.dist, self.device)
        self.kernels = self.model.kernels.name  # the backend config.kernels chose for this device

        # DDP's wrapper (FSDP already sharded the model in place; build_model compiled its blocks)
        self.train_model = parallelize(self.model, train_config, self.dist, self.device)
        self.optimizer = build_optimizer(self.model, train_config)
        self.scaler = torch.amp.GradScaler("cuda", enabled=train_config.precision == "fp16")
        # clipping inside the fused AdamW step (one pass over the gradients fewer) and skipping a
        # non-finite step there (its kernel's found_inf: no sync); not with a GradScaler (which owns
        # both) nor with FSDP's sharded DTensor parameters; Muon has neither
        self._skip_on_device = (not self.scaler.is_enabled() and not is_fsdp(self.model)
                                and isinstance(self.optimizer, torch.optim.AdamW))
        self.autocast = lambda: autocast_context(train_config.precision, self.device)
        self.flops_per_token = flops_per_token(model_config, self.seq_len)["train"]
        self.state = TrainState()
        self._written: set[str] = set()  # checkpoint names saved by this process
        # per-rank RNG stream for dropout and noisy gating
        torch.manual_seed(train_config.seed + 1_000_003 * self.dist.rank)

        if resume_from is not None:
            self._resume(Path(resume_from))
        self.logger = MetricsLogger(self.run_dir, enabled=self.dist.is_main, tensorboard=train_config.tensorboard)
        if resume_from is not None:
            self.logger.truncate_after(self.state.step)

    def _samples_per_epoch(self) -> int:
        """Training sequences in one pass over the train split: windows of seq_len tokens when
        packed, one per document in document mode."""
        split = self.data_meta["splits"]["train"]
        if self.cfg.data_mode == "documents":
            return int(split["documents"])
        return int(split["tokens"]) // self.seq_len

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "step": s.step,
            "tokens_seen": s.tokens_seen,
            "epoch": s.step / self.steps_per_epoch,
            "best_val_loss": s.best_val_loss if math.isfinite(s.best_val_loss) else None,
            "best_step": s.best_step,
            "bad_steps": s.bad_steps,
            "elapsed_seconds": s.elapsed_seconds,
            "total_steps": self.total_steps,
            "world_size": self.dist.world_size,
            "kernels": self.kernels,
            "loader": self.train_loader.state_dict(),
            "last_eval": s.last_eval,
            "data_dir": str(self.data_dir.resolve()),  # absolute: resume works from any directory
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "budget": self.budget.state_dict() if self.budget is not None else None,
        }

    def save(self, *, best: bool = False, name: str | None = None, keep: bool = False) -> Path | None:
        """Save the current state as `latest` (and `best`); prune old periodic checkpoints."""
        # never reuse a checkpoint this run did not write (e.g. a later step of an abandoned branch)
        name = ckpt.unique_checkpoint_name(self.run_dir, name or ckpt.checkpoint_name(self.state.step), self._written)
        self._written.add(name)
        pointers = {"latest": {}}
        if best:
            pointers["best"] = {"val_loss": self.state.best_val_loss}
        # every rank's stream (dropout, noisy gating), so a resume at the same world size is exact
        rng_state = ckpt.combine_rank_rng_states(self.dist.gather_to_main(ckpt.capture_rng_state()))
        if is_fsdp(self.model):  # every rank writes its shards
            return ckpt.save_sharded_checkpoint(
                self.run_dir, name, model=self.model, optimizer=self.optimizer, ctx=self.dist,
                model_config=self.model_config, trainer_state=self._trainer_state(), rng_state=rng_state,
                train_config=self.cfg.to_dict(), tokenizer_json=self.tokenizer.to_json_str(),
                data_meta=self.data_meta, pointers=pointers, keep_last=self.cfg.keep_last, keep=keep,
            )
        if not self.dist.is_main:
            return None
        path = ckpt.save_checkpoint(
            self.run_dir,
            name,
            model_state=self.model.state_dict(),
            model_config=self.model_config,
            trainer_state=self._trainer_state(),
            optimizer_state=self.optimizer.state_dict(),
            rng_state=rng_state,
            train_config=self.cfg.to_dict(),
            tokenizer_json=self.tokenizer.to_json_str(),
            data_meta=self.data_meta,
            pointers=pointers,
        )
        ckpt.prune_checkpoints(self.run_dir, self.cfg.keep_last, keep_names={name} if keep else set())
        return path

    def _resume(self, path: Path) -> None:
        ckpt_dir = ckpt.resolve_checkpoint(path, prefer="latest")
        saved_cfg = ckpt.read_model_config(ckpt_dir)
        if saved_cfg.replace(kernels=self.model_config.kernels) != self.model_config:  # kernels may change
            raise ConfigError(
                f"checkpoint {ckpt_dir} was trained with a different model config; resume without changing "
                "model fields (the saved one is in model_config.json)"
            )
        state = ckpt.read_json(ckpt_dir / "trainer_state.json")
        if (ckpt_dir / "tokenizer.json").is_file():  # the data must be encoded as the weights expect
            check_compatible(self.data_dir, tokenizer=load_tokenizer(ckpt_dir / "tokenizer.json"))
        if not ckpt.load_sharded_checkpoint_if_needed(self.model, self.optimizer, ckpt_dir, self.dist):
            ckpt.load_model_weights(self.model, ckpt_dir)
            optimizer_state = ckpt.load_optimizer_state(ckpt_dir)
            if optimizer_state is not None:
                load_optimizer_state(self.optimizer, optimizer_state, ckpt_dir)
            else:
                self._missing_state(ckpt_dir, "optimizer.pt", "AdamW's moments")
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        restored = False
        if state.get("world_size", 1) == self.dist.world_size:
            rng_state = ckpt.load_rng_state(ckpt_dir)
            if rng_state is None:
                self._missing_state(ckpt_dir, "rng.pt", "the random number streams")
            restored = ckpt.restore_rng_state(rng_state, rank=self.dist.rank)
        if not restored:  # another world size (or an old checkpoint): fresh, distinct streams per rank
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.dist.rank + state["step"])
        self.train_loader.load_state_dict(state["loader"])
        best = state.get("best_val_loss")
        self.state = TrainState(
            step=state["step"],
            tokens_seen=state.get("tokens_seen", 0),
            best_val_loss=best if best is not None else math.inf,
            best_step=state.get("best_step", -1),
            bad_steps=state.get("bad_steps", 0),
            elapsed_seconds=state.get("elapsed_seconds", 0.0),
            last_eval=state.get("last_eval", {}),
        )
        if self.budget is not None:
            self.budget.load_state_dict(state.get("budget"), self.state.step, self.state.elapsed_seconds)
            self.total_steps = self.budget.total_steps
        log.info("resumed from %s at step %d", ckpt_dir, self.state.step)

    def _missing_state(self, ckpt_dir: Path, name: str, what: str) -> None:
        if not self.reset_missing_state:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} has no {name}: resuming would restart {what} and not continue the run "
                "exactly. Pass --reset-missing-state to resume anyway with fresh state"
            )
        log.warning("checkpoint %s has no %s: starting %s afresh (--reset-missing-state)", ckpt_dir, name, what)

    # ------------------------------------------------------------------------------------------
    # one optimizer step

    def _set_lr(self) -> float:
        step, total = (self.state.step, self.total_steps) if self.budget is None else \
            self.budget.schedule_position(self.state.step)  # a budget's schedule starts when it is decided
        lr, beta1 = lr_and_beta1(self.cfg, step, total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon's groups may have their own peak lr
            if "betas" in group:
                group["betas"] = (beta1, group["betas"][1])
        return lr

    def train_step(self) -> StepResult:
        """Forward/backward over grad_accum micro-batches and one AdamW step, queued without waiting
        for the device. The step is skipped (parameters, optimizer state and router biases left as
        they were) when the loss or the gradient norm is not finite; `StepResult.read()` says which."""
        lr = self._set_lr()
        micro_batches = [self.train_loader.next_batch() for _ in range(self.cfg.grad_accum)]
        # Normalize by the real (non-padding) targets of the whole step on all ranks, so every token
        # weighs the same however padding is spread over micro-batches and ranks.
        n_total = n_targets = sum(count_targets(y) for _, y in micro_batches)
        if self.dist.enabled:
            n_total = self.dist.all_reduce_sum(torch.tensor([n_targets], dtype=torch.float64)).item()
        scale = self.dist.world_size / max(n_total, 1.0)  # DDP/FSDP average gradients over ranks

        # accumulated on the device: reading them here would wait for every micro-batch's kernels
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        routing_loads: list[torch.Tensor] | None = None
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = i == len(micro_batches) - 1
            with no_sync(self.train_model, enabled=not last):
                with self.autocast():
                    out = self.train_model(x, y)
                loss = out.loss * (out.n_loss_tokens * scale) + out.aux_loss / len(micro_batches)
                finite &= torch.isfinite(loss.detach())
                self.scaler.scale(loss).backward()
            loss_sum += out.loss.detach().double() * out.n_loss_tokens
            aux_sum += out.aux_loss.detach().double()
            loads = [s.tokens_per_expert.detach().double() for s in out.moe]
            routing_loads = loads if routing_loads is None else [a + b for a, b in zip(routing_loads, loads)]

        if self.dist.enabled:  # every rank must skip or apply the same step: a vote, on the device
            finite = self.dist.all_reduce_sum((~finite).to(torch.float32).reshape(1))[0] == 0
        grad_norm, applied = self._clip_and_step(finite)
        self.optimizer.zero_grad(set_to_none=True)
        if routing_loads and self.model_config.router_bias_update_rate > 0:
            # a skipped step's loads are zeroed: all experts equally loaded, so no bias moves
            routing_loads = [self.dist.all_reduce_sum(load) * applied for load in routing_loads]
            self.model.update_router_biases(routing_loads)

        totals = self.dist.all_reduce_sum(torch.stack([loss_sum, aux_sum]))
        routing_loads = routing_loads or []
        cvs = [load.std(unbiased=False) / load.mean() for load in routing_loads]
        shares = [load / load.sum() for load in routing_loads]
        head = torch.stack([applied, totals[0], totals[1], grad_norm.detach().double().reshape(())])
        return StepResult(lr=lr, tokens=int(n_total), values=torch.cat([head, *[c.reshape(1) for c in cvs], *shares]),
                          n_micro_batches=len(micro_batches), world_size=self.dist.world_size,
                          n_moe_layers=len(routing_loads))

    def _clip_and_step(self, finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip the gradients and step the optimizer, unless the loss (`finite`, a device bool) or the
        gradient norm is not finite. Returns the gradient norm and whether the update was applied
        (1.0 or 0.0, float64, on the device)."""
        if self._skip_on_device:
            grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.grad_clip, optimizer=self.optimizer)
            finite = finite & torch.isfinite(grad_norm)
            self.optimizer.found_inf = (~finite).to(torch.float32)  # the fused kernel then changes nothing
            try:
                self.optimizer.step()
            finally:
                clear_grad_scale(self.optimizer)
            return grad_norm, finite.to(torch.float64)
        # Muon, FSDP's sharded AdamW and GradScaler have no skip on the device: read the flags (syncs)
        grad_norm = torch.full((), math.nan, device=self.device)
        applied = bool(finite)
        if applied:
            self.scaler.unscale_(self.optimizer)
            grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.grad_clip)
            # the scaler skips steps with non-finite gradients itself (and lowers its scale)
            applied = bool(torch.isfinite(grad_norm)) or self.scaler.is_enabled()
        if applied:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return grad_norm, torch.tensor(float(applied), dtype=torch.float64, device=self.device)

    # ------------------------------------------------------------------------------------------
    # evaluation

    def evaluate(self, whole_split: bool = False) -> dict[str, Any]:
        max_batches = None if whole_split else self.cfg.eval_batches or None
        result = evaluate(
            self.train_model,
            self.val_loader.eval_batches(self.batch_size, max_batches=max_batches),
            device=self.device,
            autocast=self.autocast(),
            bytes_per_token=self.val_bytes_per_token,
            all_reduce_sum=self.dist.all_reduce_sum if self.dist.enabled else None,
        )
        return result

    # ------------------------------------------------------------------------------------------
    # the loop

    def _length(self) -> str:
        """The run's length for people: its steps, or its time budget until that buys a step count."""
        if self.budget is not None and self.budget.decision is None:
            return f"a {format_duration(self.budget.budget_seconds)} budget of training steps"
        return f"{self.total_steps} steps"

    def fit(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train to total_steps (or pause at `stop_at_step`, saving a checkpoint as a signal would)."""
        cfg, state = self.cfg, self.state
        peak = None  # MFU's denominator; other ranks log nothing
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_incomplete(self.run_dir)
            print(f"nanomoe train: {self.model_config.n_layer}-layer {'MoE' if self.model_config.is_moe else 'dense'} "
                  f"model on {describe_device(self.device)}, kernels={self.kernels} (asked: {self.model_config.kernels}), "
                  f"{self._length()} -> {self.run_dir}", flush=True)
            peak = peak_flops(self.device)  # published for known GPUs, else measured once per machine
            log.info("MFU is against %s", peak.describe())
            self.logger.write_config(self.model_config, cfg, self.data_dir, self.data_meta,
                                     self.total_steps if self.budget is None or self.budget.decision else None, peak,
                                     kernels=self.kernels)
        if state.step >= self.total_steps and self.dist.is_main:
            log.warning("the run is already at step %d of %d: nothing to train; pass a larger --max-steps to "
                        "continue it", state.step, self.total_steps)
        undecided = self.budget is not None and self.budget.decision is None
        progress = self.logger.progress(None if undecided else self.total_steps, state.step,
                                        enabled=cfg.progress and self.dist.is_main, peak=peak)
        eval_every = cfg.eval_every or self.steps_per_epoch
        window = {"loss": 0.0, "tokens": 0, "steps": 0, "t0": time.perf_counter()}
        pending: list[StepResult] = []  # steps whose numbers are still on the device
        paused = False
        with StopRequest() as stop:
            while state.step < self.total_steps:
                requested = stop.requested
                if self.dist.enabled:  # a signal reaches ranks at different steps: stop together or hang
                    requested = bool(self.dist.all_reduce_sum(torch.tensor([float(requested)])).item())
                if requested or (stop_at_step is not None and state.step >= stop_at_step):
                    paused = True
                    break
                measuring = self.budget is not None and self.budget.decision is None
                t0 = time.perf_counter()
                pending.append(self.train_step())
                state.step += 1
                if measuring or self._reads_at(state.step, eval_every):
                    synchronize(self.device)  # the queued work belongs to this step's time
                step_seconds = time.perf_counter() - t0
                state.elapsed_seconds += step_seconds
                if measuring:
                    self.total_steps = self.budget.observe(state.step, step_seconds, state.elapsed_seconds)
                    if self.budget.decision is not None:
                        progress.set_total(self.total_steps)
                        log.info("time budget: %d steps at %.3f s/step", self.total_steps,
                                 self.budget.decision.seconds_per_step)
                progress.update(1)
                if not self._reads_at(state.step, eval_every):
                    continue
                metrics = self._read_pending(pending, window)
                if metrics is None:  # this step was skipped: nothing to log, evaluate or save
                    continue

                if state.step % cfg.log_every == 0 or state.step == self.total_steps:
                    seconds = time.perf_counter() - window["t0"]
                    tokens_per_s = window["tokens"] / seconds if seconds > 0 else 0.0
                    row = {
                        **metrics,
                        "loss": window["loss"] / window["steps"],
                        "tokens_per_s": tokens_per_s,
                        "mfu": mfu(self.model_config, self.seq_len, tokens_per_s, peak) if peak else None,
                        "epoch": state.step / self.steps_per_epoch,
                        "tokens_seen": state.tokens_seen,
                    }
                    self.logger.log_train(state.step, row)
                    progress.set_postfix(row)
                    window = {"loss": 0.0, "tokens": 0, "steps": 0, "t0": time.perf_counter()}

                is_epoch_end = state.step % self.steps_per_epoch == 0
                if state.step % eval_every == 0 or state.step == self.total_steps:
                    self._eval_and_save(progress)
                elif cfg.save_every and state.step % cfg.save_every == 0:
                    self.save()
                if cfg.save_epochs and is_epoch_end:
                    self.save(name=f"epoch-{state.step // self.steps_per_epoch:04d}", keep=True)
                    self.save()
            progress.close()
            self._read_pending(pending, window)  # a pause mid-interval: the checkpoint needs the counts
            if paused:  # still under the handlers: a second signal must not cut this save short
                stop.saving = True
                self.save()
                stop.saving = False

        if paused:
            log.warning("stopped by %s at step %d; resume with --resume %s", stop.signal_name or "request",
                        state.step, self.run_dir)
        elif state.last_eval.get("step") != state.step:
            self._eval_and_save(None)
        result = {"step": state.step, "stopped": paused, "run_dir": str(self.run_dir),
                  "best_val_loss": state.best_val_loss, "last_eval": state.last_eval,
                  "tokens_seen": state.tokens_seen, "elapsed_seconds": state.elapsed_seconds}
        if self.budget is not None:
            result["budget"] = self.budget.state_dict()
            result["budget_summary"] = self.budget.summary(state.step, state.tokens_seen, state.elapsed_seconds)
        if self.dist.is_main:
            self.logger.finish(make_plots=self.cfg.plots)
        return result

    def _reads_at(self, step: int, eval_every: int) -> bool:
        """Whether the loop reads the pending steps' numbers after `step`: to log, or before an
        evaluation or a checkpoint (which saves the counts they update)."""
        cfg = self.cfg
        return (step % cfg.log_every == 0 or step == self.total_steps or step % eval_every == 0
                or bool(cfg.save_every and step % cfg.save_every == 0)
                or bool(cfg.save_epochs and step % self.steps_per_epoch == 0))

    def _read_pending(self, pending: list[StepResult], window: dict[str, Any]) -> dict[str, Any] | None:
        """Read the pending steps' numbers (one sync), in step order: warn about each skipped step and
        stop after max_bad_steps in a row, as if each had been read when it ran; add the applied
        ones to the logging window. Returns the last step's metrics (None: it was skipped)."""
        state = self.state
        metrics = None
        first = state.step - len(pending) + 1
        results = read_steps(pending)
        pending.clear()
        for step, metrics in enumerate(results, start=first):
            if metrics is None:
                state.bad_steps += 1
                log.warning("step %d: non-finite loss or gradients, step skipped (%d in a row)", step, state.bad_steps)
                if state.bad_steps >= self.cfg.max_bad_steps:
                    raise TrainingError(self._divergence_message())
                continue
            state.bad_steps = 0
            state.tokens_seen += metrics["tokens"]
            window["loss"] += metrics["loss"]
            window["tokens"] += metrics["tokens"]
            window["steps"] += 1
        return metrics

    def _divergence_message(self) -> str:
        cfg = self.cfg
        advice = [f"lower the learning rate (--set lr={cfg.lr / 3:.2g})"]
        if not cfg.grad_clip:
            advice.append("turn gradient clipping on (--set grad_clip=1.0)")
        if cfg.precision != "fp32":
            advice.append("try --set precision=fp32")
        if (self.run_dir / "latest.json").is_file():
            where = f"The last good checkpoint is in {self.run_dir} (--resume it with the new settings)."
        else:
            where = "No checkpoint was saved before it diverged: start a new run."
        advice_text = "; ".join(advice)
        return (f"{self.state.bad_steps} steps in a row had a non-finite loss or gradient norm; training diverged. "
                f"{advice_text[0].upper()}{advice_text[1:]}. {where}")

    def _eval_and_save(self, progress) -> None:
        state = self.state
        result = self.evaluate()
        result["step"] = state.step
        state.last_eval = {k: v for k, v in result.items() if k != "moe"}
        improved = result["loss"] < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_step = result["loss"], state.step
        self.logger.log_eval(state.step, result)
        if progress is not None and self.dist.is_main:
            progress.write(self.logger.format_eval(state.step, result))
        self.save(best=improved)

    def sample(self, n: int | None = None, max_new_tokens: int | None = None, prompt: str | None = None,
               seed: int = 0) -> list[str]:
        """A few stories from the current model (temperature 0.8, top-k 50), as text."""
        n = self.cfg.samples if n is None else n
        if n <= 0:
            return []
        model = self.model
        if is_fsdp(model):  # every rank helps gather the weights; rank 0 samples from a plain copy
            model = ckpt.unsharded_copy(model, self.model_config, self.dist, self.device)
        if not self.dist.is_main:
            return []
        prompt = self.cfg.sample_prompt if prompt is None else prompt
        ids = self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eot_id]
        idx = torch.tensor([ids] * n, device=self.device)
        # eager even when the blocks are compiled for training: decoding's shapes change every token
        with self.autocast(), torch.compiler.set_stance("force_eager"):
            out = generate(model, idx, max_new_tokens or self.cfg.sample_tokens, temperature=0.8, top_k=50,
                                 stop_id=self.tokenizer.eot_id, seed=seed)
        stories = []
        for row in out.tolist():
            new = row[len(ids):]
            if self.tokenizer.eot_id in new:
                new = new[: new.index(self.tokenizer.eot_id)]
            stories.append((prompt + self.tokenizer.decode(new)).strip())
        return stories


def _keep_global_batch(train_config: TrainConfig, resume_from, world_size: int) -> TrainConfig:
    """Resuming on a different number of processes keeps the run's global batch (so the data stream
    continues exactly) unless global_batch_size was set: per-process batches are resized."""
    if train_config.global_batch_size:
        return train_config
    try:
        state = ckpt.read_json(ckpt.resolve_checkpoint(resume_from, prefer="latest") / "trainer_state.json")
    except NanoMoEError:
        return train_config  # _resume reports the problem
    saved_world = int(state.get("world_size", 1))
    loader_batch = (state.get("loader") or {}).get("global_batch_size")
    if saved_world == world_size or not loader_batch:
        return train_config
    global_batch = int(loader_batch) * train_config.grad_accum
    log.info("resuming a run saved on %d process(es) on %d: keeping its global batch of %d sequences per step",
             saved_world, world_size, global_batch)
    return train_config.replace(global_batch_size=global_batch)
