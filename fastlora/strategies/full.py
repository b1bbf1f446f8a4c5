"""Backward-compatibility shim: full fine-tuning, feature extraction and the parameter groups live in
:mod:`fastlora.methods.full`, the parameter report in :mod:`fastlora.methods.report`."""

from fastlora.methods.full import (
    discriminative_param_groups,
    feature_extraction,
    full_finetune,
    layer_depths,
    load_trainable,
    loraplus_param_groups,
    save_trainable,
)
from fastlora.methods.report import TrainableReport, trainable_report

__all__ = [
    "TrainableReport",
    "discriminative_param_groups",
    "feature_extraction",
    "full_finetune",
    "layer_depths",
    "load_trainable",
    "loraplus_param_groups",
    "save_trainable",
    "trainable_report",
]
