"""Triton kernel: the small-M mixed-adapter forward in ONE launch, base + every adapter.

    y[m] = x[m]·Wᵀ + b + s_i·u[m]·B_iᵀ,   i = idx[m] (no LoRA term at -1),   u = d_i(x)·A_iᵀ (lora_multi.multi_down)

The fused single-adapter kernel (:mod:`fastlora.kernels.lora`) extends K by the adapter's R steps; here each row
of an output tile may have its own adapter, so the low-rank term is a gather: the tile's rows read their own
B_i as one [BM, BN, BR] load (pool_b (S, N, R) through strides), multiplied by u[:, None, :] and summed over R
in fp32, s_i on that sum. Tensor-core dtypes compute it before the W loop (it initialises the accumulator and
its registers are free before W's tiles load); fp32 after it. W is dense (read as V[k, n] = W[n, k]) or 4-bit
NF4/FP4 (bitsandbytes layout, double quantisation too), dequantised tile by tile in registers by
:func:`fastlora.kernels.quant4.w4_tile`: no dequantised W is ever written.

Machine code (sm_90, triton 3.9, bf16 NF4, the 16 x 64 x 128 decode tile, 8 warps): the W loop is the single-adapter
kernel's, 404 instructions an iteration against its 405 (nested statistics: 416 against 422); the gather adds
~300 instructions once per tile and R/16 (1,144 in all against 840), and 126 registers against 101 (2 CTAs an SM
either way). At K = 4096 (32 iterations) that is +2 % instructions.

Bytes (bf16, e = 2; the bound at decode): the batch reads W (N·K/2 + absmax), x and y, and every DISTINCT adapter
it uses once: A_i by multi_down, B_i here (a tile's rows of one slot share the lines). M = 64 rows, 64 adapters
of rank 16, N = K = 4096 NF4 (nested absmax): W 8.39 MB + 0.27 MB, x + y 1.05 MB, adapters 64 x (A 131 KB + B
131 KB) = 16.8 MB: 26.5 MB against one adapter's 9.97 MB, so at most 0.38x the single-adapter throughput at the
bandwidth bound (8 adapters: 11.8 MB, 0.84x). Rank-16 bf16 adapters weigh 2x W's 4-bit bytes at 64 of them.
Reference: :func:`fastlora.kernels.lora_multi_ref.multi_up` + x·Wᵀ.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastlora import _alloc, dispatch
from fastlora.kernels.primitives import check_float, launch, mma, round_like
from fastlora.kernels.quant4 import w4_tile

__all__ = ["multi_fused_fwd"]


@triton.jit
def _gathered_term(u_ptr, b_ptr, scale_ptr, idx_ptr, rm64, rn, m_mask, n_mask, R, stride_um, stride_ur, stride_bs,
                   stride_bn, stride_br, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):  # fmt: skip
    """fp32 (BM, BN) tile of s_i · u[m]·B_iᵀ, i = idx[m] per row: a [BM, BN, BR] gather of the rows' B."""
    slot = tl.load(idx_ptr + rm64, mask=m_mask, other=-1)
    live = slot >= 0
    slot64 = tl.maximum(slot, 0).to(tl.int64)
    term = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        r_mask = rr < R
        u = tl.load(u_ptr + rm64[:, None] * stride_um + rr[None, :] * stride_ur, mask=m_mask[:, None] & r_mask[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        b3 = tl.load(
            b_ptr + slot64[:, None, None] * stride_bs + rn[None, :, None] * stride_bn + rr[None, None, :] * stride_br,
            mask=live[:, None, None] & n_mask[None, :, None] & r_mask[None, None, :],
            other=0.0,
        )
        term += tl.sum(b3.to(tl.float32) * u[:, None, :], axis=2)
    return term * tl.load(scale_ptr + slot64, mask=live, other=0.0)[:, None]


@triton.jit
def _multi_fused_kernel(
    x_ptr, w_ptr, u_ptr, b_ptr, scale_ptr, idx_ptr, bias_ptr, out_ptr, absmax_ptr, nested_absmax_ptr,
    nested_code_ptr, offset, log2_blocksize, M, N, K, R, M_BUCKET, stride_xm, stride_xk, stride_wk, stride_wn,
    stride_um, stride_ur, stride_bs, stride_bn, stride_br, stride_om, stride_on, W_4BIT: tl.constexpr,
    FP4: tl.constexpr, W_ALIGNED: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    ASM_LUT: tl.constexpr, LORA_FIRST: tl.constexpr, FP32_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """y tile = x·Wᵀ + b + s_i·u·B_iᵀ per row; W (N, K) dense (read as V[k, n] through strides) or 4-bit."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BN)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask = rm < M
    n_mask = rn < N
    rm64 = rm.to(tl.int64)
    # the gathered term first (tensor-core dtypes): its [BM, BN, BR] operand is dead before the W loop starts
    if LORA_FIRST:
        acc = _gathered_term(u_ptr, b_ptr, scale_ptr, idx_ptr, rm64, rn, m_mask, n_mask, R, stride_um, stride_ur,
                             stride_bs, stride_bn, stride_br, BM, BN, BR)  # fmt: skip
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        a = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)  # fmt: skip
        if W_4BIT:
            w = w4_tile(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, log2_blocksize, rn, k0, N, K,
                        W_ALIGNED, FP4, NESTED, BN, BK, ASM_LUT)  # fmt: skip
            b = tl.trans(w)
        else:
            b = tl.load(w_ptr + rk.to(tl.int64)[:, None] * stride_wk + rn.to(tl.int64)[None, :] * stride_wn,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # fmt: skip
        acc = mma(a, b, acc, FP32_DOT)
    if not LORA_FIRST:
        acc += _gathered_term(u_ptr, b_ptr, scale_ptr, idx_ptr, rm64, rn, m_mask, n_mask, R, stride_um, stride_ur,
                              stride_bs, stride_bn, stride_br, BM, BN, BR)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm64[:, None] * stride_om + rn.to(tl.int64)[None, :] * stride_on,
             round_like(acc, out_ptr).to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip


_C = triton.Config
# the decode tile of the single-adapter kernel the single-adapter kernel's decode tile (16 x 64 x 128, 8 warps; fp32 16 x 32 x 32); the
# general 4-bit layout (odd K, blocks across rows) gathers per element: 16 x 32 x 16
FUSED_CONFIGS = {"tc": _C({"BM": 16, "BN": 64, "BK": 128}, num_warps=8, num_stages=3), "fp32": _C({"BM": 16,
                 "BN": 32, "BK": 32}, num_warps=4, num_stages=2), "general": _C({"BM": 16, "BN": 32, "BK": 16},
                 num_warps=4, num_stages=1), "interp": _C({"BM": 16, "BN": 32, "BK": 32})}  # fmt: skip


FUSED_BR = 16  # the gathered [BM, BN, BR] operand: 16 x 64 x 16 = 64 fp32 registers a thread at 8 warps; R loops


def _kind(dtype: torch.dtype) -> str:
    if dispatch.interpreting():
        return "interp"
    return "fp32" if dtype == torch.float32 else "tc"


def multi_fused_fwd(x, weight, state, bias, u, pool_b, scales, idx) -> torch.Tensor:
    """y = x·Wᵀ + b + s_i·u·B_iᵀ in ONE launch (base + every adapter): x (M, K); weight (N, K) dense in x's dtype
    or packed 4-bit with ``state``; u (M, R); pool_b (S, N, R); scales (S,) fp32; idx (M,) int32. -> (M, N)."""
    check_float(x, "fastlora multi_fused_fwd")
    m, k = x.shape
    n, r = pool_b.shape[1], pool_b.shape[2]
    out = _alloc.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    w_4bit = state is not None
    nested = w_4bit and state.nested is not None
    if w_4bit:
        aligned = k % 2 == 0 and k % state.blocksize == 0
        absmax = state.absmax
        nested_absmax = state.nested.absmax if nested else absmax
        nested_code = state.nested.code if nested else state.code
        offset, log2_bs = (state.nested.offset if nested else 0.0), int(math.log2(state.blocksize))
        weight, stride_wk, stride_wn = weight.view(torch.uint8), 0, 0
    else:
        aligned, absmax, nested_absmax, nested_code, offset, log2_bs = False, weight, weight, weight, 0.0, 0
        stride_wk, stride_wn = weight.stride(1), weight.stride(0)
    kind = _kind(x.dtype)
    cfg_kind = "general" if w_4bit and not aligned and kind != "interp" else kind
    args = (x, weight, u, pool_b, scales, idx, bias if bias is not None else out, out, absmax, nested_absmax,
            nested_code, offset, log2_bs, m, n, k, r, triton.next_power_of_2(m), *x.stride(), stride_wk, stride_wn,
            *u.stride(), *pool_b.stride(), *out.stride())  # fmt: skip
    flags = {"W_4BIT": w_4bit, "FP4": w_4bit and state.quant_type == "fp4", "W_ALIGNED": aligned, "NESTED": nested,
             "HAS_BIAS": bias is not None, "ASM_LUT": not dispatch.interpreting(),
             "LORA_FIRST": x.dtype != torch.float32, "FP32_DOT": kind != "tc", "BR": FUSED_BR}  # fmt: skip
    cfg = FUSED_CONFIGS[cfg_kind]
    launch(_multi_fused_kernel, lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),), args, flags,
           configs=[cfg], key=[], interpreter_config=FUSED_CONFIGS["interp"])  # fmt: skip
    return out
