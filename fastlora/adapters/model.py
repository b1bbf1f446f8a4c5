"""Backward-compatibility shim: :class:`LoraModel`, :func:`inject` and :func:`load` live in
:mod:`fastlora.methods.lora.model`, the shared wrapper in :mod:`fastlora.methods.wrapper`."""

from fastlora.methods.lora.config import LoraConfig
from fastlora.methods.lora.model import LoraModel, inject, load
from fastlora.methods.wrapper import ModulesToSave, WrappedModel, set_module

__all__ = ["LoraConfig", "LoraModel", "ModulesToSave", "WrappedModel", "inject", "load", "set_module"]
