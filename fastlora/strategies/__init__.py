"""Fine-tuning strategies beyond LoRA: bottleneck adapters, prompt/prefix tuning, full FT, feature extraction."""

from fastlora.strategies.bottleneck import AdapterConfig, AdapterModel, inject_adapters, load_adapters
from fastlora.strategies.full import (
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
from fastlora.strategies.prompt import (
    PrefixTuningConfig,
    PromptModel,
    PromptTuningConfig,
    PTuningConfig,
    inject_prompt,
    load_prompt,
    prefix_from_tokens,
)

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptModel",
    "PromptTuningConfig",
    "TrainableReport",
    "discriminative_param_groups",
    "feature_extraction",
    "full_finetune",
    "inject_adapters",
    "inject_prompt",
    "layer_depths",
    "load_adapters",
    "load_prompt",
    "load_trainable",
    "loraplus_param_groups",
    "prefix_from_tokens",
    "save_trainable",
    "trainable_report",
]
