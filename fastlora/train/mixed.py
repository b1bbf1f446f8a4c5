"""Mixed-job batches for :mod:`fastlora.train.multijob`: the micro-batches of several jobs laid into one batch, the
model run with each row through its own job's adapter, and each job's parameters.

The per-row routing of the LoRA layers is :meth:`LoraModel.mixed_batch` (``fastlora.methods.lora.multi``: the grouped
op, one pass over the frozen base for every job). Where a model lacks it, :func:`reference_mixed` runs each layer once
per job on that job's rows (the same result, one base pass per job and layer). A classifier's head, trained per
adapter (``modules_to_save``), is routed per row here in either case (:func:`routed_saved_modules`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fastlora.train.chunked_ce import head_bypassed, linear_cross_entropy_sum, plain_head
from fastlora.train.data import IGNORE
from fastlora.train.loss import _run, loss_sum

Batch = dict[str, torch.Tensor]


def concat_batches(parts: list[Batch], pad_id: int) -> tuple[Batch, torch.Tensor]:
    """One batch of the micro-batches ``parts`` (one per job, as :func:`fastlora.train.data.collate` or
    :func:`fastlora.train.packing.pack_batch` make them), rows in order, each right-padded to the widest:
    ``input_ids`` with ``pad_id``, ``attention_mask`` with 0, causal ``labels`` with ``IGNORE``, ``position_ids``
    (packed) with a segment of its own (0, 1, ...); and ``slots`` (R,) int64: the index in ``parts`` of each row."""
    width = max(p["input_ids"].shape[1] for p in parts)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    out: Batch = {}
    for key in parts[0]:
        if key == "examples":
            out[key] = torch.tensor(sum(int(p.get(key, len(p["input_ids"]))) for p in parts))
            continue
        pieces = []
        for p in parts:
            t = p[key]
            if t.ndim == 2 and t.shape[1] < width:
                extra = width - t.shape[1]
                if key == "position_ids":
                    pad = torch.arange(extra, dtype=t.dtype).expand(t.shape[0], extra)
                else:
                    pad = torch.full((t.shape[0], extra), fill[key], dtype=t.dtype)
                t = torch.cat([t, pad], 1)
            pieces.append(t)
        out[key] = torch.cat(pieces, 0)
    slots = torch.cat([torch.full((len(p["input_ids"]),), i, dtype=torch.long) for i, p in enumerate(parts)])
    return out, slots


def mixed_loss_sums(model: nn.Module, batch: Batch, slots: torch.Tensor, names: list[str], device: torch.device,
                    dtype: torch.dtype | None, task: str, chunked: int | bool | None = None) -> list:  # fmt: skip
    """One forward of ``batch`` (on ``device`` under autocast to ``dtype``), row ``i`` through adapter
    ``names[slots[i]]``; per name (loss sum over its rows (0-d, differentiable), terms, its logits or None).
    A causal LM's loss by the chunked linear cross-entropy from the hidden states unless ``chunked`` is False
    (else: tokens per chunk, None for the default), as :func:`fastlora.train.loss.batch_loss`."""
    rows = [(slots == i).nonzero().squeeze(1) for i in range(len(names))]
    at = [r.to(device) for r in rows]
    labels = batch["labels"]
    with mixed(model, names, slots):
        head = plain_head(model) if task == "causal" and chunked is not False else None
        if head is not None:
            with head_bypassed(model):
                hidden = _run(model, batch, device, dtype, "causal")
            compute = dtype if dtype is not None else torch.promote_types(hidden.dtype, head.weight.dtype)
            return [(*linear_cross_entropy_sum(hidden[a], head.weight, head.bias, labels[r], chunk=chunked,
                                               compute_dtype=compute), None)
                    for r, a in zip(rows, at, strict=True)]  # fmt: skip
        logits = _run(model, batch, device, dtype, task).float()
        return [(*loss_sum(logits[a], labels[r], task), logits[a]) for r, a in zip(rows, at, strict=True)]


def job_parameters(model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything adapter ``name`` of LoraModel ``model`` trains: its LoRA factors in every
    layer it targets and its copies of the modules trained beside it (a classifier's head)."""
    out = []
    for path, layer in model.lora_layers():
        if name in layer.adapters:
            out += [(f"{path}.{n}", p) for n, p in layer.adapters[name].named_parameters()]
    for path, module in model.saved_modules():
        if name in module.trained:
            out += [(f"{path}.{n}", p) for n, p in module.trained[name].named_parameters()]
    return out


def train_only(model: nn.Module, names: list[str], every: list[str]) -> None:
    """Adapters ``names`` of ``every`` train (``requires_grad``), the others are frozen: a stopped job gets no
    gradient, so the optimiser leaves its parameters (and their moments) as they are."""
    if hasattr(model, "train_adapters"):
        model.train_adapters(names)
    for name in every:
        for _, p in job_parameters(model, name):
            p.requires_grad_(name in names)


@contextlib.contextmanager
def mixed(model: nn.Module, names: list[str], slots: torch.Tensor, *, grouped: bool = True) -> Iterator[None]:
    """Within the block, row ``i`` of the model's input goes through adapter ``names[slots[i]]`` (``slots`` (B,)
    int64, one per row of ``input_ids``): the LoRA layers by the grouped op (:func:`grouped_layers`) when
    ``grouped`` and the model has it, else by :func:`reference_mixed`; the modules trained beside the adapters
    (a classifier's head) by :func:`routed_saved_modules`."""
    layers = grouped_layers(model, names, slots) if grouped else None
    with layers or reference_mixed(model, names, slots), routed_saved_modules(model, names, slots):
        yield


def grouped_layers(model: nn.Module, names: list[str], slots: torch.Tensor):
    """:meth:`LoraModel.mixed_batch` for per-row ``slots`` into ``names`` (None where the model has no such API).
    A model with ``modules_to_save`` copies (which ``mixed_batch`` refuses: it routes the LoRA layers only) gets
    the same per-row route of its LoRA layers set directly (:class:`fastlora.modules.lora_multi.MixedBatch`)."""
    if not (hasattr(model, "mixed_batch") and hasattr(model, "adapter_slot")):
        return None
    table = torch.tensor([model.adapter_slot(n) for n in names], dtype=torch.long)
    index = table[slots].to(next(p.device for p in model.parameters()))
    if not any(len(module.trained) for _, module in model.saved_modules()):
        return model.mixed_batch(index)
    from fastlora.methods.lora.multi import slot_names
    from fastlora.modules.lora_multi import MixedBatch

    return _routed([layer for _, layer in model.lora_layers()], MixedBatch(slot_names(model), index).route)


@contextlib.contextmanager
def _routed(layers: list[nn.Module], route) -> Iterator[None]:
    """``route`` as every layer's ``_mixed_route`` within the block (the previous one back after it)."""
    previous = [layer._mixed_route for layer in layers]
    for layer in layers:
        layer._mixed_route = route
    try:
        yield
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer._mixed_route = old


def _by_rows(x: torch.Tensor, slots: torch.Tensor, names: list[str], run) -> torch.Tensor:
    """``run(name, rows of x)`` for each name's rows of ``x`` (leading dim: the batch), put back in place."""
    slots = slots.to(x.device)
    out = None
    for i, name in enumerate(names):
        rows = (slots == i).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        y = run(name, x.index_select(0, rows))
        if out is None:
            out = y.new_zeros((x.shape[0], *y.shape[1:]))
        out = out.index_copy(0, rows, y)
    return out


@contextlib.contextmanager
def reference_mixed(model: nn.Module, names: list[str], slots: torch.Tensor) -> Iterator[None]:
    """Per-row adapters by running each LoRA layer once per name on that name's rows (a layer the adapter does not
    target: the base alone); the spec the grouped :meth:`LoraModel.mixed_batch` computes in one pass."""
    layers = [layer for _, layer in model.lora_layers()]

    def route(layer, x):
        def run(name, rows):
            previous = layer.active_adapter
            layer._mixed_route, layer.active_adapter = None, name if name in layer.adapters else None
            try:
                return layer(rows)
            finally:
                layer._mixed_route, layer.active_adapter = route, previous

        return _by_rows(x, slots, names, run)

    with _routed(layers, route):
        yield


@contextlib.contextmanager
def routed_saved_modules(model: nn.Module, names: list[str], slots: torch.Tensor) -> Iterator[None]:
    """Within the block each module trained beside the adapters (``modules_to_save``: a classifier's head) runs its
    row ``i`` through adapter ``names[slots[i]]``'s copy (the original where that adapter has none)."""
    modules = [module for _, module in model.saved_modules()]

    def routed(module):
        def forward(x, *args, **kwargs):
            def run(name, rows):
                copy = module.trained[name] if name in module.trained and not module.disabled else module.original
                return copy(rows, *args, **kwargs)

            return _by_rows(x, slots, names, run)

        return forward

    for module in modules:
        module.forward = routed(module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward
