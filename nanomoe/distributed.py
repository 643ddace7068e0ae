"""Scale-out on PyTorch's own engine: process groups (torchrun), DDP, FSDP2 (`fully_shard`) and
sharded checkpoints (`torch.distributed.checkpoint`, DCP). Applied from outside the model.

- `DistContext`: rank / world size from torchrun's environment; single-process runs use the same
  interface with world_size 1, so the trainer has one code path.
- `build_model`: every strategy builds the model on the meta device, applies activation
  checkpointing, shards it (FSDP), then materializes it, only this rank's shards under FSDP, and
  initializes it. The initial weights are bit-identical for single, DDP and FSDP at any world size.
- `parallelize`: wraps for DDP (FSDP's `fully_shard` already changed the model in place).
- Checkpoints: FSDP runs write `RUN/checkpoints/<name>/sharded/` with DCP (every rank writes its
  shards; resumable at any world size) beside the usual JSON files; `consolidate_checkpoint` turns
  one into model.safetensors for generation.
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

from .atomic_io import replace_durably, temporary_dir, temporary_path
from .errors import CheckpointError, ConfigError

log = logging.getLogger("nanomoe.distributed")


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


# ---------------------------------------------------------------------------------------------
# Building the model: meta device -> (shard) -> materialize -> identical init for every strategy


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def build_model(model_config, train_config, ctx: DistContext, device: torch.device):
    """The GPT the trainer optimizes, on `device`, with activation checkpointing if asked.

    Under FSDP it is built on the meta device (no memory), sharded with `fully_shard` per block and
    at the root, and only then materialized, so each rank allocates its own shards only (how a 3B
    model starts on GPUs that could not hold it whole). Every strategy then initializes it with the
    CPU RNG seeded by train_config.seed, module by module: single, DDP and FSDP at any world size
    start from the same weights.
    """
    from .model import GPT
    from .training.trainer import apply_activation_checkpointing

    sharded = train_config.strategy == "fsdp" and ctx.enabled
    if sharded:
        with torch.device("meta"):
            model = GPT(model_config)
    else:
        model = GPT(model_config)  # every process holds it whole anyway (and meta costs ~1 s on first use)
    if train_config.activation_checkpointing:
        apply_activation_checkpointing(model)
    if sharded:
        shard_model(model, ctx, train_config.precision, device)
        model.to_empty(device=device)  # allocates the local shards only
        torch.manual_seed(train_config.seed)
        init_sharded_weights(model)
    else:
        torch.manual_seed(train_config.seed)  # init_weights overwrites every parameter: same numbers as FSDP's
        model.init_weights()
        model.to(device)
    return model


def shard_model(model, ctx: DistContext, precision: str, device: torch.device) -> None:
    """FSDP2: one unit per transformer block (its parameters are all-gathered just before its forward
    and again before its backward, and freed after), the root unit holds embeddings, final norm and
    head. Gradients are reduce-scattered in fp32; with bf16/fp16 training, parameters are gathered in
    that dtype (half the traffic of fp32), while optimizer state and master weights stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (ctx.world_size,))
    param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        # the last block's parameters are needed again at once by the backward pass: keep them
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@torch.no_grad()
def init_sharded_weights(model) -> None:
    """`model.init_weights()` for a sharded model: every parameter gets exactly the values a full
    single-process build gets from the same seed, while at most one module's parameters exist in full
    (on the CPU) at any time.

    init_weights visits `model.named_modules()` in order, drawing each module's parameters from the
    CPU RNG. It is handed a walk that swaps the visited module's sharded parameters for full-size
    CPU tensors and, when init_weights moves on, keeps this rank's shard of them. (DTensor's own
    random init would not do: on CPU it fills every rank's shard with the same numbers.)
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    visit_in_order = model.named_modules
    visited = []

    def materializing_walk():
        for name, module in visit_in_order():
            visited.append(name)
            sharded = {k: p for k, p in module._parameters.items() if isinstance(p, DTensor)}
            full = {k: torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype)) for k, p in sharded.items()}
            module._parameters.update(full)
            try:
                yield name, module
            finally:
                for k, p in sharded.items():
                    local = distribute_tensor(full[k].data, p.device_mesh, p.placements, src_data_rank=None)
                    p.copy_(local)
                    module._parameters[k] = p

    model.named_modules = materializing_walk
    try:
        model.init_weights()
    finally:
        del model.named_modules
    if not visited:  # the shards would hold uninitialized memory
        raise RuntimeError("GPT.init_weights no longer walks self.named_modules(); update init_sharded_weights")


# ---------------------------------------------------------------------------------------------
# Wrapping for data parallelism, and the pieces of a training step that differ per strategy


def parallelize(model: torch.nn.Module, train_config, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """The module the training loop calls: the model itself (single, FSDP) or its DDP wrapper."""
    strategy = train_config.strategy
    if not ctx.enabled:
        if strategy != "single":
            raise ConfigError(
                f"--strategy {strategy} needs several processes: launch with "
                f"torchrun --nproc_per_node=N -m nanomoe train ... --strategy {strategy} "
                "(or pass --strategy single to train in this one process)"
            )
        return model
    if strategy == "single":
        raise ConfigError(
            f"this is process {ctx.rank} of {ctx.world_size} (torchrun) but --strategy is single, so every "
            "process would train its own model; pass --strategy ddp or --strategy fsdp"
        )
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        if not is_fsdp(model):
            raise ConfigError("--strategy fsdp: build the model with nanomoe.distributed.build_model")
        return model
    raise ConfigError(f"unknown --strategy {strategy!r}; use single, ddp or fsdp")


def no_sync(model: torch.nn.Module, enabled: bool):
    """Skip DDP's gradient all-reduce on non-final accumulation micro-steps.

    FSDP reduce-scatters every micro-step: skipping would keep full unsharded gradients on every
    rank, the memory FSDP exists to save."""
    if enabled and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly distributed one (clip_grad_norm_ returns a DTensor under FSDP)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def unsharded_copy(model, model_config, ctx: DistContext, device: torch.device):
    """A plain GPT with the full weights of FSDP `model`, on rank 0 (None on the others). Every rank
    must call it (the weights are gathered). For sampling: the decoder calls blocks' submodules
    directly, which FSDP's per-block hooks would not see. Needs the full fp32 model on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .model import GPT, rope_cache

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    with torch.device("meta"):
        copy = GPT(model_config)
    state = _ckpt().retie_after_load(state, model_config)
    copy.load_state_dict(state, assign=True)  # adopt the gathered tensors, no second allocation
    if model_config.tie_embeddings:
        copy.lm_head.weight = copy.tok_emb.weight
    if model_config.position == "rope":  # derived buffers are not in state dicts
        copy.rope_cos, copy.rope_sin = rope_cache(model_config)
    return copy.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)


def _ckpt():
    from .training import checkpoint

    return checkpoint


def save_sharded_checkpoint_if_needed(trainer, name: str, pointers: dict, keep: bool = False,
                                      rng_state: dict | None = None) -> bool:
    """FSDP: every rank writes its shards of the weights and AdamW state with DCP into
    `RUN/checkpoints/.tmp-<name>-sharded/sharded/`; rank 0 adds the JSON files, renames the
    directory to `<name>` and, after all ranks finished, updates the pointers. Other strategies
    return False: rank 0 writes the single-file checkpoint."""
    if not is_fsdp(trainer.model):
        return False
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ck, ctx = _ckpt(), trainer.dist
    root = trainer.run_dir / "checkpoints"
    final = root / name
    tmp = root / f".tmp-{name}-sharded"  # the same name on every rank (a pid would differ)
    already_saved = ctx.rank0_says(ck.is_complete(final))  # the same step saved twice: pointers only
    ok, reason = True, ""
    if not already_saved:
        if ctx.is_main:
            try:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                ok, reason = False, str(e)
        if not ctx.rank0_says(ok):
            raise CheckpointError(f"could not create {tmp}: {reason or 'see rank 0'}; free space or pass another --out")
        model_state, optimizer_state = get_state_dict(trainer.model, trainer.optimizer)
        try:
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / ck.SHARDED_DIR)
        except (CheckpointException, OSError, RuntimeError, ValueError) as e:  # DCP gathers every rank's failure
            if ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"could not write sharded checkpoint {final}: {e}. The previous checkpoints are intact; "
                "free some space or pass another --out (on several nodes, --out must be a shared filesystem)"
            ) from None
        if ctx.is_main:
            try:
                ck.write_checkpoint_files(
                    tmp, model_config=trainer.model_config, trainer_state=trainer._trainer_state(),
                    rng_state=rng_state, train_config=trainer.cfg.to_dict(),
                    tokenizer_json=trainer.tokenizer.to_json_str(), data_meta=trainer.data_meta,
                )
                ck.publish_checkpoint(tmp, final)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                ok, reason = False, str(e)
    if ctx.is_main and ok:
        try:
            ck.update_pointers(trainer.run_dir, final, pointers, trainer.state.step)
            ck.prune_checkpoints(trainer.run_dir, trainer.cfg.keep_last, keep_names={name} if keep else set())
        except OSError as e:
            ok, reason = False, str(e)
    if not ctx.rank0_says(ok):  # also the barrier: no rank moves on before the rename and pointers
        raise CheckpointError(f"could not write checkpoint {final}: {reason or 'see rank 0'}. The previous "
                              "checkpoints are intact; free some space or pass another --out")
    return True


def load_sharded_checkpoint_if_needed(trainer, ckpt_dir) -> bool:
    """Load weights and AdamW state into the trainer when the single-file path cannot:
    a sharded (DCP) checkpoint into any strategy and world size (DCP reshards), or a single-file
    checkpoint into an FSDP model. Returns False when the single-file path applies."""
    ck = _ckpt()
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / ck.SHARDED_DIR / ".metadata").is_file():
        _load_dcp(trainer.model, trainer.optimizer, ckpt_dir / ck.SHARDED_DIR, trainer.dist)
        return True
    if is_fsdp(trainer.model):
        _load_full_into_sharded(trainer.model, trainer.optimizer, ckpt_dir)
        return True
    return False


def _load_dcp(model, optimizer, sharded_dir: Path, ctx: DistContext) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout this run wants
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _single_process_dcp_is_intended():
            dcp.load(state, checkpoint_id=sharded_dir, no_dist=not ctx.enabled)
    except (CheckpointException, OSError, RuntimeError, ValueError) as e:  # CheckpointException: a BaseException
        raise CheckpointError(
            f"could not read sharded checkpoint {sharded_dir.parent} ({_first_line(e)}); it is incomplete or "
            "holds a different model (see its model_config.json)"
        ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _load_full_into_sharded(model, optimizer, ckpt_dir: Path) -> None:
    """A single-file checkpoint (one process or DDP) into an FSDP model: every rank reads the whole
    file and keeps its shards. optimizer.pt numbers parameters in optimizer order; DCP wants names."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    ck = _ckpt()
    state = ck.retie_after_load(load_file(str(ckpt_dir / "model.safetensors"), device="cpu"), model.config)
    ck.check_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, ckpt_dir)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state, options=options)
    saved = ck.load_optimizer_state(ckpt_dir)
    if saved is None:
        return
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {names[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def read_sharded_model_state(ckpt_dir: str | Path, model_config) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint as CPU tensors, in one process (no process
    group needed; safe to call on one rank of a distributed job). Needs RAM for the whole model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from .model import GPT

    sharded_dir = Path(ckpt_dir) / _ckpt().SHARDED_DIR
    if not (sharded_dir / ".metadata").is_file():
        raise CheckpointError(f"{ckpt_dir} has no sharded weights ({sharded_dir}/.metadata is missing)")
    with torch.device("meta"):
        template = GPT(model_config)
    state = _ckpt().untie_for_save(
        {k: torch.empty(v.shape, dtype=v.dtype) for k, v in template.state_dict().items()}, model_config
    )
    try:
        with _single_process_dcp_is_intended():
            dcp.load({"model": state}, checkpoint_id=sharded_dir, no_dist=True)
    except (CheckpointException, OSError, RuntimeError, ValueError) as e:  # CheckpointException: a BaseException
        raise CheckpointError(
            f"could not read sharded checkpoint {ckpt_dir} ({_first_line(e)}); it is incomplete or holds a "
            "different model than its model_config.json"
        ) from None
    return state


def consolidate_checkpoint(path: str | Path, out: str | Path | None = None, *, prefer: str = "best",
                           dtype: torch.dtype = torch.float32) -> Path:
    """Write the full weights of a sharded checkpoint as model.safetensors, so `load_checkpoint`,
    `nanomoe generate` and the exporters read it like any other.

    Without `out`, model.safetensors is added to the checkpoint directory itself (resume still reads
    the shards, which also hold the optimizer state). With `out`, a new directory gets the weights,
    configs, tokenizer and trainer state: a checkpoint for generation and evaluation (resuming from
    it restarts AdamW's moments). Returns the directory written.
    """
    from safetensors.torch import save_file

    ck = _ckpt()
    ckpt_dir = ck.resolve_checkpoint(path, prefer=prefer)
    model_config = ck.read_model_config(ckpt_dir)
    state = {k: v.to(dtype).contiguous() for k, v in read_sharded_model_state(ckpt_dir, model_config).items()}
    metadata = {"format": "pt", "nanomoe": str(ck.CHECKPOINT_FORMAT), "consolidated_from": str(ckpt_dir)}
    if out is None:
        target = ckpt_dir / "model.safetensors"
        tmp = temporary_path(target)
        try:
            save_file(state, str(tmp), metadata=metadata)
            replace_durably(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"could not write {target}: {e}; free some space or pass --out") from None
        return ckpt_dir
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--out {out} exists and is not empty; choose a new directory")
    tmp = temporary_dir(out)
    try:
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
        for name in ("model_config.json", "train_config.json", "tokenizer.json", "data_meta.json",
                     "trainer_state.json"):  # trainer_state.json last: it marks a complete checkpoint
            if (ckpt_dir / name).is_file():
                shutil.copyfile(ckpt_dir / name, tmp / name)
        ck.publish_checkpoint(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {out}: {e}; free some space or choose another --out") from None
    return out


@contextlib.contextmanager
def _single_process_dcp_is_intended():
    """DCP warns when it reads without a process group; here that is the point."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _first_line(e: BaseException) -> str:
    """The cause in one line; for DCP's CheckpointException, the first failing rank's error."""
    failures = getattr(e, "failures", None)
    if failures:
        rank, (cause, _) = next(iter(failures.items()))
        return f"rank {rank}: {_first_line(cause)}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


__all__ = [
    "DistContext", "build_model", "consolidate_checkpoint", "full_value", "init_sharded_weights", "is_fsdp",
    "load_sharded_checkpoint_if_needed", "micro_batch_size", "no_sync", "parallelize", "read_sharded_model_state",
    "save_sharded_checkpoint_if_needed", "shard_model",
]
