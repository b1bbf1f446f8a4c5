"""Triton kernels of the mixed-adapter LoRA linear: grouped low-rank products over a padded adapter pool.

Row m belongs to slot i = idx[m] (-1: the bare base). Pools: A (S, R, K), B (S, N, R), scales s (S,) fp32.

    multi_down     u[m] = d_i(x[m])·A_iᵀ              M <= GATHER_MAX_M: gathered (BGMV: program m reads A_{idx[m]});
                                                      else segment-grouped (SGMV: tiles of slot-sorted rows)
    multi_up       C[m] = s_i·u[m]·B_iᵀ + b           segment-grouped, C of the large-M GEMM
    multi_dx_term  d'_i(v[m]·A_i)                     segment-grouped, C of the input-gradient GEMM
    multi_grads    v = s_i·g·B_i (segment-grouped); dB_i = s_i·Σ gᵀu, dA_i = Σ vᵀ d_i(x): one program per
                   (slot, tile) summing its segment's rows in order (fixed order: bit-reproducible, no atomics)

The small-M forward with W and every row's LoRA term in one launch is :mod:`fastlora.kernels.lora_multi_fused`.

Grouping without a host sync: rows are sorted by slot on the device (a stable sort; perm, sorted idx) and
slot segments found by searchsorted. A segment-grouped program owns BM consecutive sorted rows (read and written
through perm, x is never copied) and loops over the slots between its first and last row, skipping slots it does
not hold: one slot per tile in training (long segments), a few at decode. The dropout mask is
:func:`~fastlora.kernels.primitives.keep_mask` at the row's own threshold (never stored). Every product sums in
fp32; s and 1/(1-p) multiply that sum. Reference: :mod:`fastlora.kernels.lora_multi_ref` (same names).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora import _alloc, dispatch
from fastlora.functional import seed32
from fastlora.kernels.lora_multi_ref import thresholds
from fastlora.kernels.lowrank import TARGET_PROGRAMS, _finish, _planes, r_tile
from fastlora.kernels.primitives import check_float, keep_mask, launch, mma, round_like

__all__ = ["group_rows", "multi_down", "multi_dx_term", "multi_grads", "multi_up"]

GATHER_MAX_M = 16  # multi_down gathers per row up to here (decode), groups by segment beyond


@triton.jit
def _tile_rows(perm_ptr, sidx_ptr, M, BM: tl.constexpr):
    """This program's BM sorted rows: (row ids, slots (-1 past M), in range, first slot >= 0, last slot)."""
    first = tl.program_id(0) * BM
    j = first + tl.arange(0, BM)
    jm = j < M
    rows = tl.load(perm_ptr + j, mask=jm, other=0)
    slot = tl.load(sidx_ptr + j, mask=jm, other=-1)
    lo = tl.maximum(tl.load(sidx_ptr + first), 0)
    hi = tl.load(sidx_ptr + tl.minimum(first + BM, M) - 1)
    return rows, slot, jm, lo, hi


@triton.jit
def _grouped_rows_kernel(
    x_ptr, p_ptr, out_ptr, perm_ptr, sidx_ptr, scale_ptr, thr_ptr, inv_ptr, M, K, R, M_BUCKET, stride_xm, stride_xk,
    stride_ps, stride_pk, stride_pr, key, HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """out[m, r] = c_i · Σ_k d_i(X)[m, k] · P_i[k, r] (c_i = s_i and/or 1/(1-p_i)); out (M, R) contiguous.
    u: X = x, P_i = A_iᵀ, dropout. v: X = g, P_i = B_i, c_i = s_i."""
    rows, slot, jm, lo, hi = _tile_rows(perm_ptr, sidx_ptr, M, BM)
    rows64 = rows.to(tl.int64)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    r_mask = rr < R
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for s in range(lo, hi + 1):
        sel = slot == s
        if tl.max(sel.to(tl.int32), axis=0) > 0:  # a slot between two held ones may have no row here
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                k_mask = rk < K
                x = tl.load(x_ptr + rows64[:, None] * stride_xm + rk[None, :] * stride_xk,
                            mask=sel[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
                if DROPOUT:
                    x = tl.where(keep_mask(rows, rk, key, tl.load(thr_ptr + s)), x, tl.zeros_like(x))
                p = tl.load(p_ptr + s * stride_ps + rk[:, None] * stride_pk + rr[None, :] * stride_pr,
                            mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # fmt: skip
                acc = mma(x, p, acc, FP32_DOT)
    live = jm & (slot >= 0)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + slot, mask=live, other=0.0)[:, None]
    if DROPOUT:
        acc *= tl.load(inv_ptr + slot, mask=live, other=0.0)[:, None]
    out = out_ptr + rows64[:, None] * R + rr[None, :]
    tl.store(out, round_like(acc, out_ptr).to(out_ptr.dtype.element_ty), mask=jm[:, None] & r_mask[None, :])


@triton.jit
def _grouped_up_kernel(
    u_ptr, l_ptr, bias_ptr, out_ptr, perm_ptr, sidx_ptr, scale_ptr, thr_ptr, inv_ptr, M, N, R, M_BUCKET, stride_um,
    stride_ur, stride_ls, stride_lr, stride_ln, stride_om, stride_on, key, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BR: tl.constexpr,
):  # fmt: skip
    """out[m, n] = d'_i(c_i · Σ_r U[m, r] · L_i[r, n]) + bias[n] for every row (rows of slot -1: bias alone).
    Forward C: L_i = B_iᵀ, c_i = s_i. Input gradient C: L_i = A_i, the mask of the (M, K) output positions."""
    rows, slot, jm, lo, hi = _tile_rows(perm_ptr, sidx_ptr, M, BM)
    rows64 = rows.to(tl.int64)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    n_mask = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for s in range(lo, hi + 1):
        sel = slot == s
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            for r0 in range(0, R, BR):
                rr = r0 + tl.arange(0, BR)
                r_mask = rr < R
                u = tl.load(u_ptr + rows64[:, None] * stride_um + rr[None, :] * stride_ur,
                            mask=sel[:, None] & r_mask[None, :], other=0.0)  # fmt: skip
                lw = tl.load(l_ptr + s * stride_ls + rr[:, None] * stride_lr + rn[None, :] * stride_ln,
                             mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # fmt: skip
                acc = mma(u, lw, acc, FP32_DOT)
    live = jm & (slot >= 0)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + slot, mask=live, other=0.0)[:, None]
    if DROPOUT:
        thr = tl.load(thr_ptr + slot, mask=live, other=0)
        keep = keep_mask(rows, rn, key, thr[:, None])
        acc = tl.where(keep, acc * tl.load(inv_ptr + slot, mask=live, other=0.0)[:, None], 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows64[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out, round_like(acc, out_ptr).to(out_ptr.dtype.element_ty), mask=jm[:, None] & n_mask[None, :])


@triton.jit
def _segment_reduce_kernel(
    x_ptr, y_ptr, out_ptr, perm_ptr, seg_ptr, scale_ptr, thr_ptr, inv_ptr, C, R, P, stride_xm, stride_xc, stride_ym,
    stride_yr, stride_op, stride_os, stride_oc, stride_or, key, HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """Program (slot s · P + part p, c tile, r tile): plane p of out[s, c, r] = c_s · Σ d_s(X)[m, c] · Y[m, r] over
    part p of segment s (P equal parts of BM-row blocks), rows in sorted order; a slot without rows writes zeros.
    dB: X = g, Y = u, c_s = s_s. dA (stored transposed through the strides): X = x with the slot's dropout, Y = v,
    c_s = 1/(1-p_s). P > 1: fp32 planes, summed in a fixed order afterwards (bit-reproducible)."""
    s = tl.program_id(0) // P
    part = tl.program_id(0) % P
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    rr = tl.program_id(2) * BR + tl.arange(0, BR)
    c_mask = rc < C
    r_mask = rr < R
    seg_start = tl.load(seg_ptr + s)
    seg_end = tl.load(seg_ptr + s + 1)
    chunk = tl.cdiv(tl.cdiv(seg_end - seg_start, P), BM) * BM
    start = seg_start + part * chunk
    end = tl.minimum(start + chunk, seg_end)
    acc = tl.zeros((BC, BR), dtype=tl.float32)
    for j0 in range(start, end, BM):
        j = j0 + tl.arange(0, BM)
        jm = j < end
        rows = tl.load(perm_ptr + j, mask=jm, other=0)
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + rc[None, :] * stride_xc,
                    mask=jm[:, None] & c_mask[None, :], other=0.0)  # fmt: skip
        if DROPOUT:
            x = tl.where(keep_mask(rows, rc, key, tl.load(thr_ptr + s)), x, tl.zeros_like(x))
        y = tl.load(y_ptr + rows64[:, None] * stride_ym + rr[None, :] * stride_yr,
                    mask=jm[:, None] & r_mask[None, :], other=0.0)  # fmt: skip
        acc = mma(tl.trans(x), y, acc, FP32_DOT)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + s)
    if DROPOUT:
        acc *= tl.load(inv_ptr + s)
    out = out_ptr + part.to(tl.int64) * stride_op + s.to(tl.int64) * stride_os + rc[:, None] * stride_oc
    out += rr[None, :] * stride_or
    tl.store(out, round_like(acc, out_ptr).to(out_ptr.dtype.element_ty), mask=c_mask[:, None] & r_mask[None, :])


@triton.jit
def _gather_down_kernel(
    x_ptr, a_ptr, out_ptr, idx_ptr, thr_ptr, inv_ptr, K, R, stride_xm, stride_xk, stride_as, stride_ar, stride_ak,
    key, DROPOUT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """Program (m, r tile): u[m, r] = d_i(x[m])·A_i[r]ᵀ with i = idx[m] read by the program (BGMV); zeros at -1."""
    m = tl.program_id(0)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    slot = tl.load(idx_ptr + m + tl.zeros((1,), dtype=tl.int32))  # (1,): the row's slot as a tile
    live = slot >= 0
    slot = tl.maximum(slot, 0)
    row = tl.zeros((1,), dtype=tl.int32) + m
    acc = tl.zeros((BR,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + rk[None, :] * stride_xk, mask=live[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        if DROPOUT:
            x = tl.where(keep_mask(row, rk, key, tl.load(thr_ptr + slot)[:, None]), x, 0.0)
        a = tl.load(a_ptr + slot[:, None] * stride_as + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                    mask=live[:, None] & (rr < R)[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
        acc += tl.sum(a.to(tl.float32) * x, axis=1)
    if DROPOUT:
        acc *= tl.load(inv_ptr + slot)
    tl.store(out_ptr + m.to(tl.int64) * R + rr, round_like(acc, out_ptr).to(out_ptr.dtype.element_ty), mask=rr < R)


# -- configs: one per kind (tensor-core dtypes "tc", IEEE fp32 "fp32", the interpreter) --------------------------
_C = triton.Config
# rows: BK = 64 spilled 3 registers with dropout on sm_80 under triton 3.9 (capped at 96); BK = 32 takes 77
ROWS_CONFIGS = {"tc": _C({"BM": 64, "BK": 32}, num_warps=4, num_stages=3), "fp32": _C({"BM": 32, "BK": 32},
                num_warps=4, num_stages=2), "interp": _C({"BM": 16, "BK": 32})}  # fmt: skip
UP_CONFIGS = {"tc": _C({"BM": 64, "BN": 128}, num_warps=8, num_stages=2), "fp32": _C({"BM": 32, "BN": 64},
              num_warps=8, num_stages=2), "interp": _C({"BM": 16, "BN": 32})}  # fmt: skip
REDUCE_CONFIGS = {"tc": _C({"BM": 32, "BC": 128}, num_warps=4, num_stages=3), "fp32": _C({"BM": 32, "BC": 64},
                  num_warps=4, num_stages=2), "interp": _C({"BM": 16, "BC": 32})}  # fmt: skip
GATHER_CONFIGS = {"tc": _C({"BK": 256}, num_warps=4, num_stages=2), "fp32": _C({"BK": 256}, num_warps=4,
                  num_stages=2), "interp": _C({"BK": 32})}  # fmt: skip


def up_br(r: int) -> int:
    """The R tile of the up and reduce kernels: at most 32 (R loops, or more r programs, beyond): BR = 64 spilled
    one register on sm_80 with triton 3.6 in both (64 x 128 and 128 x 64 fp32 accumulators)."""
    return min(r_tile(r), 32)


def _kind(dtype: torch.dtype) -> str:
    if dispatch.interpreting():
        return "interp"
    return "fp32" if dtype == torch.float32 else "tc"


def _go(kernel, grid, args, flags, configs, kind, fp32_dot=True):
    flags = {**flags, "FP32_DOT": kind != "tc"} if fp32_dot else flags
    launch(kernel, grid, args, flags, configs=[configs[kind]], key=[], interpreter_config=configs["interp"])


def group_rows(idx: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, sorted idx, segment starts): idx (M,) int32 -> perm (M,) int32 (rows in slot order, stable), idx[perm]
    (M,) int32, seg (S + 1,) int32 with slot i's sorted rows in [seg[i], seg[i + 1]). On the device, no sync."""
    sorted_idx, perm = torch.sort(idx, stable=True)
    bounds = torch.arange(s + 1, device=idx.device, dtype=sorted_idx.dtype)
    seg = torch.searchsorted(sorted_idx, bounds).to(torch.int32)
    return perm.to(torch.int32), sorted_idx.to(torch.int32), seg


def _drop(dropout_p: torch.Tensor | None, seed: int, like: torch.Tensor):
    """(DROPOUT, key as a signed int32, thresholds (S,) int32, 1/(1-p) (S,) fp32): dummies without dropout."""
    if dropout_p is None:
        return False, 0, like, like
    key = seed32(seed)
    thr, inv = thresholds(dropout_p)
    return True, key - (1 << 32) if key >= 1 << 31 else key, thr, inv


def _rows(x, p, p_strides, r, idx, scales, dropout_p, seed):
    """out (M, r) = c_i·d_i(x)·P_i by the segment-grouped kernel; P_i[k, c] at p + i·ps + k·pk + c·pr."""
    m, k = x.shape
    out = _alloc.empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0 or r == 0:
        return out
    perm, sidx, _ = group_rows(idx, 1)
    dropout, key, thr, inv = _drop(dropout_p, seed, perm)
    br, kind = r_tile(r), _kind(x.dtype)
    args = (x, p, out, perm, sidx, scales if scales is not None else out, thr, inv, m, k, r,
            triton.next_power_of_2(m), *x.stride(), *p_strides, key)  # fmt: skip
    flags = {"HAS_SCALE": scales is not None, "DROPOUT": dropout, "BR": br}
    _go(_grouped_rows_kernel, lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(r, br)), args, flags,
        ROWS_CONFIGS, kind)  # fmt: skip
    return out


def multi_down(x, pool_a, idx, dropout_p=None, seed=0) -> torch.Tensor:
    """u = d_i(x)·A_iᵀ: x (M, K), pool_a (S, R, K), idx (M,) int32 -> (M, R) in x's dtype, zero rows at -1."""
    check_float(x, "fastlora multi_down")
    (m, k), r = x.shape, pool_a.shape[1]
    if m > GATHER_MAX_M:
        sa = pool_a.stride()
        return _rows(x, pool_a, (sa[0], sa[2], sa[1]), r, idx, None, dropout_p, seed)
    out = _alloc.empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0 or r == 0:
        return out
    dropout, key, thr, inv = _drop(dropout_p, seed, idx)
    br, kind = r_tile(r), _kind(x.dtype)
    args = (x, pool_a, out, idx, thr, inv, k, r, *x.stride(), *pool_a.stride(), key)
    _go(_gather_down_kernel, lambda meta: (m, triton.cdiv(r, br)), args, {"DROPOUT": dropout, "BR": br},
        GATHER_CONFIGS, kind, fp32_dot=False)  # fmt: skip
    return out


def _up(u, l, l_strides, n, idx, scales, bias, dropout_p, seed):
    m, r = u.shape
    out = _alloc.empty((m, n), dtype=u.dtype, device=u.device)
    if m == 0 or n == 0:
        return out
    perm, sidx, _ = group_rows(idx, 1)
    dropout, key, thr, inv = _drop(dropout_p, seed, perm)
    kind = _kind(u.dtype)
    args = (u, l, bias if bias is not None else out, out, perm, sidx, scales if scales is not None else out, thr, inv,
            m, n, r, triton.next_power_of_2(m), *u.stride(), *l_strides, *out.stride(), key)  # fmt: skip
    flags = {"HAS_SCALE": scales is not None, "HAS_BIAS": bias is not None, "DROPOUT": dropout, "BR": up_br(r)}
    _go(_grouped_up_kernel, lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"])), args, flags,
        UP_CONFIGS, kind)  # fmt: skip
    return out


def multi_up(u, pool_b, scales, idx, bias=None) -> torch.Tensor:
    """C = s_i·u·B_iᵀ + bias: u (M, R), pool_b (S, N, R), scales (S,) fp32, bias (N,) or None -> (M, N)."""
    sb = pool_b.stride()
    return _up(u, pool_b, (sb[0], sb[2], sb[1]), pool_b.shape[1], idx, scales, bias, None, 0)


def multi_dx_term(v, pool_a, idx, dropout_p=None, seed=0) -> torch.Tensor:
    """d'_i(v·A_i): v (M, R), pool_a (S, R, K) -> (M, K), the mask of x's positions at the row's p_i."""
    return _up(v, pool_a, pool_a.stride(), pool_a.shape[2], idx, None, None, dropout_p, seed)


def _reduce(x, y, out, out_strides, c, idx, scales, dropout_p, seed):
    """out[s, c, r] (through out_strides, contiguous) = c_s·Σ_{segment s} d_s(x)[m, c]·y[m, r]; each segment in
    P parts (fp32 planes summed in order) when the S·tiles programs alone would leave SMs idle."""
    (m, s), r = (x.shape[0], out.shape[0]), y.shape[1]
    if s == 0 or c == 0 or r == 0:
        return out
    perm, _, seg = group_rows(idx, s)
    dropout, key, thr, inv = _drop(dropout_p, seed, perm)
    br, kind = up_br(r), _kind(x.dtype)
    cfg = REDUCE_CONFIGS[kind].kwargs
    tiles = s * triton.cdiv(c, cfg["BC"]) * triton.cdiv(r, br)
    parts = max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), triton.cdiv(m, s * 4 * cfg["BM"])))
    part = _planes(parts, tuple(out.shape), out)
    args = (x, y, part, perm, seg, scales if scales is not None else out, thr, inv, c, r, parts, *x.stride(),
            *y.stride(), out.numel() if parts > 1 else 0, *out_strides, key)  # fmt: skip
    flags = {"HAS_SCALE": scales is not None, "DROPOUT": dropout, "BR": br}
    _go(_segment_reduce_kernel, lambda meta: (s * parts, triton.cdiv(c, meta["BC"]), triton.cdiv(r, br)), args,
        flags, REDUCE_CONFIGS, kind)  # fmt: skip
    return _finish(part, out)


def multi_grads(g, x, pool_a, pool_b, u, scales, idx, dropout_p=None, seed=0):
    """(v, dA, dB): v (M, R) = s_i·g·B_i; dA (S, R, K) = Σ_{idx=i} vᵀ·d_i(x); dB (S, N, R) = s_i·Σ_{idx=i} gᵀ·u;
    g (M, N), x (M, K), u (M, R). Slots without rows get zeros; each sum runs over its rows in a fixed order."""
    check_float(g, "fastlora multi_grads")
    s, n, r = pool_b.shape
    k = pool_a.shape[2]
    sb = pool_b.stride()
    v = _rows(g, pool_b, (sb[0], sb[1], sb[2]), r, idx, scales, None, 0)
    grad_b = _alloc.empty((s, n, r), dtype=g.dtype, device=g.device)
    grad_a = _alloc.empty((s, r, k), dtype=g.dtype, device=g.device)
    if g.shape[0] == 0:
        return v, grad_a.zero_(), grad_b.zero_()
    _reduce(g, u, grad_b, (n * r, r, 1), n, idx, scales, None, 0)
    _reduce(x, v, grad_a, (r * k, 1, k), k, idx, None, dropout_p, seed)
    return v, grad_a, grad_b
