"""Backward-compatibility shim: the shared file I/O lives in :mod:`fastlora.methods.files`, LoRA's file layout in
:mod:`fastlora.methods.lora.files` (``save_adapter_files`` / ``read_adapter_files`` are its
``save_lora_files`` / ``read_lora_files``)."""

from fastlora.methods.files import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_files
from fastlora.methods.lora.files import PREFIX
from fastlora.methods.lora.files import read_lora_files as read_adapter_files
from fastlora.methods.lora.files import save_lora_files as save_adapter_files

__all__ = [
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "atomic_write",
    "read_adapter_files",
    "read_files",
    "save_adapter_files",
]
