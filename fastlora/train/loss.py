"""The forward and the loss of a micro-batch; losses as sums, so a step can average over all its examples or
tokens on all ranks."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from fastlora.train.chunked_ce import head_bypassed, linear_cross_entropy_sum, plain_head
from fastlora.train.data import IGNORE


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """What the model is called with: ``input_ids`` and ``attention_mask``, or for a packed batch (one holding
    ``position_ids``, :mod:`fastlora.train.packing`) ``input_ids`` and ``position_ids`` and no 2-D mask, so that
    transformers confines attention to each example from the restarting positions (which it reads only without
    a KV cache: ``use_cache=False``)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
                "use_cache": False}  # fmt: skip
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def _run(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None,
         task: str) -> torch.Tensor:  # fmt: skip
    """The model's first output (logits, or hidden states with the head bypassed) under autocast to ``dtype``,
    a causal LM's virtual prompt positions dropped."""
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with ctx:
        out = model(**model_inputs(batch, device))
    first = out.logits if hasattr(out, "logits") else out[0]
    return first[:, -batch["input_ids"].shape[1] :] if task == "causal" else first


def forward_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None, task: str
) -> torch.Tensor:
    """``model``'s logits for ``batch`` (``input_ids``/``attention_mask`` (B, L) int64, or a packed batch's
    ``input_ids``/``position_ids``, moved to ``device``) under autocast to ``dtype`` (None: none), as fp32:
    (B, C) for "classification", (B, L, V) for "causal" (a prompt method's virtual positions, which come first,
    dropped)."""
    return _run(model, batch, device, dtype, task).float()


def chunked_causal_loss_sum(
    model: nn.Module,
    train_model: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, int] | None:
    """:func:`loss_sum` of a causal batch by the chunked linear cross-entropy (no [tokens, vocab] logits,
    :mod:`fastlora.train.chunked_ce`): ``train_model`` (``model``, or DDP around it) runs with ``model``'s
    output head bypassed. None when ``model``'s head is not a plain linear one (the caller takes the plain
    path). ``chunk``: tokens per chunk (None: 256 MiB of fp32 logits)."""
    head = plain_head(model)
    if head is None:
        return None
    with head_bypassed(model):
        hidden = _run(train_model, batch, device, dtype, "causal")
    compute = dtype if dtype is not None else torch.promote_types(hidden.dtype, head.weight.dtype)
    return linear_cross_entropy_sum(hidden, head.weight, head.bias, batch["labels"], chunk=chunk,
                                    compute_dtype=compute)  # fmt: skip


def batch_loss(
    model: nn.Module,
    train_model: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None,
    task: str,
    *,
    chunked: bool = True,
    chunk: int | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(loss sum, terms, logits or None) of a micro-batch run by ``train_model`` (``model`` or DDP around it): a
    causal LM's by the chunked linear cross-entropy when ``chunked`` and the head allows (no logits), else
    :func:`forward_logits` and :func:`loss_sum`."""
    if task == "causal" and chunked:
        out = chunked_causal_loss_sum(model, train_model, batch, device, dtype, chunk)
        if out is not None:
            return (*out, None)
    logits = forward_logits(train_model, batch, device, dtype, task)
    return (*loss_sum(logits, batch["labels"], task), logits)


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
