"""Many adapters on one base: per-example adapters in one forward, adapter slots, training several adapters at
once, hot-swap. The logic behind ``LoraModel``'s thin methods (``adapter_slot``, ``mixed_batch``, ...).

Slots: every adapter NAME has one slot, an int in [0, S), the same in every layer (a layer the adapter does not
adapt holds zeros there). A new adapter takes the lowest free slot; deleting or unloading it frees the slot;
the slot count S never shrinks, so a layer's pool keeps its shapes (and compiled code its graph).

    out = model(input_ids, adapter_names=["a", "__base__", "b"])     # peft's spelling, one name per example
    out = model(input_ids, adapter_index=torch.tensor([0, -1, 1]))   # the same by slot (-1: the base)
    with model.mixed_batch(["a", "b", "a"]):                          # what both forms use
        out = model(input_ids)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator, Sequence

import torch

from fastlora.methods.fingerprint import check_integrity
from fastlora.methods.lora.files import PREFIX, read_lora_dir
from fastlora.methods.lora.targets import base_weights, lora_targets
from fastlora.methods.tensors import check_tensors
from fastlora.modules.lora_multi import MixedBatch, refresh_pool

BASE = "__base__"  # peft's name for "no adapter" in adapter_names


def slot_names(model) -> list[str | None]:
    """``names[slot]`` of ``model`` (None: a free slot), brought up to date with its adapters: names gone are
    freed, new ones take the lowest free slot (in the order they were added)."""
    names: list[str | None] = model.__dict__.setdefault("_slot_names", [])
    for i, name in enumerate(names):
        if name is not None and name not in model.peft_config:
            names[i] = None
    for name in model.peft_config:
        if name not in names:
            free = names.index(None) if None in names else len(names)
            names[free:free + 1] = [name]  # fmt: skip
    return names


def adapter_slot(model, name: str) -> int:
    """The slot of adapter ``name`` (KeyError naming the adapters if there is none)."""
    names = slot_names(model)
    if name not in model.peft_config:
        raise KeyError(f"fastlora: no adapter named {name!r} (have {list(model.peft_config)})")
    return names.index(name)


def adapter_slots(model) -> dict[str, int]:
    """{adapter name: slot} of every adapter."""
    return {name: slot for slot, name in enumerate(slot_names(model)) if name is not None}


def slot_index(model, idx_or_names, device: torch.device) -> torch.Tensor:
    """Per-example slots (B,) int32 on ``device`` from names (``"__base__"``: -1) or an int tensor of slots."""
    names = slot_names(model)
    if isinstance(idx_or_names, torch.Tensor):
        idx = idx_or_names
        if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f"fastlora: adapter_index must be a 1-D integer tensor (one slot per example), got "
                            f"{idx.dtype} of shape {tuple(idx.shape)}")  # fmt: skip
        if not torch.compiler.is_compiling() and idx.numel():  # a host sync: skipped inside compiled code
            low, high = int(idx.min()), int(idx.max())
            if low < -1 or high >= len(names) or (high >= 0 and names[high] is None):
                raise ValueError(f"fastlora: adapter_index holds slots in [{low}, {high}]; the slots are "
                                 f"{adapter_slots(model)} and -1 for the base")  # fmt: skip
        return idx.to(device=device, dtype=torch.int32)
    if isinstance(idx_or_names, str) or not isinstance(idx_or_names, Sequence) or not idx_or_names:
        raise TypeError(f"fastlora: adapter_names must be a non-empty list of adapter names (one per example, "
                        f"{BASE!r} for the base), got {idx_or_names!r}")  # fmt: skip
    slots = []
    for name in idx_or_names:
        if name != BASE and name not in model.peft_config:
            raise KeyError(f"fastlora: adapter_names names {name!r}; the adapters are {list(model.peft_config)} "
                           f"and {BASE!r} for the base")  # fmt: skip
        slots.append(-1 if name == BASE else names.index(name))
    return torch.tensor(slots, dtype=torch.int32, device=device)


def _check_mixable(model) -> None:
    for name, config in model.peft_config.items():
        if config.use_dora:
            raise NotImplementedError(f"fastlora: adapter {name!r} is DoRA; mixed-adapter batches take plain LoRA "
                                      "adapters only (delete it or use set_adapter)")  # fmt: skip
    saved = [path for path, module in model.saved_modules() if len(module.trained)]
    if saved:
        raise NotImplementedError(f"fastlora: mixed-adapter batches do not route modules_to_save per example "
                                  f"({saved[0]!r} is trained in full); use set_adapter")  # fmt: skip
    for path, layer in model.lora_layers():
        if layer.merged:
            raise RuntimeError(f"fastlora: {path} holds adapter {layer.active_adapter!r} merged into its base; "
                               "unmerge before a mixed-adapter batch")  # fmt: skip


@contextlib.contextmanager
def mixed_batch(model, idx_or_names) -> Iterator[MixedBatch]:
    """Within the block every forward of ``model`` runs example b with the adapter of slot ``idx[b]`` (-1: the
    base). ``idx_or_names``: a (B,) int tensor of slots or a list of B adapter names (``"__base__"``: the base).
    DoRA adapters, modules_to_save and merged layers are refused. Outside compiled code and with grad off,
    every layer's persistent pool is brought up to date on entry. With gradient checkpointing, call backward
    inside the block too (the recomputed forward must route the rows the same way; outside it raises)."""
    _check_mixable(model)
    layers = [layer for _, layer in model.lora_layers()]
    if not layers:
        raise RuntimeError("fastlora: the model has no LoRA layers to mix adapters in")
    names = tuple(slot_names(model))
    batch = MixedBatch(names, slot_index(model, idx_or_names, layers[0].weight.device))
    if not torch.compiler.is_compiling() and not torch.is_grad_enabled():
        for layer in layers:
            refresh_pool(layer, names, _compute_dtype(layer))
    previous = [layer._mixed_route for layer in layers]
    try:
        for layer in layers:
            layer._mixed_route = batch.route
        yield batch
    finally:
        for layer, route in zip(layers, previous, strict=True):
            layer._mixed_route = route


def _compute_dtype(layer) -> torch.dtype:
    return layer.quant_state.dtype if layer.quant_state is not None else layer.weight.dtype


def forward(model, *args, adapter_names=None, adapter_index=None, **kwargs):
    """The host's forward; with ``adapter_names`` (one name per example, ``"__base__"``: the base) or
    ``adapter_index`` ((B,) int tensor of slots, -1: the base) each example runs on its own adapter."""
    if adapter_names is not None and adapter_index is not None:
        raise ValueError("fastlora: pass adapter_names or adapter_index, not both")
    choice = adapter_names if adapter_names is not None else adapter_index
    if choice is None:
        return model.model(*args, **kwargs)
    with mixed_batch(model, choice):
        return model.model(*args, **kwargs)


def generate(model, *args, adapter_names=None, adapter_index=None, **kwargs):
    """The host's ``generate`` with per-example adapters (each prompt's rows, beams included, on its adapter)."""
    choice = adapter_names if adapter_names is not None else adapter_index
    if choice is None:
        return model.model.generate(*args, **kwargs)
    with mixed_batch(model, choice):
        return model.model.generate(*args, **kwargs)


def train_adapters(model, names: Sequence[str]) -> None:
    """Make exactly the LoRA factors (and modules_to_save copies) of adapters ``names`` trainable, every other
    adapter frozen; the active adapter is unchanged. Several adapters train at once in a mixed batch."""
    if isinstance(names, str):
        names = [names]
    for name in names:
        model._require(name)
    wanted = set(names)
    for _, layer in model.lora_layers():
        for slot_name, slot in layer.adapters.items():
            slot.requires_grad_(slot_name in wanted)
    for _, module in model.saved_modules():
        for copy_name, copy_ in module.trained.items():
            copy_.requires_grad_(copy_name in wanted)


def _resolve(model, slot_or_name) -> str:
    names = slot_names(model)
    if isinstance(slot_or_name, str):
        adapter_slot(model, slot_or_name)
        return slot_or_name
    slot = int(slot_or_name)
    if not 0 <= slot < len(names) or names[slot] is None:
        raise KeyError(f"fastlora: slot {slot} holds no adapter (slots: {adapter_slots(model)})")
    return names[slot]


def unload_slot(model, slot_or_name) -> None:
    """Free a slot: its adapter is deleted from every layer (the pools' slot reads zeros from the next forward)."""
    model.delete_adapter(_resolve(model, slot_or_name))
    slot_names(model)


@torch.no_grad()
def hot_swap(model, slot_or_name, directory: str, *, allow_base_mismatch: bool = False) -> None:
    """Load the adapter saved in ``directory`` (peft's layout) into an existing slot, keeping its name.

    Its ranks must be at most the slot's in every layer (a smaller rank is zero-padded: the same product) and
    its layers a subset of the slot's (the others read zero). The factors are written in place and the slot's
    scale follows the new alpha/rank, so no layer is re-injected and the persistent pools keep their tensors
    (no recompile of compiled mixed-batch code). A file that does not fit (names, shapes, ranks, targets, the
    integrity record or the base fingerprint) raises before anything changes. DoRA and modules_to_save refuse.
    """
    name = _resolve(model, slot_or_name)
    old = model.peft_config[name]
    config, tensors, record = read_lora_dir(directory)
    if config.use_dora or old.use_dora:
        raise NotImplementedError(f"fastlora: {directory}: hot-swap takes plain LoRA adapters (DoRA involved)")
    if config.modules_to_save:
        raise NotImplementedError(f"fastlora: {directory}: hot-swap cannot load modules_to_save "
                                  f"({config.modules_to_save}); use load_adapter")  # fmt: skip
    slot_layers = {path: layer for path, layer in model.lora_layers() if name in layer.adapters}
    targets = lora_targets(model.model, config)
    expected: dict[str, tuple[int, ...]] = {}
    for path, _ in targets:
        if path not in slot_layers:
            raise ValueError(f"fastlora: {directory}: adapts {path!r}, which slot {name!r} does not (its layers: "
                             f"{sorted(slot_layers)}); hot-swap needs the same targets or a subset")  # fmt: skip
        r, _ = config.r_and_alpha(path)
        slot_r = slot_layers[path].adapters[name].r
        if r > slot_r:
            raise ValueError(f"fastlora: {directory}: rank {r} at {path!r} is larger than slot {name!r}'s rank "
                             f"{slot_r}; hot-swap takes the same or a smaller rank")  # fmt: skip
        layer = slot_layers[path]
        expected[f"{PREFIX}{path}.lora_A.weight"] = (r, layer.in_features)
        expected[f"{PREFIX}{path}.lora_B.weight"] = (layer.out_features, r)
    check_tensors(expected, tensors, directory, owner=f"slot {name!r}")
    check_integrity(directory, record, base_weights(targets), allow_base_mismatch=allow_base_mismatch)
    ranks, alphas = {}, {}
    for path, layer in slot_layers.items():
        adapter = layer.adapters[name]
        adapter.lora_A.zero_()
        adapter.lora_B.zero_()
        if f"{PREFIX}{path}.lora_A.weight" in expected:
            r, alpha = config.r_and_alpha(path)
            adapter.lora_A[:r].copy_(tensors[f"{PREFIX}{path}.lora_A.weight"])
            adapter.lora_B[:, :r].copy_(tensors[f"{PREFIX}{path}.lora_B.weight"])
            adapter.scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
        # the slot's rank and an alpha that gives the same scale, so save() writes an equivalent adapter
        adapter.lora_alpha = adapter.scaling * (math.sqrt(adapter.r) if adapter.use_rslora else adapter.r)
        adapter.lora_dropout = config.lora_dropout
        ranks[path], alphas[path] = adapter.r, adapter.lora_alpha
        pool = layer.__dict__.get("_multi_pool")
        if pool is not None:
            refresh_pool(layer, tuple(slot_names(model)), pool.a.dtype)
    top = max(ranks.values())
    model.peft_config[name] = dataclasses.replace(
        config, r=top, lora_alpha=alphas[max(ranks, key=ranks.get)], use_rslora=old.use_rslora,
        target_modules=sorted(slot_layers), rank_pattern={re.escape(p): k for p, k in ranks.items()},
        alpha_pattern={re.escape(p): a for p, a in alphas.items()}, modules_to_save=None,
    )  # fmt: skip
