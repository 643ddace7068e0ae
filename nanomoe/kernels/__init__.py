"""The kernel layer: every op with more than one implementation, and the backends that implement it.

    reference.py   the torch backend: each op in plain PyTorch, the op's definition (any device;
                   torch.compile fuses it)
    native.py      the native backend: the same ops as C++ kernels on the CPU (csrc/), each a
                   PyTorch custom operator with a fake implementation and an autograd formula
    plan.py        the dispatch plan's data type and reference
    grouped_ffn.py the torch backend's grouped expert FFN: grouped GEMM (F.grouped_mm, sync-free), or
                   the per-expert loop with a hand-written backward where grouped_mm does not run
    decode.py      the native decode step
    extension.py   building and loading the C++ extension (`python -m nanomoe.kernels.build`)

A backend is chosen once, by `ModelConfig.kernels` ("auto" | "torch" | "native"), when a model is
built: `resolve` turns the request into a backend name, `get` into the `Kernels` table the model's
layers call. The model never asks which backend it has. docs/architecture.md has the table of ops.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import native, reference
from .extension import build_error, load_extension
from .grouped_ffn import compute_dtype
from .plan import ExpertPlan

BACKENDS = ("torch", "native")
CHOICES = ("auto", *BACKENDS)
ENV = "NANOMOE_KERNELS"  # sets what "auto" means: "torch" or "native" (NANOMOE_NATIVE=0: "torch")


@dataclass(frozen=True)
class Kernels:
    """One backend's implementation of every op (signatures: reference.py)."""

    name: str
    rms_norm: Callable
    apply_rope: Callable
    attention_heads: Callable
    attention: Callable
    swiglu: Callable
    cross_entropy_sum: Callable
    route: Callable
    expert_plan: Callable
    row_multiple: Callable
    grouped_ffn: Callable
    decode_step: Callable  # (model, static cache) -> a one-token step, or None: decode with GPT.forward
    decode_unsupported: Callable  # (model) -> why decode_step has no step for it, or None

    def activation(self, h: torch.Tensor, kind: str) -> torch.Tensor:
        """Hidden activation of a feed-forward net. For swiglu, `h` holds [gate | up] halves."""
        if kind == "relu":
            return torch.relu(h)
        if kind == "gelu":
            return torch.nn.functional.gelu(h, approximate="tanh")
        return self.swiglu(h)


def _no_decode_step(model, cache):
    return None


def _no_step_here(model) -> str:
    return "the torch kernels decode through the model's forward pass"


def _table(name: str, module, decode_step, decode_unsupported) -> Kernels:
    ops = {op: getattr(module, op) for op in ("rms_norm", "apply_rope", "attention_heads", "attention", "swiglu",
                                              "cross_entropy_sum", "route", "expert_plan", "row_multiple",
                                              "grouped_ffn")}
    return Kernels(name=name, decode_step=decode_step, decode_unsupported=decode_unsupported, **ops)


TORCH = _table("torch", reference, _no_decode_step, _no_step_here)
NATIVE = _table("native", native, native.decode_step, native.decode_unsupported)
_TABLES = {"torch": TORCH, "native": NATIVE}

_said_torch = False


def default_choice() -> str:
    """What "auto" asks for: NANOMOE_KERNELS if set ("torch" | "native" | "auto"), "torch" under
    NANOMOE_NATIVE=0, else "auto"."""
    choice = os.environ.get(ENV, "").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"{ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "auto" and os.environ.get("NANOMOE_NATIVE", "1") == "0":
        return "torch"
    return choice


def resolve(choice: str = "auto", device: torch.device | str | None = None) -> str:
    """The backend that runs for `choice` on `device` (the CPU when None): "auto" is native on a CPU
    where the extension is built (or builds), torch elsewhere; the environment (`default_choice`)
    only decides what "auto" means."""
    global _said_torch
    if choice not in CHOICES:
        raise ConfigError(f"kernels must be one of {', '.join(CHOICES)}, got {choice!r}")
    explicit = choice != "auto"
    if choice == "auto":
        choice = default_choice()
    device_type = torch.device(device).type if device is not None else "cpu"
    if choice == "torch":
        return "torch"
    on_cpu = device_type in ("cpu", "meta")
    if choice == "native" and explicit and not on_cpu:
        raise ConfigError(f"kernels='native' runs on the CPU, not on {device_type}; use kernels='torch' or 'auto'")
    if on_cpu and load_extension() is not None:
        return "native"
    if choice == "native" and explicit:
        raise ConfigError(f"kernels='native': the native kernels could not be built ({build_error()}); "
                          "install a C++ compiler or use kernels='torch'")
    if on_cpu and not _said_torch:
        _said_torch = True
        print(f"nanomoe: the native CPU kernels could not be built ({build_error()}); running the torch kernels",
              file=sys.stderr)
    return "torch"


def select(choice: str = "auto", device: torch.device | str | None = None) -> Kernels:
    """The `Kernels` table that runs for `choice` on `device`: get(resolve(choice, device))."""
    return get(resolve(choice, device))


def get(name: str) -> Kernels:
    """The `Kernels` table of a backend name ("torch" or "native")."""
    if name not in _TABLES:
        raise ConfigError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return _TABLES[name]


__all__ = ["BACKENDS", "CHOICES", "ExpertPlan", "Kernels", "NATIVE", "TORCH", "compute_dtype", "default_choice", "get",
           "resolve", "select"]
