"""The grouped LoRA linear's passes and dispatch rows (the op itself: :mod:`fastlora.ops.lora_group`).

Forward (``lora_group``): u from one skinny GEMM over the stacked A of the members without dropout;
large M: C = [s_i·u_i·B_iᵀ + b_i] into the column slices of one (M, ΣN) output, every run of 4-bit
members dequantised into ONE stacked [ΣN, K] scratch and ONE GEMM ``Y += x·W_stackedᵀ`` (a dense member:
its own ``addmm_`` into its slice, W never copied); small M: the fused kernel per member. Input gradient
(``lora_group_dx``): ``dx = [v_i]·[A_i] + g·W_stacked``, the same stacking. The torch row runs the same
steps with the ``dequantize_4bit`` table's kernel per member (native on a CPU) instead of the scratch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastlora import _alloc, dispatch, native
from fastlora.kernels import lora as lora_kernels
from fastlora.kernels.dequant import dequantize_4bit_into
from fastlora.ops import lora_paths, scratch
from fastlora.ops.lora import _dense_weight
from fastlora.quant import QuantState

OP_GROUP = "lora_group"  # forward: the stacked Y
OP_GROUP_DX = "lora_group_dx"  # backward: dx
QUANTS = ("", "nf4", "fp4")  # quant codes in the op's int[] arguments
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class GroupMember(NamedTuple):
    """One projection of a group: W (N, K) dense or 4-bit (with ``quant_state``), bias (N,) or None, LoRA
    ``lora_a`` (r, K) / ``lora_b`` (N, r) in x's dtype or None (no adapter), scale s, dropout p and seed."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scale: float = 0.0
    quant_state: QuantState | None = None
    dropout_p: float = 0.0
    seed: int = 0


class Member(NamedTuple):  # a member inside the op: columns [lo, hi) of Y, [ulo, uhi) of u
    weight: torch.Tensor
    state: QuantState | None
    bias: torch.Tensor | None
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    p: float
    seed: int
    lo: int
    hi: int
    ulo: int
    uhi: int


def members_of(weights, biases, lora_as, lora_bs, absmax, nested_absmax, nested_code, quants, blocksizes, shapes,
             dtypes, offsets, scales, ps, seeds) -> list[Member]:  # fmt: skip
    out, lo, ulo = [], 0, 0
    for i, w in enumerate(weights):
        n, r = shapes[2 * i], lora_as[i].shape[0]
        quant, shape, dtype = QUANTS[quants[i]], shapes[2 * i : 2 * i + 2], DTYPES[dtypes[i]]
        state = QuantState.from_op_args(absmax[i], nested_absmax[i], nested_code[i], quant, blocksizes[i], shape,
                                        dtype, offsets[i])  # fmt: skip
        out.append(Member(w, state, biases[i], lora_as[i], lora_bs[i], scales[i], ps[i], seeds[i], lo, lo + n, ulo,
                      ulo + r))  # fmt: skip
        lo, ulo = lo + n, ulo + r
    return out


def group_quant(ms: list[Member]) -> str | None:
    return next((m.state.quant_type for m in ms if m.state is not None), None)


def down(x: torch.Tensor, ms: list[Member], backend: str) -> torch.Tensor:
    """u (M, Σr): one GEMM x·[A_i; ...]ᵀ over the members without dropout, each member with dropout its own."""
    plain = [m for m in ms if m.p == 0.0 and m.a.shape[0] > 0]
    if all(m.p == 0.0 for m in ms):
        return x @ torch.cat([m.a for m in ms]).T if plain else x.new_zeros((x.shape[0], 0))
    u = _alloc.empty((x.shape[0], ms[-1].uhi), dtype=x.dtype, device=x.device)
    if plain:
        u_plain = x @ torch.cat([m.a for m in plain]).T
        col = 0
        for m in plain:
            u[:, m.ulo : m.uhi] = u_plain[:, col : col + m.uhi - m.ulo]
            col += m.uhi - m.ulo
    for m in ms:
        if m.p > 0.0 and m.a.shape[0] > 0:
            u[:, m.ulo : m.uhi] = lora_paths.lora_down(x, m.a, m.p, m.seed, backend)
    return u


def _runs(ms: list[Member]) -> list[list[Member]]:
    """Consecutive 4-bit members (one stacked GEMM each run: q/k/v of a QLoRA model are one run)."""
    runs, cur = [], []
    for m in ms:
        if m.state is not None:
            cur.append(m)
        elif cur:
            runs.append(cur)
            cur = []
    return [*runs, cur] if cur else runs


def _stacked_weight(run: list[Member], dtype: torch.dtype) -> torch.Tensor:
    """The run's 4-bit W_i dequantised (Triton) into their row slices of ONE [ΣN, K] view of the shared scratch."""
    if len(run) == 1:
        return scratch.dequantized_weight(run[0].weight, run[0].state, dtype, backend="triton")
    buf = scratch.scratch((run[-1].hi - run[0].lo, run[0].state.shape[1]), dtype, run[0].weight.device)
    for m in run:
        dequantize_4bit_into(m.weight, m.state, buf[m.lo - run[0].lo : m.hi - run[0].lo])
    return buf


def _base_mm(out: torch.Tensor, lhs: torch.Tensor, ms: list[Member], backend: str, fwd: bool) -> torch.Tensor:
    """out += lhs·W_stackedᵀ (forward: lhs = x, out = Y) or lhs·W_stacked (dx: lhs = g, out = dx): one GEMM a
    run of 4-bit members, one addmm_ a dense member (its W as it is)."""
    runs = _runs(ms) if backend == "triton" else [[m] for m in ms if m.state is not None]
    for run in runs:  # the torch row: each W dequantised by the dequantize_4bit table (native on a CPU)
        w = _stacked_weight(run, lhs.dtype) if backend == "triton" else _dense_weight(run[0].weight, run[0].state,
                                                                                      lhs.dtype)  # fmt: skip
        lo, hi = run[0].lo, run[-1].hi
        if fwd:
            out[:, lo:hi].addmm_(lhs, w.T)
        else:
            out.addmm_(lhs[:, lo:hi], w)
    for m in ms:
        if m.state is None:
            if fwd:
                out[:, m.lo : m.hi].addmm_(lhs, m.weight.T)
            else:
                out.addmm_(lhs[:, m.lo : m.hi], m.weight)
    return out


def _forward_stacked(x, ms, u, backend, path):
    """Y (M, ΣN): large M, C (the low-rank terms and biases) into Y's slices, then the stacked GEMM(s);
    small M (Triton fused path), the fused kernel per member into Y's slices."""
    y = _alloc.empty((x.shape[0], ms[-1].hi), dtype=x.dtype, device=x.device)
    for m in ms:
        ui = u[:, m.ulo : m.uhi]
        if path == "fused":
            with_lora = m.a.shape[0] > 0
            y[:, m.lo : m.hi] = lora_kernels.lora_fwd_triton(x, m.weight, m.state, m.bias, ui if with_lora else None,
                                                             m.b if with_lora else None, m.scale)  # fmt: skip
        elif m.a.shape[0] > 0:
            up = dispatch.choose(lora_paths.OP_UP, x.device, backend).fn
            up(ui, m.b.T, m.scale, m.bias, 0.0, 0, out=y[:, m.lo : m.hi])
        elif m.bias is not None:
            y[:, m.lo : m.hi] = m.bias
        else:
            y[:, m.lo : m.hi] = 0
    return y if path == "fused" else _base_mm(y, x, ms, backend, True)


def _input_grad_stacked(g, ms, vs, backend, path):
    """dx (M, K) = g·W_stacked + Σ d'_i(v_i·A_i)."""
    k = ms[0].a.shape[1]
    if path == "fused":
        dx = None
        for m, v in zip(ms, vs, strict=True):
            with_lora = m.a.shape[0] > 0
            part = lora_kernels.lora_bwd_dx_triton(g[:, m.lo : m.hi], m.weight, m.state, v if with_lora else None,
                                                   m.a if with_lora else None, dropout_p=m.p, seed=m.seed)  # fmt: skip
            dx = part if dx is None else dx.add_(part)
        return dx
    plain = [(m, v) for m, v in zip(ms, vs, strict=True) if m.p == 0.0 and m.a.shape[0] > 0]
    if plain:  # [v_1 | v_2 | ...]·[A_1; A_2; ...]: one skinny GEMM
        dx = torch.cat([v for _, v in plain], dim=1) @ torch.cat([m.a for m, _ in plain])
    else:
        dx = g.new_zeros((g.shape[0], k))
    up = dispatch.choose(lora_paths.OP_UP, g.device, backend).fn
    for m, v in zip(ms, vs, strict=True):
        if m.p > 0.0 and m.a.shape[0] > 0:
            dx.add_(up(v, m.a, 1.0, None, m.p, m.seed))  # the member's mask over dx's positions, in-kernel
    return _base_mm(dx, g, ms, backend, False)


def _decode_only(facts) -> str | None:
    if not facts["quantized"]:
        return "the native GEMV takes 4-bit weights (every member)"
    if facts["m"] > native.MAX_DECODE_M:
        return f"the native GEMV takes at most {native.MAX_DECODE_M} rows, got {facts['m']}"
    return None


def _forward_native(x, ms, u, backend, path):
    """Decode: the native GEMV per member (W read once, dequantised in registers) into Y's slices."""
    y = _alloc.empty((x.shape[0], ms[-1].hi), dtype=x.dtype, device=x.device)
    for m in ms:
        lora = {"lora_b": m.b, "lora_u": u[:, m.ulo : m.uhi]} if m.a.shape[0] > 0 else {}
        y[:, m.lo : m.hi] = native.gemv_4bit(x, m.weight, m.state, m.bias, scale=m.scale, **lora)
    return y


# as lora_linear's forward: the native GEMV is the decode default where built (4-bit members, M <= 16)
dispatch.register(OP_GROUP, "native", devices=("cpu", "cuda"), default_on=("cpu", "cuda"), when=_decode_only,
                  available=native.unavailable_reason)(_forward_native)  # fmt: skip
for _backend, _kw in (("triton", {"devices": ("cuda",), "default_on": ("cuda",)}), ("torch", {})):
    dispatch.register(OP_GROUP, _backend, **_kw)(_forward_stacked)
    dispatch.register(OP_GROUP_DX, _backend, **_kw)(_input_grad_stacked)
