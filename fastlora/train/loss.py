"""The forward and the loss of a micro-batch; losses as sums, so a step can average over all its examples or
tokens on all ranks."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from fastlora.train.data import IGNORE


def forward_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None, task: str
) -> torch.Tensor:
    """``model``'s logits for ``batch`` (``input_ids``/``attention_mask`` (B, L) int64, moved to ``device``)
    under autocast to ``dtype`` (None: none), as fp32: (B, C) for "classification", (B, L, V) for "causal"
    (a prompt method's virtual positions, which come first, dropped)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits if hasattr(out, "logits") else out[0]
    if task == "causal":
        logits = logits[:, -batch["input_ids"].shape[1] :]
    return logits.float()


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, int]:
    """(sum of the per-example or per-token cross-entropies, how many) of one micro-batch.

    ``task`` "classification": ``logits`` (B, C) float, ``labels`` (B,) int64. "causal": ``logits``
    (B, L, V) float, ``labels`` (B, L) int64 with ``IGNORE`` outside the response; position t predicts
    token t + 1. The sum is a 0-d tensor of ``logits``' dtype that backward can run through.
    """
    labels = labels.to(logits.device)
    if task == "classification":
        return F.cross_entropy(logits, labels, reduction="sum"), labels.numel()
    shifted, targets = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")  # fmt: skip
    return loss, int((targets != IGNORE).sum())


def loss_count(labels: torch.Tensor, task: str) -> int:
    """How many terms :func:`loss_sum` adds for ``labels`` ((B,) or (B, L) int64): examples, or response
    tokens after the shift. Known before the forward, so a step's total can be summed over ranks first."""
    if task == "classification":
        return len(labels)
    return int((labels[:, 1:] != IGNORE).sum())
