"""The files every method writes: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's names), each
written to a temporary name in the same directory and renamed, so a save never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


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


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``tensors`` (any device, any layout) serialised as one safetensors blob (contiguous CPU copies)."""
    from safetensors.torch import save

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return save(data, metadata={"format": "pt", **(metadata or {})})


def write_json(path: str, content: dict[str, Any]) -> None:
    """``content`` as indented, key-sorted JSON at ``path``, atomically."""
    atomic_write(path, json.dumps(content, indent=2, sort_keys=True).encode())


def write_files(
    directory: str,
    config: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write both files of a saved method: the weights first, then the config (a directory whose config
    exists has its weights), each atomically."""
    atomic_write(os.path.join(directory, WEIGHTS_NAME), safetensors_bytes(tensors, metadata))
    write_json(os.path.join(directory, CONFIG_NAME), config)


def read_files(directory: str, what: str = "adapter") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The raw JSON config and the tensors of a saved directory (``adapter_config.json`` +
    ``adapter_model.safetensors``); a missing or unreadable file is a FileNotFoundError / ValueError naming it."""
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
    return raw, read_safetensors(weights_path)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; an unreadable file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"fastlora: {path} is not a readable safetensors file ({e})") from e
