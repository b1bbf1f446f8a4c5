"""LoRA files in peft's layout: ``adapter_config.json`` (:class:`LoraConfig`) + ``adapter_model.safetensors``.

Keys follow peft: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` for the factors,
``base_model.model.<module path>.<param>`` for modules trained in full. Beside them fastlora's integrity
record (the weights' sha256 and the base fingerprint, see :mod:`fastlora.methods.files`), which peft ignores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from fastlora.methods.files import CONFIG_NAME, WEIGHTS_NAME, read_saved, verify_files, write_files
from fastlora.methods.lora.config import LoraConfig

PREFIX = "base_model.model."


def save_lora_files(
    directory: str,
    config: LoraConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    base_fingerprint: dict[str, Any] | None = None,
) -> None:
    """Write the files of a LoRA adapter directory, each atomically: the integrity record (the weights'
    sha256 and ``base_fingerprint``), the weights, the config."""
    write_files(directory, config.to_peft_dict(), tensors, base_fingerprint=base_fingerprint)


def read_lora_files(directory: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and validate a LoRA adapter directory; each problem is a ValueError or FileNotFoundError naming the file
    (a tensor file whose sha256 differs from the integrity record's included)."""
    config, tensors, record = read_lora_dir(directory)
    verify_files(directory, record)
    return config, tensors


def read_lora_dir(directory: str) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, Any] | None]:
    """The config, the tensors and the integrity record (None: none, e.g. peft's; not verified yet, see
    :func:`~fastlora.methods.files.read_saved`) of a LoRA adapter directory."""
    raw, tensors, record = read_saved(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    config = LoraConfig.from_peft_dict(raw, where=config_path)
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        raise ValueError(f"fastlora: {weights_path}: key {bad[0]!r} does not start with {PREFIX!r} (peft's layout)")
    return config, tensors, record
