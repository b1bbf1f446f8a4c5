"""Padding-free packing of causal LM micro-batches: a micro-batch's examples laid end to end in rows, positions
restarting at 0 for each example, attention confined to each example, the loss that of the unpacked batch.

The model is called with ``input_ids`` and ``position_ids`` and no 2-D attention mask. transformers (5.x,
``masking_utils.find_packed_sequence_indices``) then reads each example's span from where the positions
restart and builds the causal mask within it for every attention implementation: eager and sdpa get a
block-diagonal causal mask, flash-attention its varlen path (``cu_seqlens`` from the positions). Llama, Qwen2,
Mistral and the models on the same masking code work so; encoders and classification (pooled per row) are
not packed.

Rows hold up to ``capacity`` tokens, the run's ``max_length`` (or the longest example, if longer): as many rows
as that needs, filled evenly, longest example first. The linear layers, most of a step's work, then see the
real tokens only (the embedded sentence set at batch 16: 22.1% of the padded positions are padding, 0.0%
packed; at batch 32: 26.8%, 0.2%). Attention on flash-attention's varlen path computes within each example
only; eager and sdpa compute the whole block-diagonal (rows × capacity²), so there a packed row of many short
examples costs more attention than the padded batch: ``capacity=None`` keeps rows to the longest example,
which never costs more. The few positions
left at a row's end are padding: a segment of their own (positions 0, 1, ...) without targets.

Each example's first label is ``IGNORE``, so the last token of one example never learns the first of the next;
the unpacked loss never has a target there either (the shift drops it), so the sum and the count of target
tokens are those of the unpacked batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastlora.train.data import IGNORE


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices per row: as many rows as ``capacity`` tokens per row need (``ceil(sum / capacity)``), each
    example, longest first, to the least filled row it fits in (a new row when none), so rows come out even.
    Every length must be <= ``capacity``. Deterministic (ties: the lower index)."""
    rows: list[list[int]] = [[] for _ in range(-(-sum(lengths) // capacity))]
    load = [0] * len(rows)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if load[r] + lengths[i] <= capacity]
        if not fits:
            rows.append([])
            load.append(0)
            fits = [len(rows) - 1]
        r = min(fits, key=lambda r: (load[r], r))
        rows[r].append(i)
        load[r] += lengths[i]
    return [row for row in rows if row]


def pack_batch(batch: dict[str, torch.Tensor], pad_id: int, capacity: int | None = None) -> dict[str, torch.Tensor]:
    """The packed form of a right-padded causal ``batch`` (``input_ids``, ``attention_mask``, ``labels`` (B, L)
    int64, as :func:`fastlora.train.data.collate` makes it): ``input_ids``, ``position_ids``, ``labels`` and
    ``attention_mask`` (1 on real tokens; for counting only, the model is not given it) (R, T) int64 with R <= B
    rows of at most ``capacity`` tokens (None or less than the longest example: the longest example), T the
    fullest row; and ``examples`` (0-d int64: B, which the rows no longer tell)."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    rows = pack_rows(lengths, max(max(lengths), capacity or 0))
    width = max(sum(lengths[i] for i in row) for row in rows)
    out_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    out_labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    out_pos = torch.zeros((len(rows), width), dtype=torch.long)
    out_mask = torch.zeros((len(rows), width), dtype=torch.long)
    steps = torch.arange(width)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            out_ids[r, at : at + n] = ids[i, :n]
            out_labels[r, at + 1 : at + n] = labels[i, 1:n]  # the first stays IGNORE: no target across examples
            out_pos[r, at : at + n] = steps[:n]
            out_mask[r, at : at + n] = 1
            at += n
        out_pos[r, at:] = steps[: width - at]  # the padding: a segment of its own
    return {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels, "position_ids": out_pos,
            "examples": torch.tensor(len(lengths))}  # fmt: skip


class Packer:
    """The micro-batches of a run, packed when ``on`` into rows of ``capacity`` tokens, with the count of their
    padding: ``tokens`` (real), ``padded`` (positions of the padded batches), ``trained`` (positions of the
    batches as trained)."""

    def __init__(self, on: bool, pad_id: int, capacity: int | None = None) -> None:
        self.on, self.pad_id, self.capacity = on, pad_id, capacity
        self.tokens = self.padded = self.trained = 0

    def __call__(self, batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        for batch in batches:
            self.tokens += int(batch["attention_mask"].sum())
            self.padded += batch["input_ids"].numel()
            if self.on:
                batch = pack_batch(batch, self.pad_id, self.capacity)
            self.trained += batch["input_ids"].numel()
            yield batch

    def line(self) -> str | None:
        """What packing saved, for the run's end: the padding share of the padded and of the trained batches."""
        if not self.padded:
            return None
        padded = f"fastlora: padding {1 - self.tokens / self.padded:.1%} of the padded batches' positions"
        if not self.on:
            return padded + " (not packed)"
        return padded + f", {1 - self.tokens / self.trained:.1%} packed"
