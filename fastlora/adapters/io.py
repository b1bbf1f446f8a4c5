"""Adapter files in peft's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow peft: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` for LoRA
factors, ``base_model.model.<module path>.<param>`` for modules trained in full. Files are written
to a temporary name in the same directory, then renamed: a save never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from fastlora.adapters.config import LoraConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter_files(directory: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write both files of an adapter directory atomically (weights first, then the config)."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write(os.path.join(directory, WEIGHTS_NAME), blob)
    config.save(os.path.join(directory, CONFIG_NAME))


def read_files(directory: str, what: str = "adapter") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The raw JSON config and the tensors of a saved directory (``adapter_config.json`` +
    ``adapter_model.safetensors``); a missing or unreadable file is a FileNotFoundError / ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"fastlora: {what} file {path} does not exist")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"fastlora: {config_path} is not valid JSON ({e})") from e
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"fastlora: {weights_path} is not a readable safetensors file ({e})") from e
    return raw, tensors


def read_adapter_files(directory: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and validate a LoRA adapter directory; each problem is a ValueError or FileNotFoundError naming the file."""
    raw, tensors = read_files(directory)
    config = LoraConfig.from_peft_dict(raw, where=os.path.join(directory, CONFIG_NAME))
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        raise ValueError(f"fastlora: {weights_path}: key {bad[0]!r} does not start with {PREFIX!r} (peft's layout)")
    return config, tensors
