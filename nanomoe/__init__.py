"""nanomoe: train, evaluate, analyze and sample small dense and Mixture-of-Experts GPTs."""

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, DataError, NanoMoEError
from .model import GPT, KVCache, ModelOutput
from .presets import PRESETS, get_preset
from .training.checkpoint import load_checkpoint

__version__ = "0.1.0"

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
