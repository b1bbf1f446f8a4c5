"""Ops: ``torch.library`` custom ops that choose a kernel per device, with autograd and fake shapes."""

from fastlora.ops.adapter import adapter_forward
from fastlora.ops.lora import lora_linear

__all__ = ["adapter_forward", "lora_linear"]
