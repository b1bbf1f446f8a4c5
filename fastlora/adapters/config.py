"""Backward-compatibility shim: :class:`LoraConfig` lives in :mod:`fastlora.methods.lora.config`."""

from fastlora.methods.lora.config import LoraConfig

__all__ = ["LoraConfig"]
