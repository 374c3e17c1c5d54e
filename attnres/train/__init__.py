"""Training on real text: config, optimizers and schedules, atomic checkpoints, the loop and its
parts (:mod:`.trainer`: build or restore, step, evaluate, checkpoint, log), compare."""

from .checkpoint import CheckpointError, find_checkpoint, load_pretrained, save_checkpoint
from .config import PRESETS, ConfigError, TrainConfig, load_config, parse_set
from .evaluate import evaluate
from .loop import saved_config, train
from .optim import build_optimizers, lr_factor, param_groups
from .rundir import RunExistsError, read_metrics
from .trainer import NonFiniteLoss, Trainer, TrainingInterrupted, TrainState, build_or_restore

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "NonFiniteLoss",
    "RunExistsError",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingInterrupted",
    "build_optimizers",
    "build_or_restore",
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
