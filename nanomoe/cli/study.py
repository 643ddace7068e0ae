"""`nanomoe study`: several configurations trained under one time budget and compared."""

from __future__ import annotations

import re
import time
from pathlib import Path

from . import add_command


def parse_run_spec(spec: str) -> tuple[str, list[str]]:
    """'tiny-moe' or 'tiny-moe:optimizer=muon,lr=1e-2' -> (preset, ["optimizer=muon", "lr=1e-2"])."""
    from ..errors import ConfigError

    preset, _, rest = spec.partition(":")
    items = [item.strip() for item in rest.split(",") if item.strip()]
    if not preset or any("=" not in item for item in items):
        raise ConfigError(f"--runs {spec!r}: write PRESET or PRESET:key=value,key=value (e.g. tiny-moe:optimizer=muon)")
    return preset, items


def label_of(spec: str) -> str:
    """A run dir name for a run spec: tiny-moe:optimizer=muon -> tiny-moe__optimizer=muon."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", spec.replace(":", "__").replace(",", "_"))


def build_runs(specs: list[str], common: list[str], recipe: str, data: str):
    """Each run's configs: the recipe, then the study's --set, then the run's own key=value items."""
    from ..data import read_meta
    from ..errors import ConfigError
    from ..presets import resolve_model_config
    from ..study import StudyRun, check_same_tokenizer
    from ..training.config import resolve_train_config, split_overrides
    from .train import resolve_data_dir

    runs = []
    for spec in specs:
        preset, items = parse_run_spec(spec)
        overrides = [*common, *items]
        keys = {o.split("=", 1)[0].strip() for o in overrides}
        model_overrides, _ = split_overrides(overrides)
        model_cfg = resolve_model_config(preset, None, model_overrides)
        train_cfg = resolve_train_config(recipe, None, overrides)
        if "data" not in keys:
            train_cfg = train_cfg.replace(data=data)
        data_dir = resolve_data_dir(train_cfg.data, model_cfg.vocab_size)
        if "vocab_size" not in keys:
            model_cfg = model_cfg.replace(vocab_size=int(read_meta(data_dir)["vocab_size"]))
        runs.append(StudyRun(label_of(spec), model_cfg, train_cfg, data_dir))
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--runs names the same run twice ({', '.join(labels)}); give each run different settings")
    check_same_tokenizer(runs)
    return runs


def cmd_study(args) -> int:
    """Train several configurations under the same time budget and compare them honestly.

    The runs' step times are measured interleaved in this one process (a few steps of each, taking
    turns), so a machine whose speed drifts slows all of them alike; each run then trains for the steps
    the budget buys at its measured speed, is evaluated on the whole validation split, and the study
    writes study.json, study.md (a table) and study.png (validation bits/byte against training seconds).

    A run is PRESET or PRESET:key=value,key=value (model or training fields); --set applies to all runs.

    Examples:
      nanomoe study --data data/tinystories --minutes 10 --runs tiny-moe tiny-dense
      nanomoe study --data data/tinystories --minutes 10 --runs tiny-moe tiny-moe:optimizer=muon --set schedule=wsd
      nanomoe study --minutes 0.2 --runs debug debug-dense --set batch_size=4 --out studies/smoke
    """
    import logging

    from ..study import run_study

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = build_runs(args.runs, args.set or [], args.recipe, args.data)
    out = Path(args.out) if args.out else Path("studies") / time.strftime("%Y%m%d-%H%M%S")
    wandb_project = next((i.split("=", 1)[1] for i in reversed(args.set or []) if i.startswith("wandb_project=")), "")
    study = run_study(runs, args.minutes, out, rounds=args.rounds, wandb_project=wandb_project)
    print(f"\n{study['method']}.\n")
    from ..study import study_markdown

    print(study_markdown(study).split("\n", 4)[4])
    print(f"study.json, study.md and study.png in {out}")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "study", cmd_study)
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN",
                   help="PRESET or PRESET:key=value,key=value, one per run")
    p.add_argument("--minutes", type=float, required=True, help="training minutes each run gets")
    p.add_argument("--data", default="builtin", help="data for every run (builtin, tinystories or a prepared dir)")
    p.add_argument("--recipe", default="default", help="training recipe of every run (default: default)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a model or training field for every run")
    p.add_argument("--rounds", type=int, default=5, help="timed steps of each run for the speed measurement")
    p.add_argument("--out", help="study dir (default studies/<time>)")
