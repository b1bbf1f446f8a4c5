"""Model-level API: inject LoRA/QLoRA by module name, several adapters, merge, peft-compatible save/load."""

from fastlora.adapters.config import LoraConfig
from fastlora.adapters.model import LoraModel, inject, load
from fastlora.adapters.wrapper import ModulesToSave

__all__ = ["LoraConfig", "LoraModel", "ModulesToSave", "inject", "load"]
