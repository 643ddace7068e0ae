"""`nanomoe params`: parameter, FLOP and memory calculator."""

from __future__ import annotations

import json

from ..checked import arg
from . import add_command


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def cmd_params(args) -> int:
    """Count parameters (total, active, per component), training FLOPs per token and training memory.

    Examples:
      nanomoe params --preset tiny-moe
      nanomoe params --preset moe-3b --gpus 8 --batch-size 4 --json
      nanomoe params --preset nanogpt-moe --set n_experts=16 --set top_k=1
    """
    from ..params import calculate
    from ..presets import PRESETS, resolve_model_config

    if args.list:
        for name, preset in PRESETS.items():
            print(f"{name:20s} {preset.description}")
        return 0
    cfg = resolve_model_config(args.preset, args.config, args.set)
    report = calculate(cfg, batch_size=args.batch_size, seq_len=args.seq_len, gpus=args.gpus)
    report = {"preset": args.preset, **report, "config": cfg.to_dict()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    c = report["components"]
    print(f"model: {args.preset or args.config}  ({'MoE' if cfg.is_moe else 'dense'}, {cfg.n_layer} layers, "
          f"n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, block {cfg.block_size})")
    print(f"  total parameters      {_fmt_count(report['total_params']):>10}  ({report['total_params']:,})")
    print(f"  active per token      {_fmt_count(report['active_params']):>10}  ({report['active_params']:,})")
    print(f"  embedding             {_fmt_count(report['embedding_params']):>10}")
    print(f"  non-embedding         {_fmt_count(report['non_embedding_params']):>10}"
          f"  (active {_fmt_count(report['active_non_embedding_params'])})")
    print("  components:")
    for name, value in c.items():
        if value:
            print(f"    {name:20s}{_fmt_count(value):>10}")
    print(f"  training FLOPs/token  {_fmt_count(report['flops_per_token_train']):>10}"
          f"  (forward {_fmt_count(report['flops_per_token_forward'])}, seq_len {report['seq_len']})")
    mem = report["memory_bytes"]
    print(f"  training memory at batch {args.batch_size} x {report['seq_len']} tokens (AdamW, fp32 master weights):")
    for precision, row in mem.items():
        line = (f"    {precision:5s} weights {_fmt_bytes(row['weights'])}, grads {_fmt_bytes(row['gradients'])}, "
                f"AdamW {_fmt_bytes(row['optimizer'])}, "
                + (f"bf16 weight casts {_fmt_bytes(row['weight_casts'])}, " if row["weight_casts"] else "")
                + f"activations {_fmt_bytes(row['activations'])} "
                f"({_fmt_bytes(row['activations_checkpointed'])} checkpointed); "
                f"total {_fmt_bytes(row['total'])} ({_fmt_bytes(row['total_checkpointed'])} checkpointed)")
        print(line)
        if "fsdp_per_gpu" in row:
            print(f"          FSDP over {args.gpus} GPU(s): {_fmt_bytes(row['fsdp_per_gpu'])} per GPU "
                  f"({_fmt_bytes(row['fsdp_per_gpu_checkpointed'])} with activation checkpointing)")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "params", cmd_params)
    p.add_argument("--preset", help="named model config (see --list)")
    p.add_argument("--config", help="TOML/YAML/JSON file with a [model] section, or a model.json")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a model field (repeatable)")
    p.add_argument("--batch-size", type=arg(int, "--batch-size", minimum=1), default=1, help="micro-batch per GPU for the memory estimate")
    p.add_argument("--seq-len", type=arg(int, "--seq-len", minimum=1), default=None, help="sequence length (default: block_size)")
    p.add_argument("--gpus", type=arg(int, "--gpus", minimum=1), default=1, help="number of GPUs sharing the model under FSDP")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
