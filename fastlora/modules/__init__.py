"""Thin nn.Modules over the ops: drop-in replacements for layers of any PyTorch model."""

from fastlora.modules.adapter import FastAdapter
from fastlora.modules.lora import FastLoRALinear, LoraAdapter

__all__ = ["FastAdapter", "FastLoRALinear", "LoraAdapter"]
