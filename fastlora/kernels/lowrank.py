"""Triton kernels: LoRA's low-rank products, LoRA dropout regenerated in-kernel from the seed.

    lora_down:   u  = d(x)·Aᵀ                  (M, r)    mask over x's (M, K) positions
    lora_up:     C  = d'(s·(u·L)) + bias       (M, N)    mask over C's positions; L = Bᵀ (forward), A (dx)
    lora_grads:  v  = s·g·B,   dB = s·gᵀ·u     (M, r), (N, r)    ONE pass over g
    lora_grad_a: dA = vᵀ·d(x)                  (r, K)    mask over x's positions

Reference: :mod:`fastlora.kernels.lowrank_ref`. The mask is :func:`~fastlora.kernels.primitives.keep_mask`
(no mask tensor); 1/(1-p) and the LoRA scale multiply the fp32 accumulator. Every product accumulates in fp32; r < 16 runs on a 16-wide
masked tile (the tensor-core minimum).

Reductions over the long side (dB and dA over M, v over N) are split across programs and finished by
:func:`_sum_partials_kernel`, an fp32 sum of the partial planes in a fixed order (no atomics): results
are bit-reproducible.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from fastlora import _alloc, dispatch
from fastlora.functional import drop_threshold, seed32
from fastlora.kernels.primitives import check_float, keep_mask, launch, mma, round_like
from fastlora.kernels.specs import TL_POINTER, KernelSpec, register

__all__ = ["lora_down", "lora_grad_a", "lora_grads", "lora_up"]


@triton.jit
def _load(ptr, rows, cols, stride_r, stride_c, r_mask, c_mask):
    """ptr[rows, cols], 0 outside the masks."""
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=r_mask[:, None] & c_mask[None, :],
                   other=0.0)  # fmt: skip


@triton.jit
def _store(ptr, acc, rows, cols, stride_r, stride_c, r_mask, c_mask):
    """ptr[rows, cols] = acc (fp32) rounded to nearest."""
    tl.store(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, round_like(acc, ptr).to(ptr.dtype.element_ty),
             mask=r_mask[:, None] & c_mask[None, :])  # fmt: skip


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, u_ptr, M, K, R, M_BUCKET, stride_xm, stride_xk, stride_ar, stride_ak, key, threshold, inv_keep,
    DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr
):  # fmt: skip
    """u[rows, r tile] = d(x)·Aᵀ; u (M, R) contiguous."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    row0 = (pid_m * BM).to(tl.int64)  # 64-bit row base, 32-bit offsets inside the tile
    lm = tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    m_mask = lm < M - row0
    r_mask = rr < R
    x_rows = x_ptr + row0 * stride_xm
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        x = _load(x_rows, lm, rk, stride_xm, stride_xk, m_mask, k_mask)
        if DROPOUT:
            x = tl.where(keep_mask(row0 + lm, rk, key, threshold), x, tl.zeros_like(x))
        at = _load(a_ptr, rk, rr, stride_ak, stride_ar, k_mask, r_mask)
        acc = mma(x, at, acc, FP32_DOT)
    if DROPOUT:
        acc = acc * inv_keep
    _store(u_ptr + row0 * R, acc, lm, rr, R, 1, m_mask, r_mask)


@triton.jit
def _lora_up_kernel(
    u_ptr, l_ptr, bias_ptr, out_ptr, M, N, R, M_BUCKET, stride_um, stride_ur, stride_lr, stride_ln, stride_om,
    stride_on, scale, key, threshold, inv_keep, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr
):  # fmt: skip
    """out[tile] = d'(scale·(u·L)) + bias."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    row0 = (pid_m * BM).to(tl.int64)
    lm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask = lm < M - row0
    n_mask = rn < N
    u_rows = u_ptr + row0 * stride_um
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        r_mask = rr < R
        u = _load(u_rows, lm, rr, stride_um, stride_ur, m_mask, r_mask)
        lt = _load(l_ptr, rr, rn, stride_lr, stride_ln, r_mask, n_mask)
        acc = mma(u, lt, acc, FP32_DOT)
    acc = acc * scale
    if DROPOUT:
        acc = tl.where(keep_mask(row0 + lm, rn, key, threshold), acc * inv_keep, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    _store(out_ptr + row0 * stride_om, acc, lm, rn, stride_om, stride_on, m_mask, n_mask)


@triton.jit
def _lora_grads_kernel(
    g_ptr, b_ptr, u_ptr, v_ptr, db_ptr, M, N, R, M_BUCKET, N_CHUNK, stride_gm, stride_gn, stride_bn, stride_br,
    stride_um, stride_ur, stride_vp, stride_dbp, scale, FP32_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BR: tl.constexpr
):  # fmt: skip
    """Program (m, n, r) loads each g tile of rows [m·BM, +BM) x [n·N_CHUNK, +N_CHUNK) once and feeds both
    products: v_acc += g·B (-> plane n of v) and s·gᵀ·u (BN rows of dB -> plane m)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_r = tl.program_id(2)
    row0 = (pid_m * BM).to(tl.int64)
    lm = tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    m_mask = lm < M - row0
    r_mask = rr < R
    u = _load(u_ptr + row0 * stride_um, lm, rr, stride_um, stride_ur, m_mask, r_mask)
    g_rows = g_ptr + row0 * stride_gm
    db_plane = db_ptr + pid_m.to(tl.int64) * stride_dbp
    n_lo = pid_n * N_CHUNK
    n_hi = tl.minimum(n_lo + N_CHUNK, N)
    v_acc = tl.zeros((BM, BR), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BN):
        rn = n0 + tl.arange(0, BN)
        n_mask = rn < n_hi
        g = _load(g_rows, lm, rn, stride_gm, stride_gn, m_mask, n_mask)
        bt = _load(b_ptr, rn, rr, stride_bn, stride_br, n_mask, r_mask)
        v_acc = mma(g, bt, v_acc, FP32_DOT)
        db = mma(tl.trans(g), u, tl.zeros((BN, BR), dtype=tl.float32), FP32_DOT) * scale
        _store(db_plane, db, rn, rr, R, 1, n_mask, r_mask)
    v_acc = v_acc * scale
    _store(v_ptr + pid_n.to(tl.int64) * stride_vp + row0 * R, v_acc, lm, rr, R, 1, m_mask, r_mask)


@triton.jit
def _lora_grad_a_kernel(
    v_ptr, x_ptr, da_ptr, M, K, R, M_CHUNK, stride_vm, stride_vr, stride_xm, stride_xk, stride_dap, key, threshold,
    inv_keep, DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr
):  # fmt: skip
    """Program (k, m, r): dA[r tile, k tile] over rows [m·M_CHUNK, +M_CHUNK) -> plane m, as dAᵀ = d(x)ᵀ·v
    (BK, BR): BK is the product's M, so it runs on wgmma."""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2)
    rk = pid_k * BK + tl.arange(0, BK)
    rr = pid_r * BR + tl.arange(0, BR)
    k_mask = rk < K
    r_mask = rr < R
    m_lo = pid_m.to(tl.int64) * M_CHUNK  # 64-bit row base
    m_hi = tl.minimum(m_lo + M_CHUNK, M)
    lm = tl.arange(0, BM)
    acc = tl.zeros((BK, BR), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        m_mask = lm < m_hi - m0
        x = _load(x_ptr + m0 * stride_xm, lm, rk, stride_xm, stride_xk, m_mask, k_mask)
        if DROPOUT:
            x = tl.where(keep_mask(m0 + lm, rk, key, threshold), x, tl.zeros_like(x))
        v = _load(v_ptr + m0 * stride_vm, lm, rr, stride_vm, stride_vr, m_mask, r_mask)
        acc = mma(tl.trans(x), v, acc, FP32_DOT)
    if DROPOUT:
        acc = acc * inv_keep
    _store(da_ptr + pid_m.to(tl.int64) * stride_dap, acc, rk, rr, 1, K, k_mask, r_mask)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, P, L, BLOCK: tl.constexpr):
    """out[i] = Σ_p part[p, i], fp32, p = 0..P-1 in order; part (P, L) contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(0, P):
        acc += tl.load(part_ptr + p * L + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, round_like(acc, out_ptr).to(out_ptr.dtype.element_ty), mask=mask)


# Configs. The products are memory-bound at LoRA ranks (about r FLOPs per byte): tiles for bandwidth
# and occupancy; fp32 runs IEEE FMA dots (no TF32) on smaller tiles; the interpreter one small config.
_C = triton.Config
DOWN_CONFIGS = {"tc": [_C({"BM": 64, "BK": 64}, num_warps=4, num_stages=4), _C({"BM": 16, "BK": 64}, num_warps=4,
                num_stages=4)], "fp32": [_C({"BM": 32, "BK": 32}, num_warps=4, num_stages=2)],
                "interp": _C({"BM": 16, "BK": 32})}  # fmt: skip
UP_CONFIGS = {"tc": [_C({"BM": 64, "BN": 128}, num_warps=8, num_stages=2), _C({"BM": 16, "BN": 128}, num_warps=4,
              num_stages=2)], "fp32": [_C({"BM": 32, "BN": 64}, num_warps=8, num_stages=2)],
              "interp": _C({"BM": 16, "BN": 32})}  # fmt: skip
# lora_grads' row block is fixed (the dB partials are sized by it before the launch); BN is tuned.
GRADS_BM = {"tc": 256, "fp32": 32, "interp": 16}


def _grads_bm(kind: str, br: int) -> int:
    """lora_grads' rows per program (halved at BR = 64 on tensor cores: 256 spills on sm_80)."""
    return GRADS_BM[kind] // (2 if kind == "tc" and br > 32 else 1)


GRADS_CONFIGS = {"tc": [_C({"BN": 64}, num_warps=8, num_stages=2), _C({"BN": 32}, num_warps=4, num_stages=3)],
                 "fp32": [_C({"BN": 32}, num_warps=8, num_stages=2)], "interp": _C({"BN": 16})}  # fmt: skip
GRAD_A_CONFIGS = {"tc": [_C({"BM": 64, "BK": 128}, num_warps=4, num_stages=3), _C({"BM": 32, "BK": 64},
                  num_warps=4, num_stages=3)], "fp32": [_C({"BM": 32, "BK": 32}, num_warps=4, num_stages=2)],
                  "interp": _C({"BM": 16, "BK": 32})}  # fmt: skip
SUM_BLOCK = 1024
_SUM_CONFIG = _C({"BLOCK": SUM_BLOCK}, num_warps=4)
CHUNK_ALIGN = {"tc": 128, "fp32": 128, "interp": 16}  # split chunks: multiples of every BN (grads) / BM (grad_a)
TARGET_PROGRAMS = 264  # two per SM on an H100: enough bytes in flight for HBM bandwidth


def _kind(dtype: torch.dtype) -> str:
    if dispatch.interpreting():
        return "interp"
    return "fp32" if dtype == torch.float32 else "tc"


def _launch(kernel, grid, args, flags, table, key):
    kind = _kind(args[0].dtype)
    configs = table[kind] if kind != "interp" else [table[kind]]
    flags = {**flags, "FP32_DOT": kind != "tc"}
    launch(kernel, grid, args, flags, configs=configs, key=key, interpreter_config=table["interp"])


def r_tile(r: int) -> int:
    """The r tile: 16 (the tensor-core minimum; smaller r masked), 32 or 64 (larger r loops or spreads on the grid)."""
    return min(max(triton.next_power_of_2(r), 16), 64)


def _dropout_args(p: float, seed: int) -> tuple[int, int, float]:
    """(key as a signed int32: one specialisation for every seed; threshold; 1/(1-p))."""
    key = seed32(seed)
    return key - (1 << 32) if key >= 1 << 31 else key, drop_threshold(p), 1.0 / (1.0 - p)


def _splits(length: int, others: int, align: int) -> tuple[int, int]:
    """(chunk, count): ``length`` in chunks (multiples of align), about TARGET_PROGRAMS programs in all."""
    want = max(1, min(triton.cdiv(TARGET_PROGRAMS, max(others, 1)), triton.cdiv(length, align)))
    chunk = triton.cdiv(triton.cdiv(length, want), align) * align
    return chunk, triton.cdiv(length, chunk)


def _finish(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = Σ over part's planes (fixed order); a single plane is out itself."""
    if part is out:
        return out
    n = out.numel()
    launch(_sum_partials_kernel, lambda meta: (triton.cdiv(n, SUM_BLOCK),), (part, out, part.shape[0], n), {},
           configs=[_SUM_CONFIG], key=["P", "L"], interpreter_config=_SUM_CONFIG)  # fmt: skip
    return out


def _planes(count: int, shape: tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
    """``out`` itself for one plane, else ``count`` fp32 planes."""
    return out if count == 1 else _alloc.empty((count, *shape), dtype=torch.float32, device=out.device)


def _check(where: str, ok: bool, *tensors: torch.Tensor) -> None:
    """TypeError unless fp32/fp16/bf16, ValueError unless 2-D and ``ok``."""
    for t in tensors:
        check_float(t, where)
    if not ok or any(t.dim() != 2 for t in tensors):
        raise ValueError(f"{where}: shapes {[tuple(t.shape) for t in tensors]} are not 2-D or disagree")


def lora_down(x: torch.Tensor, a: torch.Tensor, p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """u = d(x)·Aᵀ: x (M, K), a = A (r, K), any strides, one dtype -> u (M, r) contiguous; the dropout
    mask over x's positions (p, seed as :func:`fastlora.functional.apply_dropout`)."""
    _check("fastlora lora_down", x.shape[-1] == a.shape[-1], x, a)
    (m, k), r = x.shape, a.shape[0]
    u = _alloc.empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0 or r == 0:
        return u
    if k == 0:
        return u.zero_()
    br = r_tile(r)
    args = (x, a, u, m, k, r, triton.next_power_of_2(m), *x.stride(), *a.stride(), *_dropout_args(p, seed))
    _launch(_lora_down_kernel, lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(r, br)), args,
            {"DROPOUT": p > 0.0, "BR": br}, DOWN_CONFIGS, ["M_BUCKET", "K", "R", "DROPOUT", "BR"])  # fmt: skip
    return u


def lora_up(u: torch.Tensor, l: torch.Tensor, scale: float = 1.0, bias: torch.Tensor | None = None, p: float = 0.0,
            seed: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """C = d'(scale·(u·L)) + bias: u (M, r), l = L (r, N), out (M, N) or None, any strides, one dtype;
    bias (N,) or None -> C (M, N) (``out``). The mask over C's positions; scale, 1/(1-p), bias in fp32.
    Forward: ``lora_up(u, lora_b.T, s, bias)``; dx's: ``lora_up(v, lora_a, 1, None, p, seed)``."""
    (m, r), n = u.shape, l.shape[-1]
    out = _alloc.empty((m, n), dtype=u.dtype, device=u.device) if out is None else out
    ok = l.shape[0] == r and out.shape == (m, n) and out.dtype == u.dtype and (bias is None or bias.shape == (n,))
    _check("fastlora lora_up (u, L, out)", ok, u, l, out)
    if m == 0 or n == 0:
        return out
    br = r_tile(r)
    args = (u, l, bias if bias is not None else out, out, m, n, r, triton.next_power_of_2(m), *u.stride(),
            *l.stride(), *out.stride(), float(scale), *_dropout_args(p, seed))  # fmt: skip
    flags = {"HAS_BIAS": bias is not None, "DROPOUT": p > 0.0, "BR": br}
    _launch(_lora_up_kernel, lambda meta: (triton.cdiv(n, meta["BN"]), triton.cdiv(m, meta["BM"])), args, flags,
            UP_CONFIGS, ["M_BUCKET", "N", "R", "HAS_BIAS", "DROPOUT", "BR"])  # fmt: skip
    return out


def lora_grads(g: torch.Tensor, b: torch.Tensor, u: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, dB) = (scale·g·B, scale·gᵀ·u): g (M, N), b = B (N, r), u (M, r), any strides, one dtype ->
    v (M, r), dB (N, r) contiguous. One pass over g for r <= 64 (one per 64 of r beyond): program (m, n)
    owns rows [m·BM, +BM) and a chunk of N, and each g tile feeds both products."""
    (m, n), r = g.shape, b.shape[-1]
    _check("fastlora lora_grads (g, B, u)", b.shape[0] == n and u.shape == (m, r), g, b, u)
    v = _alloc.empty((m, r), dtype=g.dtype, device=g.device)
    db = _alloc.empty((n, r), dtype=g.dtype, device=g.device)
    if m == 0 or n == 0:
        return v.zero_(), db.zero_()
    kind = _kind(g.dtype)
    br = r_tile(r)
    bm = _grads_bm(kind, br)
    blocks, r_tiles = triton.cdiv(m, bm), triton.cdiv(r, br)
    n_chunk, n_splits = _splits(n, blocks * r_tiles, CHUNK_ALIGN[kind])
    v_part, db_part = _planes(n_splits, (m, r), v), _planes(blocks, (n, r), db)
    args = (g, b, u, v_part, db_part, m, n, r, triton.next_power_of_2(m), n_chunk, *g.stride(), *b.stride(),
            *u.stride(), m * r if n_splits > 1 else 0, n * r if blocks > 1 else 0, float(scale))  # fmt: skip
    _launch(_lora_grads_kernel, lambda meta: (blocks, n_splits, r_tiles), args, {"BM": bm, "BR": br},
            GRADS_CONFIGS, ["M_BUCKET", "N", "R", "N_CHUNK", "BR"])  # fmt: skip
    return _finish(v_part, v), _finish(db_part, db)


def lora_grad_a(v: torch.Tensor, x: torch.Tensor, p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """dA = vᵀ·d(x): v (M, r), x (M, K), any strides, one dtype -> (r, K) contiguous; the mask over x's
    positions; the M reduction split in chunks."""
    _check("fastlora lora_grad_a (v, x)", v.shape[0] == x.shape[0], v, x)
    (m, k), r = x.shape, v.shape[1]
    da = _alloc.empty((r, k), dtype=x.dtype, device=x.device)
    if r == 0 or k == 0:
        return da
    if m == 0:
        return da.zero_()
    kind = _kind(x.dtype)
    br = r_tile(r)
    r_tiles = triton.cdiv(r, br)
    m_chunk, m_splits = _splits(m, triton.cdiv(k, 128) * r_tiles, CHUNK_ALIGN[kind])
    part = _planes(m_splits, (r, k), da)
    args = (v, x, part, m, k, r, m_chunk, *v.stride(), *x.stride(), r * k if m_splits > 1 else 0,
            *_dropout_args(p, seed))  # fmt: skip
    _launch(_lora_grad_a_kernel, lambda meta: (triton.cdiv(k, meta["BK"]), m_splits, r_tiles), args,
            {"DROPOUT": p > 0.0, "BR": br}, GRAD_A_CONFIGS, ["M_CHUNK", "K", "R", "DROPOUT", "BR"])  # fmt: skip
    return _finish(part, da)


_SPEC_NAMES: set[str] = set()


def _spec(name, fn, dtype, cfg, flags, ones, fp32_ptrs=(), tc=False) -> None:
    """Register ``fn`` as the JIT builds it at the 8B training shapes (M = 8192, K = N = 4096, r = 16,
    contiguous): unit strides in ``ones``; pointers and ints divisible by 16 in ``div16`` (all but the
    dropout key/threshold and the plane count P); ``fp32_ptrs`` hold partial planes at those shapes."""
    sig = {
        q.name: "constexpr" if "constexpr" in str(q.annotation) else "*fp32" if q.name in fp32_ptrs
        else TL_POINTER[dtype] if q.name.endswith("_ptr") else "fp32" if q.name in ("scale", "inv_keep") else "i32"
        for q in inspect.signature(fn.fn).parameters.values()
    }  # fmt: skip
    div16 = tuple(n for n, t in sig.items() if t not in ("constexpr", "fp32") and n not in ("key", "threshold", "P"))
    name = f"{name}[{str(dtype)[6:]},{','.join(f'{k}={v}' for k, v in flags.items())}]"
    if name in _SPEC_NAMES:
        return  # no dropout flag
    _SPEC_NAMES.add(name)
    ones += ("stride_on",) if fn is _lora_up_kernel else ()
    register(KernelSpec(name=name, fn=fn, signature=sig,
                        constexprs={**flags, **cfg.kwargs, **({"FP32_DOT": dtype == torch.float32} if flags else {})},
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, ones=ones, div16=div16,
                        tensor_core=tc))  # fmt: skip


def _register_aot_specs() -> None:
    """Every kernel x dtype x tuning config at BR = 16 (the 8B rank) without and with dropout, and BR = 64
    (the register peak); lora_up as forward calls it (L = Bᵀ, a view of B (N, r); bias) and as dx (L = A)."""
    for dtype in TL_POINTER:
        kind = "fp32" if dtype == torch.float32 else "tc"
        for br, drop in ((16, False), (16, True), (64, True)):
            d = {"DROPOUT": drop, "BR": br}
            for name, fn, table, flags, ones, parts in (
                ("lora_down", _lora_down_kernel, DOWN_CONFIGS, d, ("stride_xk", "stride_ak"), ()),
                ("lora_up_dx", _lora_up_kernel, UP_CONFIGS, {"HAS_BIAS": False, **d}, ("stride_ur", "stride_ln"), ()),
                ("lora_up_fwd", _lora_up_kernel, UP_CONFIGS, {"HAS_BIAS": True, "DROPOUT": False, "BR": br},
                 ("stride_ur", "stride_lr"), ()),
                ("lora_grads", _lora_grads_kernel, GRADS_CONFIGS, {"BM": _grads_bm(kind, br), "BR": br},
                 ("stride_gn", "stride_br", "stride_ur"), ("v_ptr", "db_ptr")),
                ("lora_grad_a", _lora_grad_a_kernel, GRAD_A_CONFIGS, d, ("stride_vr", "stride_xk"), ("da_ptr",)),
            ):  # fmt: skip
                for i, cfg in enumerate(table[kind]):
                    _spec(f"{name}{i}", fn, dtype, cfg, flags, ones, parts, tc=kind == "tc" and i == 0)
        _spec("lora_sum_partials", _sum_partials_kernel, dtype, _SUM_CONFIG, {}, (), ("part_ptr",))


_register_aot_specs()
