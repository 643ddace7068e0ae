"""The `nanomoe` command line: a thin layer over the library.

Each module in COMMANDS defines `register(subparsers)`, which adds its subcommand(s) and sets
`func` to a function taking the parsed arguments. The function's docstring is its help text.
Heavy imports (torch, tokenizers) happen inside the command functions so `nanomoe --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

from ..errors import NanoMoEError

# Order here is the order in `nanomoe --help`.
COMMANDS = [
    "train",
    "generate",
    "chat",
    "evaluate",
    "experts",
    "data",
    "params",
    "export",
    "checkpoint",
    "bench",
]


def add_command(subparsers, name: str, func, **kwargs) -> argparse.ArgumentParser:
    """Add subcommand `name` whose help is the first paragraph of `func`'s docstring."""
    doc = inspect.cleandoc(func.__doc__ or "")
    summary = doc.split("\n\n")[0].replace("\n", " ")
    parser = subparsers.add_parser(
        name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
    )
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanomoe",
        description="Train, evaluate, analyze and sample small dense and Mixture-of-Experts GPTs.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except NanoMoEError as e:
        print(f"nanomoe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nnanomoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)
