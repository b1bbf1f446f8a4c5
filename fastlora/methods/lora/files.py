"""LoRA files in peft's layout: ``adapter_config.json`` (:class:`LoraConfig`) + ``adapter_model.safetensors``.

Keys follow peft: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` for the factors,
``base_model.model.<module path>.<param>`` for modules trained in full.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from fastlora.methods.files import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_files, safetensors_bytes
from fastlora.methods.lora.config import LoraConfig

PREFIX = "base_model.model."


def save_lora_files(directory: str, config: LoraConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write both files of a LoRA adapter directory atomically (weights first, then the config)."""
    atomic_write(os.path.join(directory, WEIGHTS_NAME), safetensors_bytes(tensors))
    config.save(os.path.join(directory, CONFIG_NAME))


def read_lora_files(directory: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and validate a LoRA adapter directory; each problem is a ValueError or FileNotFoundError naming the file."""
    raw, tensors = read_files(directory)
    config = LoraConfig.from_peft_dict(raw, where=os.path.join(directory, CONFIG_NAME))
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        raise ValueError(f"fastlora: {weights_path}: key {bad[0]!r} does not start with {PREFIX!r} (peft's layout)")
    return config, tensors
