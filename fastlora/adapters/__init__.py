"""Backward-compatibility shim: the LoRA model layer lives in :mod:`fastlora.methods.lora`, the code every wrapped
model shares in :mod:`fastlora.methods` (wrapper.py, files.py). Old imports keep working; nothing inside fastlora
imports this package."""

from fastlora.adapters import config, io, model, wrapper
from fastlora.methods.lora import LoraConfig, LoraModel, inject, load
from fastlora.methods.wrapper import ModulesToSave

__all__ = ["LoraConfig", "LoraModel", "ModulesToSave", "config", "inject", "io", "load", "model", "wrapper"]
