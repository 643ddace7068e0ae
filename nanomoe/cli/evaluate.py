"""`nanomoe eval`: validation loss, perplexity, bits per byte, accuracy and MoE routing health.

Also home of the checkpoint + data arguments that `nanomoe experts` shares.
"""

from __future__ import annotations

import json
import math

from ..checked import arg
from . import add_command


def add_checkpoint_data_args(p, *, max_batches: int | None, batch_size: int = 16) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="a run dir (its best.json, else latest.json) or a checkpoints/step-* dir")
    p.add_argument("--prefer", choices=["best", "latest"], default="best",
                   help="which checkpoint of a run dir to use (default best)")
    p.add_argument("--data", metavar="DATA_DIR",
                   help="builtin, tinystories, or a data dir from `nanomoe prepare` (default: the run's training data)")
    p.add_argument("--split", choices=["val", "train"], default="val", help="split to evaluate (default val)")
    p.add_argument("--mode", choices=["packed", "documents"], default="packed",
                   help="packed windows across documents (default), or one padded document per row")
    p.add_argument("--batch-size", type=arg(int, "--batch-size", minimum=1), default=batch_size, help=f"rows per batch (default {batch_size})")
    p.add_argument("--block-size", type=arg(int, "--block-size", minimum=1), help="tokens per row (default: the length the model was trained at)")
    p.add_argument("--max-batches", type=arg(int, "--max-batches", minimum=0), default=max_batches,
                   help="stop after this many batches (default: " + ("the whole split" if max_batches is None
                                                                     else str(max_batches)) + "; 0 = whole split)")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="fp32 (default, exact), bf16 (much faster on CPUs with AMX and on GPUs), fp16 (GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_checkpoint_and_data(args):
    """(checkpoint on the chosen device, data dir) from the shared arguments, with clear errors."""
    from ..errors import ConfigError, DataError
    from ..runtime import resolve_device
    from ..training.checkpoint import load_checkpoint
    from .train import resolve_data_dir

    for name in ("batch_size", "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_batches is not None and args.max_batches < 0:
        raise ConfigError(f"--max-batches must be >= 0 (0 = the whole split), got {args.max_batches}")
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, prefer=args.prefer, device=device)
    data = args.data or ckpt.trainer_state.get("data_dir")
    if not data:
        raise DataError(f"{ckpt.path} does not record its training data; pass --data DATA_DIR")
    data_dir = resolve_data_dir(str(data), ckpt.model_config.vocab_size)
    return ckpt, data_dir


def _fmt_optional(value, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def print_report(result: dict) -> None:
    print(f"checkpoint     {result['checkpoint']} (step {result['step']})")
    print(f"data           {result['data']}: {result['split']} split, {result['mode']}, {result['batches']} batches "
          f"of {result['batch_size']} x {result['block_size']} tokens, {result['precision']}")
    print(f"loss           {result['loss']:.4f} nats/token (padding excluded)")
    print(f"perplexity     {result['perplexity']:.3f}")
    print(f"bits per byte  {_fmt_optional(result['bits_per_byte'], '.4f')}")
    print(f"accuracy       {_fmt_optional(result['accuracy'], '.4f')} (next token = argmax)")
    print(f"tokens         {result['tokens']:,} in {result['seconds']:.1f} s "
          f"({_fmt_optional(result['tokens_per_second'], ',.0f')} tokens/s on {result['device']})")
    moe = result.get("moe")
    if moe:
        layers = moe["layers"]
        print(f"MoE routing    {len(layers)} layers: load cv {moe['load_cv']:.3f}, "
              f"entropy {moe['routing_entropy']:.3f} "
              f"nats, dead experts {moe['dead_experts']}, dropped {100 * moe['dropped_fraction']:.2f}%")
        print("  layer  load_cv  max_load  entropy  confidence  dropped  dead  overloaded")
        for i, layer in enumerate(layers):
            print(f"  {i:5d}  {layer['load_cv']:7.3f}  {layer['max_load_fraction']:8.3f}"
                  f"  {layer['routing_entropy']:7.3f}"
                  f"  {layer['router_confidence']:10.3f}  {100 * layer['dropped_fraction']:6.2f}%  "
                  f"{len(layer['dead_experts']):4d}  {','.join(map(str, layer['overloaded_experts'])) or '-'}")


def cmd_eval(args) -> int:
    """Evaluate a checkpoint: loss (padding excluded), perplexity, bits per byte, accuracy.

    Loss is the mean cross-entropy over real target tokens only; MoE models also get the routing
    health of every layer (load, entropy, confidence, dead and overloaded experts).

    Examples:
      nanomoe eval --checkpoint runs/tiny-moe --data builtin
      nanomoe eval --checkpoint runs/tiny-moe --data data/tinystories --mode documents --json
      nanomoe eval --checkpoint runs/tiny-moe/checkpoints/step-00000600 --max-batches 20 --precision bf16
    """
    from ..evaluation import evaluate_checkpoint

    ckpt, data_dir = load_checkpoint_and_data(args)
    result = evaluate_checkpoint(
        ckpt, data_dir, split=args.split, mode=args.mode, batch_size=args.batch_size, block_size=args.block_size,
        max_batches=args.max_batches or None, precision=args.precision,
        progress=False if (args.no_progress or args.json) else None,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "eval", cmd_eval)
    add_checkpoint_data_args(p, max_batches=None)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (loss, perplexity, bits_per_byte, accuracy, tokens, moe, ...)")


__all__ = ["add_checkpoint_data_args", "load_checkpoint_and_data", "cmd_eval"]
