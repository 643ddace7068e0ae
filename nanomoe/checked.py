"""Checked numbers: one parser for every number a user gives (command-line flags, --set, config
files, chat commands), so none of them lets nan, inf, a negative count or a word through.

    number("3e-4", "lr", minimum=0, above=True)  -> 0.0003
    number("nan", "temperature")                 -> ConfigError: temperature must be a finite number ...
    parser.add_argument("--top-p", type=arg(float, "top_p", minimum=0, maximum=1, above=True))
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError, NanoMoEError


def number(value: Any, name: str, kind: type = float, *, minimum: float | None = None,
           maximum: float | None = None, above: bool = False) -> int | float:
    """`value` (a string or a number) as a finite `kind` within [minimum, maximum] (or above the
    minimum with `above`); ConfigError naming `name` and the accepted range otherwise."""
    what = "an integer" if kind is int else "a finite number"
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    try:
        if isinstance(value, str):
            text = value.strip()
            result = int(text) if kind is int else float(text)
        elif kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            result = int(value)
        else:
            result = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} must be {what}, got {value!r}") from None
    if kind is not int and not math.isfinite(result):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    low_ok = minimum is None or (result > minimum if above else result >= minimum)
    high_ok = maximum is None or result <= maximum
    if not (low_ok and high_ok):
        low = "" if minimum is None else (f"> {minimum:g}" if above else f">= {minimum:g}")
        high = "" if maximum is None else f"<= {maximum:g}"
        raise ConfigError(f"{name} must be {' and '.join(x for x in (low, high) if x)}, got {value!r}")
    return result


class FlagError(NanoMoEError):
    """A command-line value `arg` refused. Not a ValueError, so argparse lets it through to the
    CLI's one error handler (one line, exit 1) instead of rewording it."""


def arg(kind: type, name: str, **limits: Any):
    """An argparse `type=` that checks like `number`."""

    def parse(text: str):
        try:
            return number(text, name, kind, **limits)
        except ConfigError as e:
            raise FlagError(str(e)) from None

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse
