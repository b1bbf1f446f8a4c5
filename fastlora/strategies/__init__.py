"""Backward-compatibility shim: the fine-tuning methods beyond LoRA live in :mod:`fastlora.methods`
(bottleneck/, prompt/, full.py). Old imports keep working; nothing inside fastlora imports this package."""

from fastlora.methods.bottleneck import AdapterConfig, AdapterModel, inject_adapters, load_adapters
from fastlora.methods.full import (
    TrainableReport,
    discriminative_param_groups,
    feature_extraction,
    full_finetune,
    layer_depths,
    load_trainable,
    loraplus_param_groups,
    save_trainable,
    trainable_report,
)
from fastlora.methods.prompt import (
    PrefixTuningConfig,
    PromptModel,
    PromptTuningConfig,
    PTuningConfig,
    inject_prompt,
    load_prompt,
    prefix_from_tokens,
)
from fastlora.strategies import bottleneck, full, prompt, prompt_io

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptModel",
    "PromptTuningConfig",
    "TrainableReport",
    "bottleneck",
    "discriminative_param_groups",
    "feature_extraction",
    "full",
    "full_finetune",
    "inject_adapters",
    "inject_prompt",
    "layer_depths",
    "load_adapters",
    "load_prompt",
    "load_trainable",
    "loraplus_param_groups",
    "prefix_from_tokens",
    "prompt",
    "prompt_io",
    "save_trainable",
    "trainable_report",
]
