"""`nanomoe train`: the main job."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from ..checked import arg
from ..errors import NanoMoEError
from . import add_command

log = logging.getLogger("nanomoe.train")


def resolve_data_dir(data: str, vocab_size: int = 2048) -> Path:
    """'builtin' or 'builtin:MB' (prepared on first use in the cache), 'tinystories' (downloaded and prepared on
    machines that are online), or a data dir written by `nanomoe prepare`."""
    from ..data.sources import builtin_size_mb
    from ..errors import DataError

    size_mb = builtin_size_mb(data)
    if size_mb is not None:
        from ..data import builtin_corpus_dir

        return builtin_corpus_dir(size_mb=size_mb)
    if data == "tinystories":
        from ..data import cache_root, prepare_data

        return prepare_data("tinystories", cache_root() / f"tinystories-bpe{vocab_size}", vocab_size=vocab_size)
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {data}: no such directory; use builtin, tinystories, or a dir made by nanomoe prepare")
    if not (path / "meta.json").is_file():
        names = {p.name for p in path.iterdir() if not p.name.startswith(".")} if path.is_dir() else None
        if names is not None and (not names or names & {"train.bin", "val.bin", "tokenizer.json"}):
            # empty, or outputs without meta.json: an interrupted prepare, whose data is not trusted
            raise DataError(
                f"--data {data} holds no complete prepared data (no meta.json: an interrupted `nanomoe prepare`?). "
                f"Run it again: nanomoe prepare --source SOURCE --out {data}"
            )
        raise DataError(
            f"--data {data} is not a prepared data dir (no meta.json). Prepare it first:\n"
            f"  nanomoe prepare --source {data} --out {path.name}-prepared"
        )
    return path


def _explicit_vocab(config_file, overrides) -> bool:
    if any(item.split("=", 1)[0].strip() == "vocab_size" for item in overrides or []):
        return True
    if config_file:
        from ..config import load_config_file

        return "vocab_size" in (load_config_file(config_file).get("model") or {})
    return False


def _check_writable(out: Path) -> None:
    from ..errors import ConfigError

    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out} is not writable ({e.strerror or e}); choose another directory") from None


def check_device(train_cfg) -> str:
    """The device type the run will use, checked before any data is prepared: a GPU that is asked
    for but absent, fp16 without a GPU, and (a warning) a GPU left unused because torch is the CPU
    build all say what to change in one line."""
    from ..runtime import check_precision, cpu_torch_message, cpu_torch_on_a_gpu_machine, resolve_device

    device = resolve_device(train_cfg.device)
    if train_cfg.device == "auto" and device.type == "cpu" and cpu_torch_on_a_gpu_machine():
        log.warning("training on the CPU: %s", cpu_torch_message())
    check_precision(train_cfg.precision, device)
    return device.type


def cmd_train(args) -> int:
    """Train a model. With no arguments: budget-moe on the built-in story corpus for 2 minutes of training
    steps (the default recipe's time budget), then print sample stories.

    Examples:
      nanomoe train                                        # budget-moe, built-in corpus, 2 minutes
      nanomoe train --preset tiny-dense --max-steps 2000
      nanomoe train --max-time 10m --set optimizer=muon    # as many steps as 10 minutes buy
      nanomoe train --preset nanogpt-moe --recipe nanogpt-moe --data tinystories
      nanomoe train --data data/tinystories --set lr=1e-3 --set n_layer=8
      nanomoe train --resume runs/tiny-moe-20261121-120000 --max-steps 4000
      torchrun --nproc_per_node=2 -m nanomoe train --strategy ddp ...
    """
    from ..config import ModelConfig
    from ..errors import ConfigError
    from ..presets import resolve_model_config
    from ..runtime import DistContext
    from ..training import checkpoint as ckpt
    from ..training.config import TrainConfig, resolve_train_config, split_overrides
    from ..training.run_lock import LOCK_FILE, RunLock
    from ..training.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_overrides, _ = split_overrides(args.set)
    explicit = dict(max_steps=args.max_steps, strategy=args.strategy, device=args.device, data=args.data)
    if args.max_time is not None:
        from ..training.budget import parse_duration

        if args.max_steps is not None:
            raise ConfigError("pass either --max-time (a time budget) or --max-steps, not both")
        explicit["max_minutes"] = parse_duration(args.max_time) / 60
    elif args.max_steps is not None:
        explicit["max_minutes"] = 0.0  # --max-steps replaces a time budget (a resumed run's, or the recipe's)
    if args.no_progress:
        explicit["progress"] = False

    if args.resume is not None:
        ignored = [flag for flag, value in (("--preset", args.preset), ("--config", args.config),
                                            ("--recipe", args.recipe)) if value]
        if ignored:
            raise ConfigError(f"{', '.join(ignored)} cannot be combined with --resume: a resumed run keeps its saved "
                              "configs; change training fields with --set key=value or --max-steps")
        run_or_ckpt = Path(args.resume if args.resume != "latest" else (args.out or ""))
        if not str(run_or_ckpt):
            raise ConfigError("--resume needs a run dir: --resume RUN (or --out RUN --resume)")
        ckpt_dir = ckpt.resolve_for_resume(run_or_ckpt)
        run_dir = Path(args.out) if args.out else ckpt_dir.parent.parent
        model_cfg = ckpt.read_model_config(ckpt_dir)
        ckpt.check_config_fits_weights(ckpt_dir, model_cfg)  # before the trainer allocates the model
        kernels = [o for o in model_overrides if o.split("=", 1)[0].strip() == "kernels"]
        model_overrides = [o for o in model_overrides if o not in kernels]  # the implementation may change
        if model_overrides:
            raise ConfigError("model fields cannot change on --resume (the weights fix them); drop "
                              + ", ".join(model_overrides))
        if kernels:
            model_cfg = model_cfg.replace(kernels=kernels[-1].split("=", 1)[1].strip())
        saved_train = ckpt.read_json(ckpt_dir / "train_config.json")
        train_cfg = TrainConfig.from_dict(saved_train)
        changes = resolve_train_config(overrides=args.set, **explicit).to_dict()
        given = {k for k, v in explicit.items() if v is not None} | {i.split("=", 1)[0] for i in args.set or []}
        train_cfg = train_cfg.replace(**{k: changes[k] for k in given if k in changes})
        device_type = check_device(train_cfg)
        data_dir = resolve_data_dir(train_cfg.data, model_cfg.vocab_size) if args.data else Path(
            ckpt.read_json(ckpt_dir / "trainer_state.json")["data_dir"])
        resume_from = ckpt_dir
    else:
        preset = args.preset or (None if args.config else "budget-moe")
        model_cfg = resolve_model_config(preset, args.config, model_overrides)
        train_cfg = resolve_train_config(args.recipe or ("default" if not args.config else None), args.config,
                                         args.set, **explicit)
        device_type = check_device(train_cfg)
        data_dir = resolve_data_dir(train_cfg.data, model_cfg.vocab_size)
        if not _explicit_vocab(args.config, args.set):
            from ..data import read_meta

            model_cfg = model_cfg.replace(vocab_size=int(read_meta(data_dir)["vocab_size"]))
        name = preset or Path(args.config).stem
        run_dir = Path(args.out) if args.out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (run_dir / "latest.json").exists() or any(
            ckpt.is_complete(d) for d in (run_dir / "checkpoints").glob("*") if d.is_dir()
        ):
            raise ConfigError(
                f"{run_dir} already holds a training run; continue it with --resume {run_dir}, or pass another --out"
            )
        resume_from = None
    assert isinstance(model_cfg, ModelConfig)

    if device_type == "cpu":
        from ..malloc import keep_freed_memory

        keep_freed_memory()  # reuse activation memory across steps instead of page-faulting it anew
    ctx = DistContext.from_env(device_type)
    new_dir = not run_dir.exists()
    lock = RunLock(run_dir)  # taken by the main process only
    try:
        if ctx.is_main:
            _check_writable(run_dir)
            lock.acquire()
        try:
            trainer = Trainer(model_cfg, train_cfg, run_dir, data_dir, resume_from=resume_from, dist=ctx,
                              reset_missing_state=args.reset_missing_state)
        except NanoMoEError:
            if ctx.is_main and new_dir:  # refused before anything was written: leave no empty --out behind
                lock.release()
                with contextlib.suppress(OSError):
                    (run_dir / LOCK_FILE).unlink()
                    run_dir.rmdir()
            raise
        result = trainer.fit()
        # every rank calls sample(): an FSDP model needs all of them for each forward
        stories = trainer.sample() if not result["stopped"] and train_cfg.samples else []
        if ctx.is_main and stories:
            print("\nSample stories (temperature 0.8, top-k 50):\n")
            for i, story in enumerate(stories):
                print(f"--- story {i + 1} ---\n{story}\n")
        if ctx.is_main:
            last = result["last_eval"]
            if last:
                bpb = f", bits/byte {last['bits_per_byte']:.3f}" if last.get("bits_per_byte") else ""
                print(f"final validation loss {last['loss']:.4f} (perplexity {last['perplexity']:.2f}{bpb}), "
                      f"padding excluded; run dir: {run_dir}")
            if result.get("budget_summary"):
                print(result["budget_summary"])
        return 130 if result["stopped"] else 0
    finally:
        lock.release()
        ctx.shutdown()


def register(subparsers) -> None:
    p = add_command(subparsers, "train", cmd_train)
    p.add_argument("--preset", help="model preset (default budget-moe; see `nanomoe params --list`)")
    p.add_argument("--recipe", help="training recipe: default, nanogpt-moe (the original NanoGPT-MoE "
                   "TinyStories project's), debug")
    p.add_argument("--config", help="TOML/YAML/JSON file with preset/recipe keys and [model] / [train] sections")
    p.add_argument("--data", help="builtin (default; builtin:MB for another size), tinystories, or a data dir from "
                   "`nanomoe prepare`")
    p.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
    p.add_argument("--max-steps", type=arg(int, "--max-steps", minimum=1), help="optimizer steps to train for")
    p.add_argument("--max-time", metavar="DURATION",
                   help="train for a time budget (10m, 90s, 1.5h): the steps it buys are measured in the first "
                   "steps and saved with the run (same as --set max_minutes=N)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="RUN",
                   help="continue a run exactly where it stopped (RUN dir or a checkpoint dir)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any model or training field, e.g. --set lr=1e-3 --set n_layer=4 (repeatable)")
    p.add_argument("--strategy", choices=["single", "ddp", "fsdp"], help="data parallelism under torchrun")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--reset-missing-state", action="store_true",
                   help="on --resume, start AdamW and the RNG afresh when the checkpoint lacks optimizer.pt or "
                   "rng.pt (otherwise that is an error: the resume would not be exact)")
