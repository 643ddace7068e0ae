"""What a process runs on: its device, its mixed-precision context and its process group.

The layer every other one builds on (the model excepted): `parallelize.py` and the checkpoint code
take a `DistContext`, the trainer gets its device and autocast context here, evaluation too.

- `resolve_device`: "auto" / "cpu" / "cuda[:i]" to a torch.device, with a clear error when absent
  (naming the fix when a GPU is there but torch is the CPU build: `cpu_torch_on_a_gpu_machine`).
- `configure_device`: process-wide settings for it (TF32 matrix products on CUDA); `describe_device`
  names it for the first line `nanomoe train` prints; `synchronize` waits for its queued work.
- `autocast_context`: bf16/fp16 autocast for matrix products; fp32 elsewhere.
- `DistContext`: rank / world size from torchrun's environment; single-process runs use the same
  interface with world_size 1, so the trainer has one code path.
- `exit_worker`: how a process that took part in a process group ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import ConfigError

CUDA_INSTALL_COMMAND = "bash scripts/setup.sh --cuda"
NVIDIA_DEVICE_FILE = Path("/dev/nvidia0")  # the driver's first GPU


def cpu_torch_on_a_gpu_machine() -> bool:
    """An NVIDIA GPU is visible (its driver's nvidia-smi or /dev/nvidia0) but this torch is the CPU
    build, so `--device auto` would train on the CPU without the user knowing why."""
    if torch.version.cuda is not None:
        return False
    return shutil.which("nvidia-smi") is not None or NVIDIA_DEVICE_FILE.exists()


def cpu_torch_message() -> str:
    return (f"an NVIDIA GPU is visible but torch {torch.__version__} is the CPU build; install the CUDA build "
            f"with: {CUDA_INSTALL_COMMAND}")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        if cpu_torch_on_a_gpu_machine():
            raise ConfigError(f"--device {name}: {cpu_torch_message()} (or use --device cpu)")
        raise ConfigError(f"--device {name} was requested but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 trains with a CUDA gradient scaler; anywhere else it is refused with what to use."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision fp16 needs a GPU (it relies on a CUDA gradient scaler) and this run is on "
                          f"the {device.type}: use --set precision=bf16 (or fp32)")


def configure_device(device: torch.device) -> None:
    """Process-wide settings for training on `device`. On CUDA, fp32 matrix products run on TF32
    tensor cores (10-bit mantissa inputs, fp32 accumulation): several times faster, and finer than
    the bf16 autocast most runs use anyway. CPU numerics are left exactly as they are."""
    if device.type == "cuda":
        # the legacy global API: setting torch.backends.cuda.matmul.fp32_precision instead makes
        # torch.get_float32_matmul_precision(), which inductor calls, raise
        torch.set_float32_matmul_precision("high")


def describe_device(device: torch.device) -> str:
    """'cuda:0 (NVIDIA H100 80GB HBM3)', or 'cpu (8 threads)'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a value of a tensor on `device` on the host (`.item()`, `bool()`) costs nothing:
    on the CPU every op has finished when it returns; on a GPU a read waits for all queued work."""
    return device.type == "cpu"


def synchronize(device: torch.device) -> None:
    """Wait until `device` has finished the work queued so far (a no-op on the CPU, where every op
    has finished when it returns). Timing a step on a GPU needs it; reading a value implies it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast for matrix products; fp32 math elsewhere (norms, softmax, loss, router)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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

    def rank0_says(self, flag: bool) -> bool:
        """Rank 0's value of `flag` on every rank (so all ranks take the same branch)."""
        if not self.enabled:
            return flag
        votes = torch.tensor([float(flag) if self.is_main else 0.0], dtype=torch.float64)
        return bool(self.all_reduce_sum(votes).item())

    def gather_to_main(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others (small objects only)."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @classmethod
    def from_env(cls, device_type: str = "cpu") -> DistContext:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (gloo on CPU,
        nccl on GPU). Without those variables: a single process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_available():
            raise ConfigError("torch.distributed is not available in this PyTorch build; run a single process")
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl" and not dist.is_nccl_available():
            raise ConfigError("the nccl backend is missing from this PyTorch build; use --device cpu (gloo), "
                              "or install a CUDA build of PyTorch")
        if backend == "gloo" and not dist.is_gloo_available():
            raise ConfigError("the gloo backend is missing from this PyTorch build, so CPU processes cannot "
                              "talk to each other; train on GPUs (nccl) or run a single process")
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not: launch with "
                              "torchrun --nproc_per_node=N -m nanomoe train ...")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)  # before any collective: nccl binds a communicator to it
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend=backend)
            except (RuntimeError, ValueError) as e:
                raise ConfigError(
                    f"could not join the process group ({backend}, world size {world_size}): {e}. Check "
                    "--master_addr/--master_port (reachable from every node, port free) and --nnodes"
                ) from None
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            # all ranks leave together: gloo can abort a process that tears down its connections
            # while a peer is still finishing ("terminate called without an active exception")
            with contextlib.suppress(RuntimeError):
                dist.barrier()
            dist.destroy_process_group()
            global _LEFT_A_PROCESS_GROUP
            _LEFT_A_PROCESS_GROUP = True


# Set once a worker has left its process group. Objects that still hold the group (DDP's reducer,
# FSDP state) are otherwise torn down during interpreter finalization, where gloo's C++ threads can
# abort the process ("terminate called without an active exception", SIGABRT) after all work is done
# and saved; `exit_worker` skips that teardown.
_LEFT_A_PROCESS_GROUP = False


def exit_worker(code: int):
    """sys.exit(code), except for a process that took part in a process group: flush what it
    wrote, then end it at once (os._exit) instead of letting finalization destroy gloo's state."""
    if not _LEFT_A_PROCESS_GROUP:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def micro_batch_size(train_config, world_size: int) -> int:
    """Sequences per micro-batch on each process. `global_batch_size` (sequences per optimizer step
    over all processes) wins when set, so a run keeps its batch on any number of processes."""
    global_batch = getattr(train_config, "global_batch_size", 0)
    if not global_batch:
        return train_config.batch_size
    per_step = train_config.grad_accum * world_size
    if global_batch % per_step:
        options = sorted({g * per_step for g in (global_batch // per_step, global_batch // per_step + 1) if g > 0})
        raise ConfigError(
            f"global_batch_size {global_batch} is not divisible by grad_accum ({train_config.grad_accum}) x "
            f"world size ({world_size}) = {per_step}: use --set global_batch_size="
            f"{' or '.join(map(str, options))}, or change grad_accum / --nproc_per_node"
        )
    return global_batch // per_step


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether `model` was sharded with FSDP2's `fully_shard` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly distributed one (clip_grad_norm_ returns a DTensor under FSDP)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


__all__ = ["CUDA_INSTALL_COMMAND", "DistContext", "autocast_context", "check_precision", "configure_device", "cpu_torch_message",
           "cpu_torch_on_a_gpu_machine", "describe_device", "exit_worker", "full_value", "host_reads_are_free", "is_fsdp",
           "micro_batch_size", "resolve_device", "synchronize"]
