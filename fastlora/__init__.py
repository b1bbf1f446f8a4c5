"""fastlora: kernel-optimised LoRA/QLoRA for PyTorch."""

from fastlora.modules import FastLoRALinear
from fastlora.ops import lora_linear
from fastlora.quant import QuantState, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"

__all__ = ["FastLoRALinear", "QuantState", "__version__", "dequantize_4bit", "lora_linear", "quantize_4bit"]
