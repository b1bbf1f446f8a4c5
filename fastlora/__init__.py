"""fastlora: kernel-optimised LoRA/QLoRA for PyTorch."""

from fastlora.quant import QuantState, dequantize_4bit, quantize_4bit

__version__ = "0.1.0"

__all__ = ["QuantState", "__version__", "dequantize_4bit", "quantize_4bit"]
