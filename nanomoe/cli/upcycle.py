"""`nanomoe upcycle`: a dense checkpoint becomes an MoE run (sparse upcycling)."""

from __future__ import annotations

from . import add_command


def cmd_upcycle(args) -> int:
    """Turn a dense checkpoint into an MoE run whose experts are copies of the dense FFN.

    Each MoE layer's experts start as copies of that layer's feed-forward net and its router is freshly
    initialized, so before training the MoE computes the dense model's function. The new run is at step 0
    (fresh optimizer; the data stream continues where the dense run stopped); train it with --resume.

    Examples:
      nanomoe upcycle --checkpoint runs/dense --experts 8 --top-k 2 --out runs/upcycled
      nanomoe train --resume runs/upcycled --max-time 10m
      nanomoe upcycle --checkpoint runs/dense --experts 8 --out runs/up --set moe_every=2 --set router_bias_update_rate=1e-3
    """
    from ..config import ModelConfig, parse_overrides
    from ..upcycle import upcycle_checkpoint

    overrides = parse_overrides(ModelConfig, args.set) if args.set else {}
    path = upcycle_checkpoint(args.checkpoint, args.out, args.experts, args.top_k, seed=args.seed, overrides=overrides)
    print(f"upcycled {args.checkpoint} into {args.experts} experts (top-{args.top_k}): {path}\n"
          f"train it with: nanomoe train --resume {args.out} --max-steps N   (or --max-time 10m)")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "upcycle", cmd_upcycle)
    p.add_argument("--checkpoint", required=True, help="a dense run dir or checkpoint dir")
    p.add_argument("--experts", type=int, required=True, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--out", required=True, help="the new run dir")
    p.add_argument("--seed", type=int, default=0, help="seed of the routers' initialization")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="MoE fields: router, moe_every, aux_loss_coef, z_loss_coef, router_bias_update_rate, ...")
