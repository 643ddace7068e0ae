"""nanomoe: train, evaluate, analyze and sample small dense and Mixture-of-Experts GPTs.

    import nanomoe
    ckpt = nanomoe.load_checkpoint("runs/tiny-moe")
    model = nanomoe.GPT(nanomoe.get_preset("tiny-moe"))

The names below load their module (and torch) on first use, so `import nanomoe` and
`nanomoe --help` stay fast.
"""

from __future__ import annotations

import importlib

from .errors import CheckpointError, ConfigError, DataError, NanoMoEError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "GPT": "nanomoe.model",
    "KVCache": "nanomoe.model",
    "ModelOutput": "nanomoe.model",
    "ModelConfig": "nanomoe.config",
    "PRESETS": "nanomoe.presets",
    "get_preset": "nanomoe.presets",
    "load_checkpoint": "nanomoe.training.checkpoint",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'nanomoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "GPT",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "PRESETS",
    "get_preset",
    "load_checkpoint",
    "NanoMoEError",
    "ConfigError",
    "DataError",
    "CheckpointError",
]
