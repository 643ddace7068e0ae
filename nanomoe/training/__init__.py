"""Training layer: config and recipes, the trainer, checkpoints, schedules, logging and plots."""

from .checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from .config import RECIPES, TrainConfig, resolve_train_config
from .trainer import Trainer, TrainingError

__all__ = [
    "Checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "RECIPES",
    "TrainConfig",
    "resolve_train_config",
    "Trainer",
    "TrainingError",
]
