"""`nanomoe experts`: expert usage analysis of an MoE checkpoint, as JSON, PNG heatmaps and HTML."""

from __future__ import annotations

from ..checked import arg
from . import add_command
from .evaluate import add_checkpoint_data_args, load_checkpoint_and_data


def cmd_experts(args) -> int:
    """Expert usage report of an MoE checkpoint: experts.json, PNG heatmaps and report.html.

    Per MoE layer: the share of tokens each expert gets, load CV, routing entropy, router confidence,
    the top-2 co-selection matrix, dead and overloaded experts, and the tokens each expert receives
    most. report.html is self-contained: sample stories with every token coloured by its expert,
    with a layer selector.

    Examples:
      nanomoe experts --checkpoint runs/tiny-moe --data builtin --out reports/tiny-moe
      nanomoe experts --checkpoint runs/tiny-moe --out reports/tiny-moe --max-batches 0 --samples 8
    """
    from ..analysis import analyze_experts, write_report

    ckpt, data_dir = load_checkpoint_and_data(args)
    analysis = analyze_experts(
        ckpt, data_dir, split=args.split, mode=args.mode, batch_size=args.batch_size, block_size=args.block_size,
        max_batches=args.max_batches or None, precision=args.precision, n_samples=args.samples,
        top_tokens=args.top_tokens, min_count=args.min_count, progress=False if args.no_progress else None,
    )
    written = write_report(analysis, args.out, title=f"Experts of {ckpt.path.parent.parent.name or ckpt.path.name} "
                                                       f"(step {ckpt.step})")
    ev = analysis["evaluation"]
    print(f"{ev['tokens']:,} tokens of {ev['data']} ({ev['split']}), loss {ev['loss']:.4f}")
    print("  layer  load_cv  max_load  entropy/max  confidence  dead  overloaded  top pair")
    for layer in analysis["layers"]:
        pair = layer["top_pairs"][0] if layer["top_pairs"] else None
        pair_text = f"{pair['experts'][0]}+{pair['experts'][1]} ({100 * pair['fraction']:.1f}%)" if pair else "-"
        print(f"  {layer['layer']:5d}  {layer['load_cv']:7.3f}  {100 * layer['max_load_fraction']:7.1f}%"
              f"  {100 * layer['routing_entropy_normalized']:10.1f}%  {layer['router_confidence']:10.3f}"
              f"  {len(layer['dead_experts']):4d}  {','.join(map(str, layer['overloaded_experts'])) or '-':>10s}"
              f"  {pair_text}")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "experts", cmd_experts)
    add_checkpoint_data_args(p, max_batches=50)
    p.add_argument("--out", required=True, metavar="REPORT_DIR",
                   help="folder for experts.json, *.png and report.html (created; other files are left alone)")
    p.add_argument("--samples", type=arg(int, "--samples", minimum=0), default=4, help="stories to colour by expert in report.html (default 4)")
    p.add_argument("--top-tokens", type=arg(int, "--top-tokens", minimum=1), default=12, help="tokens listed per expert (default 12)")
    p.add_argument("--min-count", type=arg(int, "--min-count", minimum=0), default=5,
                   help="occurrences a token needs to be listed as distinctive of an expert (default 5)")
