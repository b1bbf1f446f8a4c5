"""Triton kernel: the fused LoRA/QLoRA GEMM, forward and input-gradient.

One kernel computes ``out = X · V + U · L (+ bias)`` over an M×N output tile grid:

- forward:  ``y  = x  · Wᵀ + s · (u · Bᵀ) + b``  (V[k, n] = W[n, k], L = Bᵀ), inner size K;
- backward: ``dx = g  · W  +        v · A``     (V[n, k] = W[n, k], L = A, s = 1), inner size N,

i.e. ``[x | s·u] · [Wᵀ ; Bᵀ]`` and ``[g | v] · [W ; A]``: the low-rank term is R extra inner
steps on the same output tile, not a second pass over the output. Those steps sum in fp32 apart,
and s multiplies that sum before it joins the tile's, never the fp16/bf16 u: ``s·u`` rounded to fp16 overflowed as soon as |s·u| > 65504
(lora_alpha 2048, r 8, |x| ≈ 300: every output inf/NaN while the exact ones stay below ~1000). W is read through two
strides, so both directions use one kernel. A 4-bit W (NF4/FP4, bitsandbytes layout, optionally
double-quantised) is dequantised tile by tile in registers; no dequantised copy of W is ever
written to memory. The reference is :mod:`fastlora.kernels.lora_ref`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastlora import _alloc, dispatch
from fastlora.functional import drop_threshold, seed32
from fastlora.kernels.primitives import keep_mask, launch, mma, round_to_bf16_bits
from fastlora.kernels.quant4 import w4_tile
from fastlora.quant.state import QuantState


@triton.jit
def _lora_term(
    u_ptr, l_ptr, rm64, rn, m_mask, n_mask, R, stride_um, stride_ur, stride_lr, stride_ln, lora_scale,
    drop_key, drop_threshold, drop_scale, DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """fp32 (BM, BN) tile of ``s · d'(U L)``: U L summed apart in fp32 and scaled there (s never touches an
    fp16/bf16 operand); d' the dropout mask of the output positions, regenerated from the seed."""
    lora = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        r_mask = rr < R
        u = tl.load(
            u_ptr + rm64[:, None] * stride_um + rr[None, :] * stride_ur,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        lw = tl.load(
            l_ptr + rr[:, None] * stride_lr + rn[None, :] * stride_ln,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        lora = mma(u, lw, lora, FP32_DOT)
    if DROPOUT:  # dx = g·W + d'(v·A): the mask regenerated from the seed, never read from memory
        rm = rm64.to(tl.int32)
        keep = keep_mask(rm, rn, drop_key, drop_threshold)
        lora = tl.where(keep, lora * drop_scale, 0.0)
    return lora * lora_scale


@triton.jit
def _lora_matmul_kernel(
    x_ptr,  # (M, K) activations
    w_ptr,  # dense W, or packed 4-bit bytes
    u_ptr,  # (M, R) low-rank activations (not scaled: s is applied to their fp32 product)
    l_ptr,  # (R, N) low-rank weight, read through strides
    bias_ptr,  # (N,)
    out_ptr,  # (M, N)
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset,
    log2_blocksize,
    lora_scale,  # s, the low-rank term's factor (fp32)
    drop_key,  # DROPOUT: functional.seed32(seed), as a signed int32
    drop_threshold,  # DROPOUT: functional.drop_threshold(p)
    drop_scale,  # DROPOUT: 1 / (1 - p) (fp32)
    M,
    N,
    K,
    R,
    M_BUCKET,  # autotuning key only: next power of two of M
    stride_xm,
    stride_xk,
    stride_wk,  # dense: V[k, n] = W at k * stride_wk + n * stride_wn
    stride_wn,
    W_ROWS,  # 4-bit: W is (W_ROWS, W_COLS) row-major
    W_COLS,
    stride_um,
    stride_ur,
    stride_lr,
    stride_ln,
    stride_om,
    stride_on,
    W_4BIT: tl.constexpr,
    FP4: tl.constexpr,  # 4-bit code table: FP4, else NF4
    W_ALIGNED: tl.constexpr,  # 4-bit rows hold whole bytes and whole blocks
    W_TRANS: tl.constexpr,  # 4-bit: V = Wᵀ (forward) rather than W (input gradient)
    NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    ASM_LUT: tl.constexpr,  # 4-bit codes by a byte-permute table in inline PTX (GPU only, not the interpreter)
    LORA_FIRST: tl.constexpr,  # the low-rank term initialises the accumulator (else: added after the loop)
    DROPOUT: tl.constexpr,  # d' on the low-rank sum, mask over the OUTPUT positions (the input gradient's)
    FP32_DOT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row-tiles walk the N tiles together, so W tiles are reused from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask = rm < M
    n_mask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)

    # The low-rank term needs a second fp32 tile. Summed first, it initialises acc and is dead before the
    # loop (tensor-core dtypes: 123 registers for the 128 x 128 NF4 dx tile instead of 162, both tiles
    # live in an epilogue); the fp32 FMA tiles keep it after the loop (before it, the 4-bit 32 x 32
    # tile passed 255 registers on sm_90).
    if HAS_LORA and LORA_FIRST:
        acc = _lora_term(
            u_ptr, l_ptr, rm64, rn, m_mask, n_mask, R, stride_um, stride_ur, stride_lr, stride_ln, lora_scale,
            drop_key, drop_threshold, drop_scale, DROPOUT, FP32_DOT, BM, BN, BR,
        )  # fmt: skip
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        a = tl.load(
            x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if W_4BIT:
            if W_TRANS:  # V[k, n] = W[n, k]: W rows rn, columns k0 .. k0 + BK
                w = w4_tile(
                    w_ptr,
                    absmax_ptr,
                    nested_absmax_ptr,
                    nested_code_ptr,
                    offset,
                    log2_blocksize,
                    rn,
                    k0,
                    W_ROWS,
                    W_COLS,
                    W_ALIGNED,
                    FP4,
                    NESTED,
                    BN,
                    BK,
                    ASM_LUT,
                )
                b = tl.trans(w)
            else:  # V[n, k] = W[n, k]: W rows rk, columns pid_n * BN .. + BN
                b = w4_tile(
                    w_ptr,
                    absmax_ptr,
                    nested_absmax_ptr,
                    nested_code_ptr,
                    offset,
                    log2_blocksize,
                    rk,
                    pid_n * BN,
                    W_ROWS,
                    W_COLS,
                    W_ALIGNED,
                    FP4,
                    NESTED,
                    BK,
                    BN,
                    ASM_LUT,
                )
        else:
            b = tl.load(
                w_ptr + rk.to(tl.int64)[:, None] * stride_wk + rn64[None, :] * stride_wn,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
        acc = mma(a, b, acc, FP32_DOT)

    if HAS_LORA and not LORA_FIRST:
        acc += _lora_term(
            u_ptr, l_ptr, rm64, rn, m_mask, n_mask, R, stride_um, stride_ur, stride_lr, stride_ln, lora_scale,
            drop_key, drop_threshold, drop_scale, DROPOUT, FP32_DOT, BM, BN, BR,
        )  # fmt: skip

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        acc = round_to_bf16_bits(acc)  # the interpreter's cast truncates; make both round to nearest
    tl.store(
        out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


# Tuning configs. Tensor-core dtypes (bf16/fp16): large tiles for training sizes (M >= 512), narrow
# ones for decode (M <= 16). fp32 runs IEEE FMA dots (no TF32), so smaller tiles. The general
# 4-bit path (odd K, blocks across rows) gathers per element and is kept unpipelined and small.
# Under the interpreter one small config runs (triton.autotune with several configs fails there).
BR = 16  # low-rank inner step: the smallest tensor-core K
# Every config here compiles without a spill for every variant on sm_80 and sm_90 (tests/test_aot.py)
# with the installed triton and with the GPU machine's 3.6, whose allocator differs. The dequantised
# W tile costs registers, hence BK = 32 at training sizes, 8 warps for the 16 x 64 x 128 decode tile
# (4 warps: 241-255 registers, and 30 spills for dense sm_80 on 3.6) and a 16 x 32 fp32 decode tile
# (16 x 64: 255 registers, spills on sm_90 with 3.6).
TC_CONFIGS = [
    triton.Config({"BM": 128, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BM": 16, "BN": 64, "BK": 128, "GROUP_M": 1}, num_warps=8, num_stages=3),
    triton.Config({"BM": 16, "BN": 32, "BK": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
    # decode at N = 4096: 256 CTAs for 132 SMs (BN = 32 gives 128, BN = 64 gives 64): no split-K needed;
    # 2 warps (4: a spill in NF4 dx fp16 on sm_80 with 3.6)
    triton.Config({"BM": 16, "BN": 16, "BK": 128, "GROUP_M": 1}, num_warps=2, num_stages=4),
]
FP32_CONFIGS = [
    triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=2),
    triton.Config({"BM": 16, "BN": 32, "BK": 32, "GROUP_M": 1}, num_warps=4, num_stages=2),
]
GENERAL_4BIT_CONFIG = triton.Config({"BM": 64, "BN": 32, "BK": 16, "GROUP_M": 8}, num_warps=4, num_stages=2)
# fp32 FMA dots: 64 rows spill 1-2 registers (ptxas settles at 128) in the run-time-specialised binary, and so do
# 32 rows with two stages on triton 3.6 (sm_80, nested); unpipelined, 32 x 32 x 16 takes 72 registers
GENERAL_4BIT_FP32_CONFIG = triton.Config({"BM": 32, "BN": 32, "BK": 16, "GROUP_M": 8}, num_warps=4, num_stages=1)
INTERPRETER_CONFIG = triton.Config({"BM": 16, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)
_TUNING_KEY = ["M_BUCKET", "N", "K", "R", "W_4BIT", "W_ALIGNED", "W_TRANS", "NESTED"]


def configs_for(dtype: torch.dtype, w_4bit: bool, w_aligned: bool) -> list[triton.Config]:
    """The configs the launcher may pick for one kernel variant (all compiled ahead of time in CI)."""
    if w_4bit and not w_aligned:
        return [GENERAL_4BIT_FP32_CONFIG if dtype == torch.float32 else GENERAL_4BIT_CONFIG]
    if dtype == torch.float32:
        return FP32_CONFIGS
    return TC_CONFIGS


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: QuantState | None,
    n_out: int,
    w_trans: bool,
    u: torch.Tensor | None,
    lr: torch.Tensor | None,
    l_strides: tuple[int, int],
    bias: torch.Tensor | None,
    lora_scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """out (M, n_out) = x · V + lora_scale · d'(u · L) + bias, V = Wᵀ (w_trans) or W; d' inverted dropout
    with the mask of the (M, n_out) output positions (identity at dropout_p = 0)."""
    m, k = x.shape
    out = _alloc.empty((m, n_out), dtype=x.dtype, device=x.device)
    r = u.shape[1] if u is not None else 0
    dropout = dropout_p > 0.0 and r > 0
    threshold = drop_threshold(dropout_p)  # validates p
    key = seed32(seed) if dropout else 0
    key -= (key >> 31) << 32  # the same 32 bits as a signed int32: one kernel signature for every seed
    w_4bit = state is not None
    nested = w_4bit and state.nested is not None
    if w_4bit:
        w_rows, w_cols = state.shape
        aligned = w_cols % 2 == 0 and w_cols % state.blocksize == 0
        absmax = state.absmax
        nested_absmax = state.nested.absmax if nested else absmax
        nested_code = state.nested.code if nested else state.code
        offset = state.nested.offset if nested else 0.0
        log2_bs = int(math.log2(state.blocksize))
        weight = weight.view(torch.uint8)
        stride_wk = stride_wn = 0
    else:  # unused pointers: any tensor
        w_rows, w_cols = weight.shape
        aligned = False
        absmax = nested_absmax = nested_code = weight
        offset, log2_bs = 0.0, 0
        stride_wk, stride_wn = (weight.stride(1), weight.stride(0)) if w_trans else weight.stride()
    args = (
        x,
        weight,
        u if u is not None else out,
        lr if lr is not None else out,
        bias if bias is not None else out,
        out,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        log2_bs,
        float(lora_scale),
        key,
        threshold if dropout else 0,
        1.0 / (1.0 - dropout_p),
        m,
        n_out,
        k,
        r,
        triton.next_power_of_2(m),
        x.stride(0),
        x.stride(1),
        stride_wk,
        stride_wn,
        w_rows,
        w_cols,
        u.stride(0) if u is not None else 0,
        u.stride(1) if u is not None else 0,
        l_strides[0],
        l_strides[1],
        out.stride(0),
        out.stride(1),
    )
    flags = {
        "W_4BIT": w_4bit,
        "FP4": w_4bit and state.quant_type == "fp4",
        "W_ALIGNED": aligned,
        "W_TRANS": w_trans,
        "NESTED": nested,
        "HAS_BIAS": bias is not None,
        "HAS_LORA": r > 0,
        "ASM_LUT": not dispatch.interpreting(),
        "LORA_FIRST": x.dtype != torch.float32,
        "DROPOUT": dropout,
        "FP32_DOT": x.dtype == torch.float32 or dispatch.interpreting(),
        "BR": BR,
    }
    launch(
        _lora_matmul_kernel,
        lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n_out, meta["BN"]),),
        args,
        flags,
        configs=configs_for(x.dtype, w_4bit, aligned),
        key=_TUNING_KEY,
        interpreter_config=INTERPRETER_CONFIG,
    )
    return out


def lora_fwd_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: QuantState | None,
    bias: torch.Tensor | None,
    u: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``y = x Wᵀ + s · (u Bᵀ) + b`` in one launch, s applied to the fp32 sum ``u Bᵀ``.

    Args:
        x: (M, K) fp32/fp16/bf16, any strides.
        weight: (N, K) dense in x's dtype, or the packed 4-bit bytes that ``state`` describes.
        state: QuantState of a 4-bit (N, K) weight, or None for a dense weight.
        bias: (N,) or None.
        u: (M, r) ``d(x) Aᵀ`` in x's dtype (not scaled), or None for no low-rank term.
        lora_b: (N, r) in x's dtype.
        scale: s, e.g. lora_alpha / r.

    Returns:
        (M, N) in x's dtype.
    """
    n = state.shape[0] if state is not None else weight.shape[0]
    l_strides = (lora_b.stride(1), lora_b.stride(0)) if lora_b is not None else (0, 0)
    return _launch(x, weight, state, n, True, u, lora_b, l_strides, bias, scale)


def lora_bwd_dx_triton(
    g: torch.Tensor,
    weight: torch.Tensor,
    state: QuantState | None,
    v: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """``dx = g W + d'(v A)`` in one launch (``v = s·g B``; v=None gives ``g W`` alone).

    d' is the LoRA dropout of the forward applied to the gradient: the fp32 sum ``v A`` is multiplied by
    the keep mask of the (M, K) output positions (:func:`fastlora.functional.dropout_keep_mask` with
    ``seed``, regenerated in the kernel) and by ``1 / (1 - dropout_p)`` before it joins the tile.

    Args:
        g: (M, N) gradient of the output, any strides.
        weight, state: as in :func:`lora_fwd_triton`.
        v: (M, r) or None.  lora_a: (r, K).
        dropout_p: drop probability in [0, 1) of the forward's dropout on x; 0 for none.
        seed: that dropout's seed.

    Returns:
        (M, K) in g's dtype.
    """
    k = state.shape[1] if state is not None else weight.shape[1]
    l_strides = (lora_a.stride(0), lora_a.stride(1)) if lora_a is not None else (0, 0)
    return _launch(g, weight, state, k, False, v, lora_a, l_strides, None, 1.0, dropout_p, seed)
