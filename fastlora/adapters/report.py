"""Trainable-parameter reports shared by every wrapped model (LoRA, adapters, prompts) and the trainer."""

from __future__ import annotations

import torch
from torch import nn


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of ``module``; a packed 4-bit (uint8) tensor counts its 2 values per byte."""
    trainable = total = 0
    for p in module.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


class ParameterReport:
    """``parameter_counts()`` and peft's ``print_trainable_parameters()`` for an ``nn.Module`` subclass."""

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; a packed 4-bit tensor counts its 2 values per byte."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.parameter_counts()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )
