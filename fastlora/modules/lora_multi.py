"""The mixed-adapter forward of one :class:`~fastlora.modules.lora.FastLoRALinear`: every row of a batch with its
own adapter, in one op over the layer's adapter pool.

A model-wide :class:`MixedBatch` names the adapter of every slot (the same slot in every layer) and holds the
per-example slot indices (B,) (-1: the bare base). While it runs, each LoRA layer's ``_mixed_route`` is
``batch.route``: :func:`mixed_forward` expands the per-example indices to the layer input's rows, gathers the
layer's pool and calls :func:`fastlora.ops.lora_multi.lora_linear_multi`:

    y[m] = x[m] Wᵀ + b + scales[i] · d_i(x[m]) A_iᵀ B_iᵀ,   i = idx[m]   (no LoRA term when i == -1)

The pool of one layer: ``pool_a`` (S, R, K), ``pool_b`` (S, N, R) in the compute dtype, ``scales`` (S,) and
``dropout`` (S,) fp32; R the largest rank of the slots, a slot of rank r < R zero-padded (A rows r.., B columns
r..); a slot whose adapter does not adapt this layer (or a free slot) is all zeros with scale 0.

- When a gradient is needed (grad mode on and some slot's factors require grad), the pool is built from the
  slots' own parameters in every forward (pad + stack, differentiable): each adapter keeps its nn.Parameters.
- Otherwise the layer keeps a persistent pool (:class:`LayerPool`), grown on demand (slots, rank), each slot
  rewritten in place when its adapter's factors change (tensor ``_version``) or a hot-swap writes it; its
  tensors keep their identity, so compiled code that reads them sees the new values without recompiling.
  Under ``torch.compile`` the staleness check is skipped (it reads ``_version``): the pool is used as it
  stands, so prepare it eagerly (:func:`refresh_pool`, done by ``LoraModel.mixed_batch`` outside compiled code).

Defined cases: a disabled layer (``LoraModel.disable()``) is its base for every row; a merged layer, a DoRA slot
and a slot whose adapter is not in this layer's pool refuse or read as zero as documented on each function.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from fastlora.modules.dora import is_dora
from fastlora.ops.lora import lora_linear
from fastlora.ops.lora_multi import lora_linear_multi


class MixedBatch:
    """One mixed-adapter batch: ``names[slot]`` the adapter of each slot (None: a free slot), ``index`` (B,) int
    the slot of each example (-1: the base). ``route`` is the callable set as every layer's ``_mixed_route``
    (one object per batch, so compiled code that reads it meets the same object on every call)."""

    def __init__(self, names: Sequence[str | None], index: torch.Tensor) -> None:
        self.names = tuple(names)
        self.index = index
        self.route = functools.partial(mixed_forward, self)


class LayerPool:
    """A layer's persistent no-grad pool: ``a`` (S, R, K), ``b`` (S, N, R), ``scales``/``dropout`` (S,) fp32 and
    per slot the key of what was written (adapter name, factor identities and versions, scale)."""

    def __init__(self, slots: int, rank: int, layer: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.a = torch.zeros(slots, rank, layer.in_features, dtype=dtype, device=device)
        self.b = torch.zeros(slots, layer.out_features, rank, dtype=dtype, device=device)
        self.scales = torch.zeros(slots, dtype=torch.float32, device=device)
        self.dropout = torch.zeros(slots, dtype=torch.float32, device=device)
        self.keys: list[tuple | None] = [None] * slots
        # the fast staleness check: (slot names, the layer's adapter modules, their scales and dropouts, dtype) as of
        # the last refresh, the factors written and their versions then (a changed parameter bumps its version)
        self.state: tuple | None = None
        self.watch: list[torch.Tensor] = []
        self.versions: list[int] = []
        self.any_dropout = False

    def current(self, state: tuple) -> bool:
        return self.state == state and self.writable() and [t._version for t in self.watch] == self.versions

    def fits(self, slots: int, rank: int, dtype: torch.dtype, device: torch.device) -> bool:
        a = self.a
        return a.shape[0] >= slots and a.shape[1] >= rank and a.dtype == dtype and a.device == device

    def writable(self) -> bool:
        """False for a pool made under inference_mode, now outside it (cannot be written in place: a new one)."""
        return not self.a.is_inference() or torch.is_inference_mode_enabled()


def _slot_adapters(layer: nn.Module, names: Sequence[str | None]) -> list:
    """The layer's adapter of every slot (None where the slot is free or its adapter does not adapt this layer)."""
    out = []
    for name in names:
        adapter = layer.adapters[name] if name is not None and name in layer.adapters else None
        if adapter is not None and is_dora(adapter):
            raise NotImplementedError(
                f"fastlora: adapter {name!r} is DoRA; mixed-adapter batches take plain LoRA adapters only "
                "(DoRA's per-row magnitude normalisation is not in the grouped op)"
            )
        out.append(adapter)
    return out


def _key(name: str | None, adapter) -> tuple | None:
    if adapter is None:
        return None
    a, b = adapter.lora_A, adapter.lora_B
    return (name, id(a), a._version, id(b), b._version, adapter.scaling, adapter.lora_dropout)


@torch.no_grad()
def _write_slot(pool: LayerPool, slot: int, adapter) -> None:
    pool.a[slot].zero_()
    pool.b[slot].zero_()
    if adapter is None:
        pool.scales[slot] = 0.0
        pool.dropout[slot] = 0.0
        return
    r = adapter.r
    pool.a[slot, :r].copy_(adapter.lora_A)
    pool.b[slot, :, :r].copy_(adapter.lora_B)
    pool.scales[slot] = adapter.scaling
    pool.dropout[slot] = adapter.lora_dropout


def refresh_pool(layer: nn.Module, names: Sequence[str | None], dtype: torch.dtype) -> LayerPool:
    """The layer's persistent pool for slots ``names`` in ``dtype``, up to date: built or grown (slots, rank) if
    it does not fit, else only the slots whose adapter changed rewritten in place. Returns it.

    The common case (nothing changed since the last call) costs one pass over the factors' versions."""
    names = tuple(names)
    mods = tuple(layer.adapters._modules.values())
    state = (names, mods, tuple((m.scaling, m.lora_dropout) for m in mods), dtype)
    pool = layer.__dict__.get("_multi_pool")
    if pool is not None and pool.current(state):
        return pool
    adapters = _slot_adapters(layer, names)
    rank = max([a.r for a in adapters if a is not None], default=1)
    device = layer.weight.device
    if pool is None or not pool.fits(len(names), rank, dtype, device) or not pool.writable():
        slots = max(len(names), pool.a.shape[0] if pool is not None else 0)
        rank = max(rank, pool.a.shape[1] if pool is not None else 0)
        pool = LayerPool(slots, rank, layer, dtype, device)
        layer.__dict__["_multi_pool"] = pool  # a plain attribute: no state-dict keys, not a module
    for slot in range(pool.a.shape[0]):
        adapter = adapters[slot] if slot < len(adapters) else None
        key = _key(names[slot] if slot < len(names) else None, adapter)
        if pool.keys[slot] != key:
            _write_slot(pool, slot, adapter)
            pool.keys[slot] = key
    pool.watch = [t for a in adapters if a is not None for t in (a.lora_A, a.lora_B)]
    pool.versions = [t._version for t in pool.watch]
    pool.any_dropout = any(a is not None and a.lora_dropout > 0 for a in adapters)
    pool.state = state
    return pool


def _grad_pool(adapters: list, layer: nn.Module, dtype: torch.dtype, device: torch.device):
    """(a, b, scales, dropout) stacked from the slots' own parameters, differentiable, R = the largest rank."""
    rank = max([a.r for a in adapters if a is not None], default=1)
    k, n = layer.in_features, layer.out_features
    a_rows, b_rows = [], []
    for adapter in adapters:
        if adapter is None:
            a_rows.append(torch.zeros(rank, k, dtype=dtype, device=device))
            b_rows.append(torch.zeros(n, rank, dtype=dtype, device=device))
        else:
            pad = rank - adapter.r
            a_rows.append(nn.functional.pad(adapter.lora_A.to(dtype), (0, 0, 0, pad)))
            b_rows.append(nn.functional.pad(adapter.lora_B.to(dtype), (0, pad)))
    scales = [a.scaling if a is not None else 0.0 for a in adapters]
    dropout = [a.lora_dropout if a is not None else 0.0 for a in adapters]
    as_tensor = functools.partial(torch.tensor, dtype=torch.float32, device=device)
    return torch.stack(a_rows), torch.stack(b_rows), as_tensor(scales), as_tensor(dropout)


def rows_index(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-example slots (B,) -> per-row slots (M,) int32 of x (B, ..., K) flattened to (M, K): each example's
    rows are consecutive (x's leading dimension is the batch, or the batch folded into the rows)."""
    batch = index.shape[0]
    rows = x.numel() // x.shape[-1] if x.shape[-1] else math.prod(x.shape[:-1])
    if batch == 0 or rows % batch:
        raise ValueError(
            f"fastlora mixed batch: {batch} per-example adapter indices do not divide the {rows} rows of a layer "
            f"input of shape {tuple(x.shape)} (one index per example of the batch)"
        )
    return index.to(torch.int32)[:, None].expand(batch, rows // batch).reshape(rows)


def mixed_forward(batch: MixedBatch, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mixed-batch forward of ``layer`` (its ``_mixed_route``): x (..., in_features) -> (..., out_features).

    A merged layer refuses (its base already holds one adapter); a disabled layer is the base for every row.
    """
    if layer.merged:
        raise RuntimeError(
            f"fastlora: a mixed-adapter batch needs unmerged layers; this one holds adapter {layer.active_adapter!r} "
            "merged into its base (unmerge() it first)"
        )
    layer._check_input(x)
    autocast = x.device.type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(x.device.type)
    if autocast:
        x = x.to(torch.get_autocast_dtype(x.device.type))
    dtype = x.dtype
    weight = layer.weight
    if layer.quant_state is None and weight.dtype != dtype:
        if not autocast:
            raise TypeError(f"FastLoRALinear: input dtype {dtype} does not match the base weight's {weight.dtype}")
        weight = weight.to(dtype)
    bias = layer.bias.to(dtype) if layer.bias is not None else None
    if layer.disabled:
        if layer.quant_state is None:
            return nn.functional.linear(x, weight, bias)
        a, b = x.new_zeros((0, layer.in_features)), x.new_zeros((layer.out_features, 0))
        return lora_linear(x, weight, bias, a, b, 0.0, quant_state=layer.quant_state)
    idx = rows_index(batch.index, x)
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():  # eager inference: the persistent pool
        pool = refresh_pool(layer, batch.names, dtype)
        use_dropout = layer.training and pool.any_dropout
        seed = int(torch.randint(0, 2**62, (1,)).item()) if use_dropout else 0
        return lora_linear_multi(x, weight, bias, pool.a, pool.b, pool.scales, idx, quant_state=layer.quant_state,
                                 dropout_p=pool.dropout if use_dropout else None, seed=seed)  # fmt: skip
    adapters = _slot_adapters(layer, batch.names)
    needs_grad = torch.is_grad_enabled() and any(
        p.requires_grad for a in adapters if a is not None for p in (a.lora_A, a.lora_B)
    )
    pool = None if needs_grad else layer.__dict__.get("_multi_pool")
    if needs_grad:
        pool_a, pool_b, scales, dropout = _grad_pool(adapters, layer, dtype, weight.device)
    elif torch.compiler.is_compiling() and pool is not None and pool.fits(len(adapters), 1, dtype, weight.device):
        pool_a, pool_b, scales, dropout = pool.a, pool.b, pool.scales, pool.dropout
    elif torch.compiler.is_compiling():  # no prepared pool: traced from the parameters (a swap then recompiles)
        with torch.no_grad():
            pool_a, pool_b, scales, dropout = _grad_pool(adapters, layer, dtype, weight.device)
    else:
        pool = refresh_pool(layer, batch.names, dtype)
        pool_a, pool_b, scales, dropout = pool.a, pool.b, pool.scales, pool.dropout
    use_dropout = layer.training and any(a is not None and a.lora_dropout > 0 for a in adapters)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if use_dropout else 0
    return lora_linear_multi(x, weight, bias, pool_a, pool_b, scales, idx, quant_state=layer.quant_state,
                             dropout_p=dropout if use_dropout else None, seed=seed)  # fmt: skip
