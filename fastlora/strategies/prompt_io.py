"""Backward-compatibility shim: saving and loading prompts live in :mod:`fastlora.methods.prompt` (files.py for
peft's layout, :meth:`PromptModel.save` / :meth:`PromptModel.load` for the files)."""

from __future__ import annotations

from typing import Any

from fastlora.methods.prompt import PromptModel, load_prompt


def peft_config_dict(model: PromptModel) -> dict[str, Any]:
    """The adapter_config.json content of ``model``: :meth:`PromptModel.to_peft_dict`."""
    return model.to_peft_dict()


def save_prompt(model: PromptModel, directory: str) -> None:
    """Write ``model``'s prompt files: :meth:`PromptModel.save`."""
    model.save(directory)


__all__ = ["load_prompt", "peft_config_dict", "save_prompt"]
