"""Parallelisms applied to the model from outside, torchtitan-style: activation checkpointing,
torch.compile per block, FSDP2 (`fully_shard` per block) and DDP. The model code knows none of them.

- `build_model`: every strategy builds the model on the meta device, applies activation
  checkpointing, compiles each block (when asked), shards it (FSDP), then materializes it, only
  this rank's shards under FSDP, and initializes it. The initial weights are bit-identical for
  single, DDP and FSDP at any world size.
- `parallelize`: the module the training loop calls: DDP's wrapper (FSDP's `fully_shard` already
  changed the model in place).
- `no_sync`: DDP's gradient sync skipped on non-final accumulation micro-steps.

Sharded (DCP) checkpoints live with the other checkpoint code in training/checkpoint.py.
"""

from __future__ import annotations

import contextlib

import torch

from . import kernels
from .errors import ConfigError
from .model import GPT
from .runtime import DistContext, is_fsdp


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's forward is wrapped per instance, so parameter names and checkpoints are unchanged.
    The RNG state is replayed during recomputation, so dropout and noisy gating match.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def compile_blocks(model: GPT) -> None:
    """torch.compile each transformer block, in place (`nn.Module.compile`: parameter names and
    checkpoints are unchanged), as torchtitan does: every block has the same code, so one compiled
    graph serves them all, a graph break (the MoE dispatch while it reads counts on the host) stays
    inside its block, and FSDP's per-block all-gathers run between compiled regions. Applied after
    activation checkpointing (compiled through it) and before `fully_shard`. Embeddings, head and
    loss stay eager."""
    for block in model.blocks:
        block.compile()


def build_model(model_config, train_config, ctx: DistContext, device: torch.device):
    """The GPT the trainer optimizes, on `device`, with activation checkpointing and per-block
    torch.compile if asked.

    Under FSDP it is built on the meta device (no memory), sharded with `fully_shard` per block and
    at the root, and only then materialized, so each rank allocates its own shards only (how a 3B
    model starts on GPUs that could not hold it whole). Every strategy then initializes it with the
    CPU RNG seeded by train_config.seed, module by module: single, DDP and FSDP at any world size
    start from the same weights.
    """
    # the kernels for the device it trains on (built on the CPU or the meta device, then moved)
    model_config = model_config.replace(kernels=kernels.resolve(model_config.kernels, device))
    sharded = train_config.strategy == "fsdp" and ctx.enabled
    if sharded:
        with torch.device("meta"):
            model = GPT(model_config)
    else:
        model = GPT(model_config)  # every process holds it whole anyway (and meta costs ~1 s on first use)
    if train_config.activation_checkpointing:
        apply_activation_checkpointing(model)
    if train_config.compile:
        compile_blocks(model)
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
    single-process build gets from the same seed, while only one part of the model (a block, the
    embeddings, the head) exists in full (on the CPU) at any time.

    init_weights initializes the parts in a fixed order from the CPU RNG, each inside
    `materialize(part)`: here that swaps the part's sharded parameters for full-size CPU tensors and
    afterwards keeps this rank's shard of them. (DTensor's own random init would not do: on CPU it
    fills every rank's shard with the same numbers.)
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    @contextlib.contextmanager
    def materialize(part: torch.nn.Module):
        sharded = [(module, k, p) for module in part.modules() for k, p in module._parameters.items()
                   if isinstance(p, DTensor)]
        full = [torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype)) for _, _, p in sharded]
        for (module, k, _), f in zip(sharded, full):
            module._parameters[k] = f
        try:
            yield
        finally:
            for (module, k, p), f in zip(sharded, full):
                p.copy_(distribute_tensor(f.data, p.device_mesh, p.placements, src_data_rank=None))
                module._parameters[k] = p

    model.init_weights(materialize)


# ---------------------------------------------------------------------------------------------
# Wrapping for data parallelism, and the pieces of a training step that differ per strategy


def parallelize(model: torch.nn.Module, train_config, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """The module the training loop calls: the model itself (single, FSDP) or its DDP wrapper
    (build_model already compiled its blocks when train_config.compile is set)."""
    return _data_parallel(model, train_config, ctx, device)


def _data_parallel(model: torch.nn.Module, train_config, ctx: DistContext, device: torch.device) -> torch.nn.Module:
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
            raise ConfigError("--strategy fsdp: build the model with nanomoe.parallelize.build_model")
        return model
    raise ConfigError(f"unknown --strategy {strategy!r}; use single, ddp or fsdp")


def no_sync(model: torch.nn.Module, enabled: bool):
    """Skip DDP's gradient all-reduce on non-final accumulation micro-steps.

    FSDP reduce-scatters every micro-step: skipping would keep full unsharded gradients on every
    rank, the memory FSDP exists to save."""
    if enabled and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


__all__ = ["apply_activation_checkpointing", "build_model", "compile_blocks", "init_sharded_weights", "no_sync", "parallelize",
           "shard_model"]
