"""Parameter reports shared by every method: how many values train, and which tensors."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


def numel(p: torch.Tensor) -> int:
    """Values held by ``p``: a packed 4-bit (uint8) tensor holds 2 per byte, as peft counts them."""
    return p.numel() * (2 if p.dtype == torch.uint8 else 1)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of ``module``; a packed 4-bit (uint8) tensor counts its 2 values per byte."""
    trainable = total = 0
    for p in module.parameters():
        n = numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


@dataclasses.dataclass(frozen=True)
class TrainableReport:
    """What trains: ``trainable`` lists (parameter name, number of values); counts as in peft (a packed
    4-bit byte holds 2 values)."""

    trainable: tuple[tuple[str, int], ...]
    trainable_count: int
    total_count: int

    def __str__(self) -> str:
        width = max((len(name) for name, _ in self.trainable), default=0)
        lines = [f"  {name:<{width}}  {n:>12,d}" for name, n in self.trainable]
        return "\n".join([*lines, summary(self.trainable_count, self.total_count)])


def summary(trainable: int, total: int) -> str:
    """peft's one-line report: ``trainable params: ... || all params: ... || trainable%: ...``."""
    share = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"


def trainable_report(model: nn.Module) -> TrainableReport:
    """Names and sizes of the parameters of ``model`` that require grad."""
    params = list(model.named_parameters())
    trainable = tuple((name, numel(p)) for name, p in params if p.requires_grad)
    return TrainableReport(trainable, sum(n for _, n in trainable), sum(numel(p) for _, p in params))
