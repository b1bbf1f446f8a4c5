"""Fine-tuning runs: data, methods, the training loop and the ``fastlora finetune`` family of commands."""

from fastlora.train.config import TrainConfig
from fastlora.train.trainer import Summary, Trainer, TrainingError

__all__ = ["Summary", "TrainConfig", "Trainer", "TrainingError"]
