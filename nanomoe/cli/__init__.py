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
    "study",
    "upcycle",
    "generate",
    "chat",
    "serve",
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
    for item in sys.argv[1:] if argv is None else argv:
        try:
            str(item).encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
            shown = str(item).encode("utf-8", "replace").decode()
            print(f"nanomoe: error: argument {shown!r} is not valid UTF-8 text; pass text in UTF-8", file=sys.stderr)
            return 1
    try:
        args = parser.parse_args(argv)
    except NanoMoEError as e:  # a value nanomoe.checked refused
        print(f"nanomoe: error: {e}", file=sys.stderr)
        return 1
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
    except Exception as e:  # anything nanomoe did not turn into a NanoMoEError: still one line
        import os

        if os.environ.get("NANOMOE_TRACEBACK"):
            raise
        print(f"nanomoe: error: {describe_unexpected(e)}", file=sys.stderr)
        return 1
    return int(result or 0)


def describe_unexpected(e: BaseException) -> str:
    """One line for an error nanomoe did not anticipate: the system's words for file and memory
    problems, otherwise the exception and a request to report it."""
    from ..errors import looks_out_of_space

    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if looks_out_of_space(e):
        return "no space left on device; free some space or write somewhere else"
    if isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return f"{getattr(e, 'strerror', None) or text}{where}; check the path and its permissions"
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller model, batch or input"
    return (f"unexpected {type(e).__name__}: {text[:300]}. This is a bug in nanomoe: please report it with the "
            "command line (set NANOMOE_TRACEBACK=1 to see the traceback)")
