"""`nanomoe bench moe|train|generate|peak`: the benchmarks users run, scripts that print numbers (JSON with
--json). The one-off studies behind the docs' figures are in research/ (see research/README.md)."""

from __future__ import annotations

import importlib

from . import add_command

# each module nanomoe.bench.<name> defines register(subparsers) for `nanomoe bench <name>`
BENCHMARKS = ["moe", "train", "generate", "serve", "peak"]  # data preparation: research/bench_prepare.py


def cmd_bench(args) -> int:
    """Run a benchmark: `nanomoe bench moe`, `nanomoe bench train`, `nanomoe bench generate`, `nanomoe bench serve`,
    `nanomoe bench peak`.

    Each prints a table, or one JSON object with --json. Run with nothing else on the machine."""
    args.bench_parser.print_help()
    return 2


def register(subparsers) -> None:
    parser = add_command(subparsers, "bench", cmd_bench)
    parser.set_defaults(bench_parser=parser)
    bench_sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name in BENCHMARKS:
        importlib.import_module(f"nanomoe.bench.{name}").register(bench_sub)
