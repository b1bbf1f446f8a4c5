"""fastlora: kernel-optimised LoRA/QLoRA for PyTorch."""

import importlib

from fastlora.methods import (
    AdapterConfig,
    LoraConfig,
    LoraModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    discriminative_param_groups,
    feature_extraction,
    full_finetune,
    inject,
    inject_adapters,
    inject_prompt,
    load,
    load_adapters,
    load_prompt,
    loraplus_param_groups,
)
from fastlora.modules import FastAdapter, FastLoRALinear
from fastlora.ops import LoRAPlan, adapter_forward, lora_linear, lora_linear_multi, plan
from fastlora.quant import QuantState, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "FastAdapter",
    "FastLoRALinear",
    "LoRAPlan",
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
    "lora_linear_multi",
    "loraplus_param_groups",
    "plan",
    "quantize_4bit",
]

# The packages the methods lived in before fastlora.methods: still ``fastlora.adapters.X`` /
# ``fastlora.strategies.X`` after ``import fastlora``, imported on first use (nothing in fastlora needs them).
_SHIMS = ("adapters", "strategies")


def __getattr__(name: str):
    if name in _SHIMS:
        return importlib.import_module(f"fastlora.{name}")
    raise AttributeError(f"module 'fastlora' has no attribute {name!r}")
