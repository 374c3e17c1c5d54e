"""Training on real text: config, optimizers and schedules, atomic checkpoints, the loop, compare."""

from .checkpoint import CheckpointError, find_checkpoint, load_pretrained, save_checkpoint
from .config import PRESETS, ConfigError, TrainConfig, load_config, parse_set
from .evaluate import evaluate
from .loop import NonFiniteLoss, RunExistsError, TrainingInterrupted, read_metrics, saved_config, train
from .optim import build_optimizers, lr_factor, param_groups

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "NonFiniteLoss",
    "RunExistsError",
    "TrainConfig",
    "TrainingInterrupted",
    "build_optimizers",
    "evaluate",
    "find_checkpoint",
    "load_config",
    "load_pretrained",
    "lr_factor",
    "param_groups",
    "parse_set",
    "read_metrics",
    "save_checkpoint",
    "saved_config",
    "train",
]
