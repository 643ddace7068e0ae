"""Checkpoints: everything needed to resume exactly or to generate, written atomically.

Layout of a run directory:

    RUN/
      checkpoints/step-00000500/     one directory per checkpoint:
          model.safetensors            weights (and persistent buffers such as router biases)
          sharded/                     instead of the two files around this line under FSDP: weights and
                                       AdamW state written by every rank with torch.distributed.checkpoint
                                       (see "Sharded checkpoints" below; `nanomoe checkpoint consolidate` adds
                                       model.safetensors)
          optimizer.pt                 AdamW state: tensors and numbers only (torch.load(weights_only=True))
          rng.pt                       torch RNG states (tensors only)
          trainer_state.json           step, tokens seen, data-loader position, best val loss, ...
          model_config.json            ModelConfig
          train_config.json            TrainConfig
          tokenizer.json               the tokenizer the data was encoded with
          data_meta.json               meta.json of the data dir (bytes per token, ...)
          manifest.json                size and sha256 of every file above, written last (manifest.py)
      latest.json, best.json         pointers: {"checkpoint": "checkpoints/step-00000500", ...}

A checkpoint directory is written under a temporary name, flushed to disk, then renamed; pointers
are replaced with os.replace. A crash (even kill -9) at any moment leaves the previous pointer and
the directory it names intact. Nothing here unpickles arbitrary objects (sharded metadata goes
through nanomoe/safe_dcp.py). Every load checks the manifest's sizes; resume and
`nanomoe checkpoint verify` check its hashes too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import kernels, safe_dcp
from ..atomic_io import (
    fsync_dir,
    fsync_file,
    replace_durably,
    temporary_dir,
    temporary_path,
    usual_permissions,
    write_json_atomic,
)
from ..config import ModelConfig
from ..data.tokenizer import load_tokenizer
from ..errors import CheckpointError, NanoMoEError, looks_out_of_space
from ..model import GPT, rope_cache
from ..runtime import DistContext, is_fsdp
from . import manifest

log = logging.getLogger("nanomoe.checkpoint")

CHECKPOINT_FORMAT = 2  # 2: carries manifest.json
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
        out_of_space = looks_out_of_space(e) or _disk_is_full(root)
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
    """Record the manifest of a fully written temporary checkpoint directory, flush it to disk and
    rename it to `final`."""
    for f in Path(tmp).rglob("*"):
        if f.is_file():
            usual_permissions(f)
    manifest.write_manifest(tmp)
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
    """The checkpoint directory `RUN/<pointer>.json` names; it must lie in RUN/checkpoints/."""
    path = Path(run_dir) / f"{pointer}.json"
    if not path.is_file():
        return None
    data = read_json(path)
    target = data.get("checkpoint") if isinstance(data, dict) else None
    if not isinstance(target, str) or not target:
        raise CheckpointError(f"{path} is damaged (no \"checkpoint\" entry); delete it and pass a checkpoints/step-* "
                              "directory instead")
    root = (Path(run_dir) / "checkpoints").resolve()
    resolved = (Path(run_dir) / target).resolve()
    if resolved.parent != root:
        raise CheckpointError(f"{path} names {target}, which is not a checkpoint of this run "
                              f"(it must be in {Path(run_dir) / 'checkpoints'}); fix or delete the pointer")
    return Path(run_dir) / "checkpoints" / resolved.name


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


def resolve_checkpoint(path: str | Path, prefer: str = "best", *, hashes: bool = False) -> Path:
    """A checkpoint directory from a run dir (via best.json / latest.json) or a checkpoint dir,
    checked against its manifest (sizes; sha256 too with `hashes`)."""
    target = _resolve_unverified(path, prefer)
    verify_checkpoint(target, hashes=hashes)
    return target


def _resolve_unverified(path: str | Path, prefer: str) -> Path:
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
                good = newest_verified(path, hashes=False)
                offer = f"; the newest complete checkpoint is {good}" if good else ""
                raise CheckpointError(f"{path}/{pointer}.json names {target}, which is incomplete or missing{offer}")
            return target
    raise CheckpointError(
        f"{path} is neither a checkpoint (no {', '.join(REQUIRED_FILES)}) nor a run directory "
        "(no best.json or latest.json); pass the --out of a training run or one of its checkpoints/step-* dirs"
    )


def verify_checkpoint(ckpt_dir: Path, *, hashes: bool) -> None:
    """CheckpointError naming the damaged file(s) of `ckpt_dir`, and offering the newest checkpoint
    of the run that verifies."""
    found = checkpoint_problems(ckpt_dir, hashes=hashes)
    if found:
        run_dir = Path(ckpt_dir).parent.parent
        good = newest_verified(run_dir, hashes=hashes, exclude={Path(ckpt_dir).name})
        offer = f" The newest checkpoint that verifies is {good}: pass that instead." if good else ""
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {'; '.join(found[:3])}.{offer}")


def checkpoint_problems(ckpt_dir: Path, *, hashes: bool) -> list[str]:
    """What is wrong with `ckpt_dir` ([] when it verifies)."""
    ckpt_dir = Path(ckpt_dir)
    if not manifest.has_manifest(ckpt_dir):
        state = read_json(ckpt_dir / "trainer_state.json")
        if isinstance(state, dict) and isinstance(state.get("format"), int) and state["format"] >= 2:
            return [f"{manifest.MANIFEST} is missing (checkpoints of this format always carry one)"]
        return []  # written before manifests: nothing to check against
    return manifest.problems(ckpt_dir, hashes=hashes)


def newest_verified(run_dir: str | Path, *, hashes: bool, exclude: set[str] = frozenset()) -> Path | None:
    """The checkpoint of `run_dir` with the highest step that is complete and verifies."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    candidates = []
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(".") and d.name not in exclude and is_complete(d):
            try:
                step = int(read_json(d / "trainer_state.json").get("step", -1))
            except (CheckpointError, AttributeError, TypeError, ValueError):
                continue
            candidates.append((step, d.stat().st_mtime, d))
    for _, _, d in sorted(candidates, reverse=True):
        try:
            if not checkpoint_problems(d, hashes=hashes):
                return d
        except CheckpointError:
            continue
    return None


def resolve_for_resume(path: str | Path) -> Path:
    """The checkpoint to resume from: the run's latest, fully verified (sha256). If it is damaged
    and `path` is a run directory, the newest checkpoint that verifies, saying so."""
    target = _resolve_unverified(path, "latest")
    found = checkpoint_problems(target, hashes=True)
    if not found:
        return target
    if Path(path).resolve() == target.resolve():  # the user named this checkpoint: do not swap it
        verify_checkpoint(target, hashes=True)
    good = newest_verified(path, hashes=True, exclude={target.name})
    if good is None:
        raise CheckpointError(f"checkpoint {target} is damaged ({'; '.join(found[:3])}) and no other checkpoint of "
                              f"{path} verifies; start a new run")
    log.warning("checkpoint %s is damaged (%s); resuming from %s, the newest checkpoint that verifies",
                target, "; ".join(found[:3]), good)
    return good


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
    try:
        return ModelConfig.from_dict(read_json(Path(ckpt_dir) / "model_config.json"))
    except CheckpointError:
        raise
    except NanoMoEError as e:
        raise CheckpointError(f"{Path(ckpt_dir) / 'model_config.json'} is invalid: {e}") from None


def load_model_weights(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Load model.safetensors into `model`, with a clear error if it is a different model."""
    from safetensors.torch import load_file

    if not (Path(ckpt_dir) / "model.safetensors").is_file() and (Path(ckpt_dir) / SHARDED_DIR).is_dir():
        state = read_sharded_model_state(ckpt_dir, model.config)  # an FSDP checkpoint, read in this process
    else:
        state = load_file(str(Path(ckpt_dir) / "model.safetensors"), device="cpu")
    state = retie_after_load(state, model.config)
    check_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, ckpt_dir)
    model.load_state_dict(state, strict=True)


def weight_shapes(ckpt_dir: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every stored weight, read from the file headers only (nothing allocated)."""
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "model.safetensors"
    if not path.is_file() and (ckpt_dir / SHARDED_DIR).is_dir():
        metadata = safe_dcp.read_metadata(ckpt_dir / SHARDED_DIR)
        return {k.removeprefix("model."): tuple(v.size) for k, v in metadata.state_dict_metadata.items()
                if k.startswith("model.") and hasattr(v, "size")}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a truncated or damaged header
        raise CheckpointError(f"cannot read {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); it is "
                              "damaged: use another checkpoint (nanomoe checkpoint verify RUN lists the good ones)") from None


def check_config_fits_weights(ckpt_dir: Path, cfg: ModelConfig) -> None:
    """CheckpointError before any allocation when model_config.json does not describe the stored
    weights (an edited config would otherwise allocate its model first)."""
    with torch.device("meta"):
        template = GPT(cfg)
    expected = {k: tuple(v.shape) for k, v in template.state_dict().items()}
    stored = weight_shapes(ckpt_dir)
    if cfg.tie_embeddings and "lm_head.weight" not in stored and "tok_emb.weight" in stored:
        stored["lm_head.weight"] = stored["tok_emb.weight"]
    check_weights(expected, stored, ckpt_dir)


def check_weights(expected: dict[str, tuple[int, ...]], state: dict, ckpt_dir: Path) -> None:
    """Raise CheckpointError naming what differs when `state` (tensors or shapes) does not fit
    shapes `expected`."""
    state = {k: v if isinstance(v, tuple) else tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(expected[k]) != tuple(state[k]))
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if mismatched:
            k = mismatched[0]
            details.append(f"shape of {k} is {tuple(state[k])}, the model expects {tuple(expected[k])}")
        raise CheckpointError(
            f"checkpoint {ckpt_dir} holds a different model ({'; '.join(details)}); "
            "use the model config saved with the checkpoint (model_config.json)"
        )


def load_checkpoint(path: str | Path, prefer: str = "best", device: str | torch.device = "cpu") -> Checkpoint:
    """Load a model for evaluation or generation:

        ckpt = nanomoe.load_checkpoint("runs/tiny-moe")   # best.json, else latest.json
        ids = ckpt.tokenizer.encode("Once upon a time")
        out = generate(ckpt.model, torch.tensor([ids]), max_new_tokens=100)   # nanomoe.generation
    """
    ckpt_dir = resolve_checkpoint(path, prefer)
    cfg = read_model_config(ckpt_dir)
    check_config_fits_weights(ckpt_dir, cfg)
    model = GPT(cfg.replace(kernels=kernels.resolve(cfg.kernels, device)))  # the kernels for `device`
    load_model_weights(model, ckpt_dir)
    model.to(device).eval()
    tokenizer = None
    if (ckpt_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(ckpt_dir / "tokenizer.json")
    train_config = read_json(ckpt_dir / "train_config.json") if (ckpt_dir / "train_config.json").is_file() else None
    data_meta = read_json(ckpt_dir / "data_meta.json") if (ckpt_dir / "data_meta.json").is_file() else None
    recorded = data_meta.get("tokenizer_sha256") if isinstance(data_meta, dict) else None
    if tokenizer is not None and recorded and tokenizer.sha256 != recorded:
        raise CheckpointError(f"{ckpt_dir / 'tokenizer.json'} is not the tokenizer the weights were trained with "
                              f"(sha256 {tokenizer.sha256[:12]}, data_meta.json records {recorded[:12]}); restore it "
                              "or use another checkpoint")
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
    return _load_tensors(Path(ckpt_dir) / "optimizer.pt")


def load_rng_state(ckpt_dir: Path) -> dict | None:
    return _load_tensors(Path(ckpt_dir) / "rng.pt")


def _load_tensors(path: Path) -> dict | None:
    """A torch.save'd dict of tensors and numbers (never arbitrary objects); None when absent."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, damaged, or holding objects weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path} ({first[:200]}); it is damaged or was not written by nanomoe: "
                              "resume from an earlier checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict; it was not written by nanomoe")
    return state


def load_into_optimizer(optimizer: torch.optim.Optimizer, state: dict, ckpt_dir: Path) -> None:
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{Path(ckpt_dir) / 'optimizer.pt'} belongs to another model ({e}); resume from a "
                              "checkpoint of this run") from None


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
    try:
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"rng.pt does not hold torch RNG states ({type(e).__name__}: {e}); it was not written "
                              "by nanomoe") from None
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints of FSDP runs (torch.distributed.checkpoint, DCP)


def unsharded_copy(model, model_config, ctx: DistContext, device: torch.device):
    """A plain GPT with the full weights of FSDP `model`, on rank 0 (None on the others). Every rank
    must call it (the weights are gathered). For sampling: the decoder calls blocks' submodules
    directly, which FSDP's per-block hooks would not see. Needs the full fp32 model on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    with torch.device("meta"):
        copy = GPT(model_config)
    state = retie_after_load(state, model_config)
    copy.load_state_dict(state, assign=True)  # adopt the gathered tensors, no second allocation
    if model_config.tie_embeddings:
        copy.lm_head.weight = copy.tok_emb.weight
    if model_config.position == "rope":  # derived buffers are not in state dicts
        copy.rope_cos, copy.rope_sin = rope_cache(model_config)
    return copy.to(device).eval()


def save_sharded_checkpoint(
    run_dir: str | Path,
    name: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
    model_config: ModelConfig,
    trainer_state: dict[str, Any],
    rng_state: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    tokenizer_json: str | None = None,
    data_meta: dict[str, Any] | None = None,
    pointers: dict[str, dict[str, Any]] | None = None,
    keep_last: int = 0,
    keep: bool = False,
) -> Path:
    """`save_checkpoint` for an FSDP model, called on every rank: each writes its shards of the
    weights and AdamW state with DCP into `RUN/checkpoints/.tmp-<name>-sharded/sharded/`; rank 0
    adds the JSON files, renames the directory to `<name>` and, after all ranks finished, updates
    the pointers and prunes periodic checkpoints beyond `keep_last` (never `name` when `keep`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    final = root / name
    tmp = root / f".tmp-{name}-sharded"  # the same name on every rank (a pid would differ)
    already_saved = ctx.rank0_says(is_complete(final))  # the same step saved twice: pointers only
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
        model_state, optimizer_state = get_state_dict(model, optimizer)
        try:
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / SHARDED_DIR)
        except (CheckpointException, OSError, RuntimeError, ValueError) as e:  # DCP gathers every rank's failure
            if ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"could not write sharded checkpoint {final}: {e}. The previous checkpoints are intact; "
                "free some space or pass another --out (on several nodes, --out must be a shared filesystem)"
            ) from None
        if ctx.is_main:
            try:
                write_checkpoint_files(
                    tmp, model_config=model_config, trainer_state=trainer_state, rng_state=rng_state,
                    train_config=train_config, tokenizer_json=tokenizer_json, data_meta=data_meta,
                )
                publish_checkpoint(tmp, final)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                ok, reason = False, str(e)
    if ctx.is_main and ok:
        try:
            update_pointers(run_dir, final, pointers, trainer_state.get("step"))
            prune_checkpoints(run_dir, keep_last, keep_names={name} if keep else set())
        except OSError as e:
            ok, reason = False, str(e)
    if not ctx.rank0_says(ok):  # also the barrier: no rank moves on before the rename and pointers
        raise CheckpointError(f"could not write checkpoint {final}: {reason or 'see rank 0'}. The previous "
                              "checkpoints are intact; free some space or pass another --out")
    return final


def load_sharded_checkpoint_if_needed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir,
                                      ctx: DistContext) -> bool:
    """Load weights and AdamW state when the single-file path cannot: a sharded (DCP) checkpoint
    into any strategy and world size (DCP reshards), or a single-file checkpoint into an FSDP model.
    Returns False when the single-file path applies."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / SHARDED_DIR / ".metadata").is_file():
        _load_dcp(model, optimizer, ckpt_dir / SHARDED_DIR, ctx)
        return True
    if is_fsdp(model):
        _load_full_into_sharded(model, optimizer, ckpt_dir)
        return True
    return False


def _load_dcp(model, optimizer, sharded_dir: Path, ctx: DistContext) -> None:
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout this run wants
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _single_process_dcp_is_intended():
            safe_dcp.load(state, sharded_dir, no_dist=not ctx.enabled)
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

    state = retie_after_load(load_file(str(ckpt_dir / "model.safetensors"), device="cpu"), model.config)
    check_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, ckpt_dir)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state, options=options)
    saved = load_optimizer_state(ckpt_dir)
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
    from torch.distributed.checkpoint.api import CheckpointException

    sharded_dir = Path(ckpt_dir) / SHARDED_DIR
    if not (sharded_dir / ".metadata").is_file():
        raise CheckpointError(f"{ckpt_dir} has no sharded weights ({sharded_dir}/.metadata is missing)")
    with torch.device("meta"):
        template = GPT(model_config)
    state = untie_for_save(
        {k: torch.empty(v.shape, dtype=v.dtype) for k, v in template.state_dict().items()}, model_config
    )
    try:
        with _single_process_dcp_is_intended():
            safe_dcp.load({"model": state}, sharded_dir, no_dist=True)
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

    ckpt_dir = resolve_checkpoint(path, prefer=prefer)
    model_config = read_model_config(ckpt_dir)
    state = {k: v.to(dtype).contiguous() for k, v in read_sharded_model_state(ckpt_dir, model_config).items()}
    metadata = {"format": "pt", "nanomoe": str(CHECKPOINT_FORMAT), "consolidated_from": str(ckpt_dir)}
    if out is None:
        target = ckpt_dir / "model.safetensors"
        tmp = temporary_path(target)
        try:
            save_file(state, str(tmp), metadata=metadata)
            usual_permissions(tmp)
            replace_durably(tmp, target)
            manifest.write_manifest(ckpt_dir)  # it now holds model.safetensors too
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
        publish_checkpoint(tmp, out)
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
