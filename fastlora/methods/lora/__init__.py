"""LoRA/QLoRA on a whole model: inject by module name, several adapters, merge, peft-compatible save/load.

config.py: :class:`LoraConfig` (peft's fields); files.py: peft's file layout; model.py: :class:`LoraModel`,
:func:`inject`, :func:`load`. The layer itself is :class:`fastlora.modules.FastLoRALinear`.
"""

from fastlora.methods.lora.config import LoraConfig
from fastlora.methods.lora.files import PREFIX, read_lora_files, save_lora_files
from fastlora.methods.lora.model import LoraModel, inject, load

__all__ = ["PREFIX", "LoraConfig", "LoraModel", "inject", "load", "read_lora_files", "save_lora_files"]
