"""Process-group context for data-parallel training (torchrun). Single-process runs use the same
interface with world_size 1, so the trainer has one code path."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks (in place when distributed) and return it."""
        if self.enabled:
            device = tensor.device
            if dist.get_backend() == "nccl" and device.type != "cuda":
                moved = tensor.to(f"cuda:{self.local_rank}")
                dist.all_reduce(moved)
                tensor.copy_(moved.to(device))
            else:
                dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @classmethod
    def from_env(cls, device_type: str = "cpu") -> "DistContext":
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (gloo on CPU,
        nccl on GPU). Without those variables: a single process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_available():
            raise ConfigError("torch.distributed is not available in this PyTorch build; run a single process")
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl" and not dist.is_nccl_available():
            raise ConfigError("the nccl backend is missing from this PyTorch build; use --device cpu (gloo)")
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Wrapping the model for data parallelism, applied from outside the model


def parallelize(model: torch.nn.Module, train_config, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """The module the training loop calls: the model itself, or its DDP wrapper."""
    strategy = train_config.strategy
    if strategy == "single" or not ctx.enabled:
        if strategy != "single" and not ctx.enabled:
            raise ConfigError(
                f"--strategy {strategy} needs several processes: launch with "
                f"torchrun --nproc_per_node=N -m nanomoe train ... --strategy {strategy}"
            )
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    raise ConfigError(f"--strategy {strategy} is not supported yet; use --strategy ddp")


def no_sync(model: torch.nn.Module, enabled: bool):
    """Skip DDP's gradient all-reduce on non-final accumulation micro-steps."""
    import contextlib

    if enabled and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def save_sharded_checkpoint_if_needed(trainer, name: str, pointers: dict) -> bool:
    """FSDP checkpoints are written by every rank (torch.distributed.checkpoint); others use the
    single-file path. Returns True when this function handled the save."""
    return False


def load_sharded_checkpoint_if_needed(trainer, ckpt_dir) -> bool:
    return False
