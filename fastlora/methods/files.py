"""The files every method writes: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's names), each
written to a temporary name in the same directory and renamed, so a save never leaves a half-written file.

Beside them fastlora writes ``fastlora_integrity.json``: the sha256 and size of the tensor file and, where the
method gives one, the fingerprint of the base the adapter was trained on (:mod:`fastlora.methods.fingerprint`)::

    {"format": 1, "files": {"adapter_model.safetensors": {"sha256": "…", "bytes": 123}}, "base_fingerprint": {…}}

On load a tensor file whose bytes do not hash to the recorded sha256 is an error naming it (flipped bytes in
tensor data used to load silently). The record is a file of its own, not a key of adapter_config.json,
because peft before 0.13 refuses a config with an unknown key (TypeError) and later versions warn about it;
peft never reads this file. A directory without it (peft's, or fastlora's before issue 18) loads unchecked.
The config is not covered: people edit it (base_model_name_or_path), and its fields are checked anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
INTEGRITY_NAME = "fastlora_integrity.json"  # checksums and base fingerprint (see the module docstring)
INTEGRITY_FORMAT = 1


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
    *,
    base_fingerprint: dict[str, Any] | None = None,
) -> None:
    """Write the files of a saved method, each atomically: the integrity record (the weights' sha256 and
    ``base_fingerprint``), the weights, then the config (a directory whose config exists has its weights).
    The record goes first: a crash before the new weights are in place leaves a record that the old
    weights do not match, which a load reports instead of loading a half-finished save."""
    blob = safetensors_bytes(tensors, metadata)
    record: dict[str, Any] = {"format": INTEGRITY_FORMAT, "files": {WEIGHTS_NAME: file_entry(blob)}}
    if base_fingerprint is not None:
        record["base_fingerprint"] = base_fingerprint
    write_json(os.path.join(directory, INTEGRITY_NAME), record)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), blob)
    write_json(os.path.join(directory, CONFIG_NAME), config)


def file_entry(data: bytes) -> dict[str, Any]:
    """The integrity record of one file: its sha256 (hex) and size in bytes."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def read_integrity(directory: str) -> dict[str, Any] | None:
    """The integrity record of a saved directory (None without one, e.g. peft's); a malformed one is a
    ValueError naming it."""
    path = os.path.join(directory, INTEGRITY_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"fastlora: {path} is not valid JSON ({e}); save the adapter again") from e
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
        for e in files.values()
    ):
        raise ValueError(f"fastlora: {path} must hold files: {{name: {{sha256, bytes}}}} (found {record!r:.120})")
    return record


def verify_files(directory: str, record: dict[str, Any] | None) -> None:
    """Check every file the integrity record lists against its recorded size and sha256 (read in 1 MiB
    chunks); a mismatch is a ValueError naming the file."""
    for name, entry in (record or {}).get("files", {}).items():
        path = os.path.join(directory, name)
        if os.path.basename(name) != name or not os.path.isfile(path):
            raise FileNotFoundError(f"fastlora: {path}, listed in {INTEGRITY_NAME}, does not exist")
        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
            found = f"{size} bytes, sha256 {digest.hexdigest()[:16]}…"
            saved = f"{entry['bytes']} bytes, sha256 {entry['sha256'][:16]}…"
            raise ValueError(
                f"fastlora: {path} is damaged or was changed after saving: {found}, but {INTEGRITY_NAME} "
                f"records {saved}. Save or copy the adapter again (to accept a file changed on purpose, "
                f"delete {INTEGRITY_NAME})"
            )


def read_files(directory: str, what: str = "adapter") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The raw JSON config and the tensors of a saved directory (``adapter_config.json`` +
    ``adapter_model.safetensors``); a missing, unreadable or damaged file (its sha256 differs from the
    integrity record's) is a FileNotFoundError / ValueError naming it."""
    raw, tensors, record = read_saved(directory, what)
    verify_files(directory, record)
    return raw, tensors


def read_saved(
    directory: str, what: str = "adapter"
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """The raw config, the tensors and the integrity record (None: none, e.g. peft's) of a saved directory,
    not yet verified: a loader checks names and shapes first (a more specific error), then calls
    :func:`~fastlora.methods.fingerprint.check_integrity` before it touches the model."""
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
    return raw, read_safetensors(weights_path), read_integrity(directory)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; an unreadable file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"fastlora: {path} is not a readable safetensors file ({e})") from e
