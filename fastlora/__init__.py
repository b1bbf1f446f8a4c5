"""fastlora: kernel-optimised LoRA/QLoRA for PyTorch."""

from fastlora.adapters import LoraConfig, LoraModel, inject, load
from fastlora.modules import FastAdapter, FastLoRALinear
from fastlora.ops import adapter_forward, lora_linear
from fastlora.quant import QuantState, dequantize_4bit, quantize_4bit
from fastlora.strategies import (
    AdapterConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    discriminative_param_groups,
    feature_extraction,
    full_finetune,
    inject_adapters,
    inject_prompt,
    load_adapters,
    load_prompt,
    loraplus_param_groups,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "FastAdapter",
    "FastLoRALinear",
    "LoraConfig",
    "LoraModel",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QuantState",
    "__version__",
    "adapter_forward",
    "dequantize_4bit",
    "discriminative_param_groups",
    "feature_extraction",
    "full_finetune",
    "inject",
    "inject_adapters",
    "inject_prompt",
    "load",
    "load_adapters",
    "load_prompt",
    "lora_linear",
    "loraplus_param_groups",
    "quantize_4bit",
]
