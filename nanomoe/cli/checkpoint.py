"""`nanomoe checkpoint ...`: operations on saved checkpoints."""

from __future__ import annotations

from . import add_command


def cmd_checkpoint(args) -> int:
    """Work with saved checkpoints: `nanomoe checkpoint consolidate RUN` (sharded FSDP checkpoint ->
    model.safetensors), `nanomoe checkpoint verify RUN` (sizes and sha256 against each manifest)."""
    args.checkpoint_parser.print_help()
    return 2


def cmd_consolidate(args) -> int:
    """Turn a sharded checkpoint (written by every rank of an FSDP run) into one model.safetensors,
    so generation, evaluation and export read it like any other checkpoint. Runs in one process, on
    the CPU, with no process group; it needs RAM for the whole model (fp32: 4 bytes per parameter).

    Without --out, model.safetensors is added to the checkpoint directory itself (resume still uses
    the shards, which also hold the optimizer state). With --out, a new directory gets the weights,
    configs, tokenizer and trainer state.

    Examples:
      nanomoe checkpoint consolidate runs/moe-3b                  # its best (else latest) checkpoint
      nanomoe checkpoint consolidate runs/moe-3b/checkpoints/step-00020000 --out moe-3b-final --dtype bf16
      nanomoe generate --checkpoint moe-3b-final --prompt "Once upon a time"
    """
    import torch

    from ..errors import CheckpointError
    from ..training import checkpoint as ckpt
    from ..training.checkpoint import consolidate_checkpoint

    ckpt_dir = ckpt.resolve_checkpoint(args.path, prefer=args.prefer)
    if not (ckpt_dir / ckpt.SHARDED_DIR).is_dir():
        if args.out is None:
            print(f"{ckpt_dir} is not sharded: its model.safetensors is already what generation reads")
            return 0
        raise CheckpointError(f"{ckpt_dir} is not sharded (it has model.safetensors); copy the directory instead")
    if args.out is None and (ckpt_dir / "model.safetensors").is_file() and not args.force:
        print(f"{ckpt_dir} already has model.safetensors (pass --force to write it again)")
        return 0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    written = consolidate_checkpoint(ckpt_dir, args.out, dtype=dtype)
    size = (written / "model.safetensors").stat().st_size
    print(f"wrote {written / 'model.safetensors'} ({size / 1024**2:.1f} MiB, {args.dtype}); "
          f"sample with: nanomoe generate --checkpoint {written}")
    return 0


def cmd_verify(args) -> int:
    """Check every checkpoint of a run (or one checkpoint directory) against its manifest: each file's
    size and sha256. Prints one line per checkpoint; exits 1 if any is damaged, naming the files and
    the newest checkpoint that verifies.

    Examples:
      nanomoe checkpoint verify runs/tiny-moe
      nanomoe checkpoint verify runs/tiny-moe/checkpoints/step-00000500
    """
    from pathlib import Path

    from ..errors import CheckpointError
    from ..training import checkpoint as ckpt

    path = Path(args.path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass a run dir or a checkpoints/step-* dir")
    if ckpt.is_complete(path):
        dirs, run_dir = [path], path.parent.parent
    else:
        run_dir = path
        root = path / "checkpoints"
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []
        if not dirs:
            raise CheckpointError(f"{path} holds no checkpoints (no {root}/step-*); pass the --out of a training run")
    damaged = 0
    for d in dirs:
        if not ckpt.is_complete(d):
            found = [f"incomplete (one of {', '.join(ckpt.REQUIRED_FILES)} is missing)"]
        else:
            try:
                found = ckpt.checkpoint_problems(d, hashes=True)
            except CheckpointError as e:
                found = [str(e)]
        unverified = "" if found or ckpt.manifest.has_manifest(d) else " (written before manifests: not verified)"
        print(f"{d}: {'DAMAGED: ' + '; '.join(found) if found else 'ok'}{unverified}")
        damaged += bool(found)
    if damaged:
        good = ckpt.newest_verified(run_dir, hashes=True)
        offer = f" The newest checkpoint that verifies is {good}." if good else " No checkpoint of the run verifies."
        raise CheckpointError(f"{damaged} of {len(dirs)} checkpoint(s) damaged.{offer}")
    return 0


def register(subparsers) -> None:
    parser = add_command(subparsers, "checkpoint", cmd_checkpoint)
    parser.set_defaults(checkpoint_parser=parser)
    sub = parser.add_subparsers(dest="checkpoint_command", metavar="COMMAND")
    p = add_command(sub, "consolidate", cmd_consolidate)
    p.add_argument("path", help="run dir (its best.json, else latest.json) or a checkpoints/step-* dir")
    p.add_argument("--out", help="write a new checkpoint directory here instead of adding to the checkpoint")
    p.add_argument("--prefer", choices=["best", "latest"], default="best",
                   help="which checkpoint of a run dir (default best)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="stored weight precision (bf16 halves the file; loading casts back to fp32)")
    p.add_argument("--force", action="store_true", help="rewrite model.safetensors if it is already there")
    p = add_command(sub, "verify", cmd_verify)
    p.add_argument("path", help="run dir (all its checkpoints) or a checkpoints/step-* dir")
