"""Checkpoints: everything needed to resume exactly or to generate, written atomically.

Layout of a run directory:

    RUN/
      checkpoints/step-00000500/     one directory per checkpoint:
          model.safetensors            weights (and persistent buffers such as router biases)
          sharded/                     instead of the two files around this line under FSDP: weights and
                                       AdamW state written by every rank with torch.distributed.checkpoint
                                       (nanomoe/distributed.py; `nanomoe checkpoint consolidate` adds
                                       model.safetensors)
          optimizer.pt                 AdamW state: tensors and numbers only (torch.load(weights_only=True))
          rng.pt                       torch RNG states (tensors only)
          trainer_state.json           step, tokens seen, data-loader position, best val loss, ...
          model_config.json            ModelConfig
          train_config.json            TrainConfig
          tokenizer.json               the tokenizer the data was encoded with
          data_meta.json               meta.json of the data dir (bytes per token, ...)
      latest.json, best.json         pointers: {"checkpoint": "checkpoints/step-00000500", ...}

A checkpoint directory is written under a temporary name, flushed to disk, then renamed; pointers
are replaced with os.replace. A crash (even kill -9) at any moment leaves the previous pointer and
the directory it names intact. Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic_io import fsync_dir, fsync_file, temporary_dir, write_json_atomic
from ..config import ModelConfig
from ..errors import CheckpointError

CHECKPOINT_FORMAT = 1
REQUIRED_FILES = ("model.safetensors", "model_config.json", "trainer_state.json")
SHARDED_DIR = "sharded"  # DCP weights + optimizer state of FSDP runs, in place of model.safetensors


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    run_dir: str | Path,
    name: str,
    *,
    model_state: dict[str, torch.Tensor],
    model_config: ModelConfig,
    trainer_state: dict[str, Any],
    optimizer_state: dict | None = None,
    rng_state: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    tokenizer_json: str | None = None,
    data_meta: dict[str, Any] | None = None,
    pointers: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint `RUN/checkpoints/<name>` atomically, then update the pointer files.

    `pointers` maps a pointer name ("latest", "best") to extra fields stored in it. If a complete
    checkpoint of that name already exists (same step saved twice), only the pointers are updated.
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    final = root / name
    tmp = temporary_dir(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not is_complete(final):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            tensors = {k: v.detach().contiguous().cpu() for k, v in untie_for_save(model_state, model_config).items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "nanomoe": str(CHECKPOINT_FORMAT)})
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
            write_checkpoint_files(tmp, model_config=model_config, trainer_state=trainer_state, rng_state=rng_state,
                                   train_config=train_config, tokenizer_json=tokenizer_json, data_meta=data_meta)
            publish_checkpoint(tmp, final)
        update_pointers(run_dir, final, pointers, trainer_state.get("step"))
    except Exception as e:  # OSError, and torch's / safetensors' own errors on a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        out_of_space = getattr(e, "errno", None) == errno.ENOSPC or _disk_is_full(root)
        reason = "no space left on device" if out_of_space else f"{type(e).__name__}: {e}"
        previous = ", ".join(f"{p}.json" for p in ("latest", "best") if (run_dir / f"{p}.json").exists())
        raise CheckpointError(
            f"could not write checkpoint {final}: {reason}. "
            + (f"The previous checkpoints ({previous}) are intact. " if previous else "")
            + "Free some space or pass another --out."
        ) from e
    return final


def _disk_is_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < 1024 * 1024
    except OSError:
        return False


def untie_for_save(state: dict[str, torch.Tensor], model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """Drop the LM head when it is the token embedding (safetensors refuses shared tensors);
    `retie_after_load` puts it back."""
    if model_config.tie_embeddings:
        return {k: v for k, v in state.items() if k != "lm_head.weight"}
    return state


def retie_after_load(state: dict[str, torch.Tensor], model_config: ModelConfig) -> dict[str, torch.Tensor]:
    if model_config.tie_embeddings and "lm_head.weight" not in state and "tok_emb.weight" in state:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def unique_checkpoint_name(run_dir: str | Path, name: str, written: set[str]) -> str:
    """`name`, unless a checkpoint of that name exists that this process did not write (a run
    resumed from an earlier step into a directory holding a later, abandoned branch): then
    `name-2`, `name-3`, ... so the old checkpoint is neither reused nor overwritten."""
    root = Path(run_dir) / "checkpoints"
    if name in written or not (root / name).exists():
        return name
    k = 2
    while (root / f"{name}-{k}").exists() and f"{name}-{k}" not in written:
        k += 1
    return f"{name}-{k}"


def write_checkpoint_files(
    directory: Path,
    *,
    model_config: ModelConfig,
    trainer_state: dict[str, Any],
    rng_state: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    tokenizer_json: str | None = None,
    data_meta: dict[str, Any] | None = None,
) -> None:
    """Everything but the weights and optimizer state; trainer_state.json last, as it marks a
    complete checkpoint."""
    tmp = Path(directory)
    if rng_state is not None:
        torch.save(rng_state, tmp / "rng.pt")
    (tmp / "model_config.json").write_text(model_config.to_json() + "\n")
    if train_config is not None:
        (tmp / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")
    if tokenizer_json is not None:
        (tmp / "tokenizer.json").write_text(tokenizer_json)
    if data_meta is not None:
        (tmp / "data_meta.json").write_text(json.dumps(data_meta, indent=2) + "\n")
    state = {"format": CHECKPOINT_FORMAT, "saved_at": time.time(), **trainer_state}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def publish_checkpoint(tmp: Path, final: Path) -> None:
    """Flush a fully written temporary checkpoint directory to disk and rename it to `final`."""
    for f in Path(tmp).rglob("*"):
        if f.is_file():
            fsync_file(f)
    for d in [p for p in Path(tmp).rglob("*") if p.is_dir()] + [Path(tmp)]:
        fsync_dir(d)
    if final.exists():  # an incomplete leftover of a crashed save: nothing points to it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def update_pointers(run_dir: Path, final: Path, pointers: dict[str, dict[str, Any]] | None, step: int | None) -> None:
    """Point latest.json / best.json (os.replace, atomic) at checkpoint `final`."""
    for pointer, extra in (pointers or {}).items():
        write_json_atomic(
            Path(run_dir) / f"{pointer}.json",
            {"checkpoint": str(final.relative_to(run_dir)), "step": step, **extra},
        )


def is_complete(ckpt_dir: Path) -> bool:
    d = Path(ckpt_dir)
    if (d / SHARDED_DIR / ".metadata").is_file():  # FSDP: weights in sharded/ instead of model.safetensors
        return all((d / f).is_file() for f in REQUIRED_FILES if f != "model.safetensors")
    return all((d / f).is_file() for f in REQUIRED_FILES)


def clean_incomplete(run_dir: str | Path) -> None:
    """Remove temporary directories left by a save that was killed."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".tmp-") and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)


def pointed(run_dir: str | Path, pointer: str) -> Path | None:
    path = Path(run_dir) / f"{pointer}.json"
    if not path.is_file():
        return None
    return Path(run_dir) / read_json(path)["checkpoint"]


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep_names: set[str] = frozenset()) -> None:
    """Delete periodic checkpoints beyond the newest `keep_last`, never one a pointer names."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    protected = set(keep_names)
    for pointer in ("latest", "best"):
        target = pointed(run_dir, pointer)
        if target is not None:
            protected.add(target.name)
    periodic = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-"))
    for d in periodic[: max(0, len(periodic) - keep_last)]:
        if d.name not in protected:
            shutil.rmtree(d, ignore_errors=True)


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint directory from a run dir (via best.json / latest.json) or a checkpoint dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if is_complete(path):
        return path
    order = [prefer, "latest" if prefer == "best" else "best"]
    for pointer in order:
        target = pointed(path, pointer)
        if target is not None:
            if not is_complete(target):
                raise CheckpointError(f"{path}/{pointer}.json names {target}, which is incomplete or missing")
            return target
    raise CheckpointError(
        f"{path} is neither a checkpoint (no {', '.join(REQUIRED_FILES)}) nor a run directory "
        "(no best.json or latest.json); pass the --out of a training run or one of its checkpoints/step-* dirs"
    )


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode) and what came with it."""

    path: Path
    model: torch.nn.Module
    model_config: ModelConfig
    tokenizer: Any | None
    train_config: dict[str, Any] | None
    trainer_state: dict[str, Any]
    data_meta: dict[str, Any] | None

    @property
    def step(self) -> int:
        return int(self.trainer_state.get("step", 0))


def read_model_config(ckpt_dir: Path) -> ModelConfig:
    return ModelConfig.from_dict(read_json(Path(ckpt_dir) / "model_config.json"))


def load_model_weights(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Load model.safetensors into `model`, with a clear error if it is a different model."""
    from safetensors.torch import load_file

    if not (Path(ckpt_dir) / "model.safetensors").is_file() and (Path(ckpt_dir) / SHARDED_DIR).is_dir():
        from ..distributed import read_sharded_model_state

        state = read_sharded_model_state(ckpt_dir, model.config)  # an FSDP checkpoint, read in this process
    else:
        state = load_file(str(Path(ckpt_dir) / "model.safetensors"), device="cpu")
    state = retie_after_load(state, model.config)
    check_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, ckpt_dir)
    model.load_state_dict(state, strict=True)


def check_weights(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], ckpt_dir: Path) -> None:
    """Raise CheckpointError naming what differs when `state` does not fit shapes `expected`."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(expected[k]) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if mismatched:
            k = mismatched[0]
            details.append(f"shape of {k} is {tuple(state[k].shape)}, the model expects {tuple(expected[k])}")
        raise CheckpointError(
            f"checkpoint {ckpt_dir} holds a different model ({'; '.join(details)}); "
            "use the model config saved with the checkpoint (model_config.json)"
        )


def load_checkpoint(path: str | Path, prefer: str = "best", device: str | torch.device = "cpu") -> Checkpoint:
    """Load a model for evaluation or generation:

        ckpt = nanomoe.load_checkpoint("runs/tiny-moe")   # best.json, else latest.json
        ids = ckpt.tokenizer.encode("Once upon a time")
        out = ckpt.model.generate(torch.tensor([ids]), max_new_tokens=100)
    """
    from ..model import GPT

    ckpt_dir = resolve_checkpoint(path, prefer)
    cfg = read_model_config(ckpt_dir)
    model = GPT(cfg)
    load_model_weights(model, ckpt_dir)
    model.to(device).eval()
    tokenizer = None
    if (ckpt_dir / "tokenizer.json").is_file():
        from ..data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(ckpt_dir / "tokenizer.json")
    train_config = read_json(ckpt_dir / "train_config.json") if (ckpt_dir / "train_config.json").is_file() else None
    data_meta = read_json(ckpt_dir / "data_meta.json") if (ckpt_dir / "data_meta.json").is_file() else None
    return Checkpoint(
        path=ckpt_dir,
        model=model,
        model_config=cfg,
        tokenizer=tokenizer,
        train_config=train_config,
        trainer_state=read_json(ckpt_dir / "trainer_state.json"),
        data_meta=data_meta,
    )


def load_optimizer_state(ckpt_dir: Path) -> dict | None:
    path = Path(ckpt_dir) / "optimizer.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def load_rng_state(ckpt_dir: Path) -> dict | None:
    path = Path(ckpt_dir) / "rng.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, and CUDA when present)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def combine_rank_rng_states(per_rank: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """rng.pt content: rank 0's states at the top level (what a single process restores) and
    every rank's under "ranks"."""
    if not per_rank:
        return None
    return {**per_rank[0], "ranks": per_rank}


def restore_rng_state(state: dict[str, Any] | None, rank: int = 0) -> bool:
    """Restore `rank`'s saved RNG states; False when the checkpoint holds none for that rank."""
    if not state:
        return False
    if "ranks" in state:
        if rank >= len(state["ranks"]):
            return False
        state = state["ranks"][rank]
    elif rank != 0:  # checkpoints before per-rank states held rank 0's only
        return False
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True
