"""fastlora: kernel-optimised LoRA/QLoRA for PyTorch."""

from fastlora.adapters import LoraConfig, LoraModel, inject, load
from fastlora.modules import FastLoRALinear
from fastlora.ops import lora_linear
from fastlora.quant import QuantState, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"

__all__ = [
    "FastLoRALinear",
    "LoraConfig",
    "LoraModel",
    "QuantState",
    "__version__",
    "dequantize_4bit",
    "inject",
    "load",
    "lora_linear",
    "quantize_4bit",
]
