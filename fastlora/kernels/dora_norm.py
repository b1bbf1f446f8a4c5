"""DoRA's row norm in the pass that dequantises a 4-bit W into the scratch (spec: :mod:`fastlora.kernels.dora_norm_ref`).

DoRA needs ‖W_n + s·B_n A‖ per output row n (``fastlora.ops.dora``):

    ‖W_n + s·B_n A‖² = ‖W_n‖² + 2s·Σ_j B[n, j]·(W Aᵀ)[n, j] + s²·B_n (A Aᵀ) B_nᵀ

At training sizes the LoRA linear already dequantises W once into the shared scratch
(:mod:`fastlora.ops.scratch`) for its GEMM; this kernel does that write and, from the same registers,
the two W-dependent terms: ``sq[n] = Σ_k W[n, k]²`` (fp32 values) and ``wa = W Aᵀ`` (N, r), a tensor-core
dot of the dequantised tile (in the scratch's dtype, exactly the GEMM's operand) with an A tile (r padded
to RP >= 16). So DoRA reads the packed W once, as LoRA does, instead of a second fused-GEMM pass for W Aᵀ.

A program owns ROWS rows and a K range (``k_split`` ranges over K when N / ROWS programs would not fill the
GPU); it loops over that range BC columns at a time and writes partial sums (SPLIT, N) and (SPLIT, N, RP),
which the launcher adds (a fixed order: deterministic). Partial bytes are 4·(1 + RP)/KCH per weight beside
the 2.5 the dequantisation moves (0.5 % at RP = 16, KCH = 1024... see :func:`k_split`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastlora import _alloc, dispatch
from fastlora.kernels.primitives import mma, round_like
from fastlora.kernels.quant4 import w4_tile
from fastlora.kernels.specs import TL_POINTER, KernelSpec, register
from fastlora.quant.state import QuantState

ROWS = 64  # rows a program
BC = 64  # columns an iteration
MAX_RANK = 64  # RP in (16, 32, 64): above, fastlora.ops.dora keeps its two-pass norm
TARGET_PROGRAMS = 528  # 4 programs per SM of an H100/H200 (132 SMs): the K split aims at this many


def supports(dtype: torch.dtype, k: int, blocksize: int, r: int) -> bool:
    """Whether :func:`dequant_norm_into` takes this case: 0 < r <= MAX_RANK and fp16/bf16 (fp32 too under the
    interpreter, where every dtype's dot is the same IEEE fp32 one). fp32 on a GPU keeps the two-pass norm: its
    IEEE dot costs RP FMAs a weight (16-64) against the ~5 weights an SM must dequantise a cycle at HBM speed,
    and its variants spill (triton 3.6, sm_90, 8 warps, RP = 32: 4 spills; 3.9, 4 warps: 255 registers + stack)."""
    return 0 < r <= MAX_RANK and (dtype != torch.float32 or dispatch.interpreting())


def num_warps(aligned: bool) -> int:
    """4 warps for the aligned variant (118-168 registers, sm_80/sm_90, triton 3.6 and 3.9); the general
    (element-gather) variant spills on 4 (255 registers + stack) and takes 8 (169-220 registers)."""
    return 4 if aligned else 8


def rank_tile(r: int) -> int:
    """RP: r padded to a power of two >= 16 (the tensor-core dot's smallest N)."""
    return max(16, triton.next_power_of_2(max(r, 1)))


def k_split(n: int, k: int) -> int:
    """K ranges a row tile is cut into: enough programs for the GPU, each range a multiple of BC and >= 1024
    columns, so the partial sums stay below ~1 % of the bytes moved. Shape-only (the same on every device)."""
    row_tiles = triton.cdiv(n, ROWS)
    by_k = max(1, k // 1024)
    return max(1, min(by_k, triton.cdiv(TARGET_PROGRAMS, row_tiles)))


@triton.jit
def _dequant_norm_kernel(
    packed_ptr,  # (N * K / 2,) uint8
    absmax_ptr,  # (nblocks,) fp32, or uint8 when NESTED
    nested_absmax_ptr,  # fp32 (unused unless NESTED)
    nested_code_ptr,  # (256,) fp32 (unused unless NESTED)
    a_ptr,  # (R, K) in out's dtype, column stride 1
    out_ptr,  # (N, K) fp32/fp16/bf16, column stride 1
    sq_ptr,  # (SPLIT, N) fp32 partial ‖W_n‖²
    wa_ptr,  # (SPLIT, N, RP) fp32 partial W Aᵀ
    scale_ptr,  # (N,) fp32 row scale (SCALE)
    offset,  # fp32 nested offset
    N,
    K,
    R,
    kch,  # columns of a K range (a multiple of BC)
    stride_out,
    stride_a,
    log2_blocksize,
    ALIGNED: tl.constexpr,  # K even and a multiple of the blocksize: byte-pair decode, absmax per 32 columns
    FP4: tl.constexpr,
    NESTED: tl.constexpr,
    ASM_LUT: tl.constexpr,  # byte-permute code table (GPU only)
    ROUND_BITS: tl.constexpr,  # round to the output dtype by bits (the interpreter's casts truncate)
    FP32_DOT: tl.constexpr,  # IEEE fp32 dot (fp32, and every dtype under the interpreter)
    NORM: tl.constexpr,  # emit the partial ‖W_n‖² and W Aᵀ
    STORE: tl.constexpr,  # write the dequantised W (times the row scale when SCALE) into out
    SCALE: tl.constexpr,
    ROWS: tl.constexpr,
    BC: tl.constexpr,
    RP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    j = tl.arange(0, RP)
    k0 = split * kch
    k1 = tl.minimum(K, k0 + kch)
    sq = tl.zeros((ROWS,), dtype=tl.float32)
    wa = tl.zeros((ROWS, RP), dtype=tl.float32)
    if SCALE:
        g = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    for c0 in range(k0, k1, BC):
        cols = c0 + tl.arange(0, BC)
        col_ok = cols < K  # a range's last tile ends at k1 (kch is a multiple of BC) unless it ends at K
        w = w4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, log2_blocksize, rows, c0,
                    N, K, ALIGNED, FP4, NESTED, ROWS, BC, ASM_LUT)  # fmt: skip
        if NORM:
            w = tl.where(col_ok[None, :], w, 0.0)  # nested absmax reads `offset` outside W
            sq += tl.sum(w * w, axis=1)
            wr = w
            if ROUND_BITS:
                wr = round_like(w, out_ptr)
            a = tl.load(a_ptr + j[None, :] * stride_a + cols[:, None], mask=col_ok[:, None] & (j < R)[None, :],
                        other=0.0)  # fmt: skip
            wa = mma(wr.to(out_ptr.dtype.element_ty), a, wa, FP32_DOT)
        if STORE:
            if SCALE:
                w = w * g[:, None]  # one fp32 multiply after code · absmax (no FMA contraction: see the launcher)
            if ROUND_BITS:
                w = round_like(w, out_ptr)
            out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
            tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if NORM:
        part = split * N + rows
        tl.store(sq_ptr + part, sq, mask=row_ok)
        tl.store(wa_ptr + part.to(tl.int64)[:, None] * RP + j[None, :], wa, mask=row_ok[:, None])


def _check(packed: torch.Tensor, state: QuantState, where: str) -> tuple[int, int]:
    if not isinstance(state, QuantState):
        raise TypeError(f"{where}: state must be a fastlora QuantState, got {type(state).__name__}")
    state.validate(packed, where=where)
    if len(state.shape) != 2:
        raise ValueError(f"{where}: the weight must be 2-D (N, K), its shape is {tuple(state.shape)}")
    n, k = (int(d) for d in state.shape)
    if n * k >= 2**31:
        raise ValueError(f"{where}: {n} x {k} weights exceed the kernel's int32 index")
    return n, k


def _check_out(out: torch.Tensor, n: int, k: int, packed: torch.Tensor, where: str) -> None:
    if tuple(out.shape) != (n, k) or out.dtype not in TL_POINTER or (out.stride(1) != 1 and k > 1):
        raise ValueError(f"{where}: out must be ({n}, {k}) fp32/fp16/bf16 with column stride 1, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")  # fmt: skip
    if out.device != packed.device:
        raise ValueError(f"{where}: out is on {out.device}, the weight on {packed.device}")


def _check_a(lora_a: torch.Tensor, dtype: torch.dtype, n: int, k: int, state, packed, where: str) -> None:
    r = lora_a.shape[0]
    if lora_a.dim() != 2 or lora_a.shape[1] != k or not supports(dtype, k, state.blocksize, r):
        raise ValueError(f"{where}: lora_a must be (r, {k}) with 0 < r <= {MAX_RANK}, the dtype fp16/bf16 (fp32 "
                         f"only under the interpreter), got {tuple(lora_a.shape)}, {dtype}")  # fmt: skip
    if lora_a.device != packed.device:
        raise ValueError(f"{where}: lora_a is on {lora_a.device}, the weight on {packed.device}")


def _launch(packed, state, out, a, scale, norm: bool, store: bool):
    """One launch of the kernel; returns (sq (N,), wa (N, r)) fp32 when ``norm``, else None."""
    n, k = (int(d) for d in state.shape)
    r = a.shape[0] if norm else 0
    rp = rank_tile(r)
    split = k_split(n, k) if norm else max(1, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(n, ROWS)))
    split = max(1, min(split, triton.cdiv(k, BC)))
    kch = triton.cdiv(triton.cdiv(k, split), BC) * BC
    split = triton.cdiv(k, kch)
    sq = wa = scale if scale is not None else state.code  # unused pointers when not NORM
    if norm:
        sq = _alloc.empty((split, n), dtype=torch.float32, device=packed.device)
        wa = _alloc.empty((split, n, rp), dtype=torch.float32, device=packed.device)
    nested = state.nested
    if nested is not None:
        nested_absmax, nested_code, offset = nested.absmax, nested.code, nested.offset
    else:  # unused by the kernel
        nested_absmax, nested_code, offset = state.code, state.code, 0.0
    interp = dispatch.interpreting()
    aligned = k % 2 == 0 and k % state.blocksize == 0
    _dequant_norm_kernel[(triton.cdiv(n, ROWS), split)](
        packed.reshape(-1).view(torch.uint8), state.absmax, nested_absmax, nested_code, a, out, sq, wa,
        scale if scale is not None else sq, offset, n, k, r, kch, out.stride(0) if n > 1 and store else k,
        a.stride(0) if r > 1 else k, int(math.log2(state.blocksize)),
        ALIGNED=aligned, FP4=state.quant_type == "fp4", NESTED=nested is not None, ASM_LUT=not interp,
        ROUND_BITS=interp, FP32_DOT=out.dtype == torch.float32 or interp, NORM=norm, STORE=store,
        SCALE=scale is not None, ROWS=ROWS, BC=BC, RP=rp, num_warps=num_warps(aligned), enable_fp_fusion=False,
    )  # fmt: skip
    if not norm:
        return None
    if split > 1:
        return sq.sum(0), wa.sum(0)[:, :r]
    return sq[0], wa[0, :, :r]


def _a_in(lora_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    a = lora_a.to(dtype)
    return a if a.stride(-1) == 1 else a.contiguous()


def norm_terms(
    packed: torch.Tensor, state: QuantState, lora_a: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sq, wa)`` of :func:`dequant_norm_into` without writing W: one read of the packed W (and A from L2).

    ``dtype`` (fp16/bf16; fp32 under the interpreter) is the one the dot takes W and A in (the GEMM's)."""
    n, k = _check(packed, state, "norm_terms")
    _check_a(lora_a, dtype, n, k, state, packed, "norm_terms")
    a = _a_in(lora_a, dtype)
    return _launch(packed, state, a, a, None, True, False)  # out: any `dtype` tensor (never written)


def dequantize_scaled_into(
    packed: torch.Tensor, state: QuantState, row_scale: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``out = diag(row_scale) · W``: W dequantised in fp32, times the fp32 scale of its row, rounded once to out's
    dtype (bit-equal to ``(dequantize_4bit_ref(W, fp32) * row_scale[:, None]).to(out.dtype)``); returns ``out``.

    row_scale: (N,) fp32 on W's device; out: (N, K) fp32/fp16/bf16, column stride 1."""
    n, k = _check(packed, state, "dequantize_scaled_into")
    _check_out(out, n, k, packed, "dequantize_scaled_into")
    if row_scale.shape != (n,) or row_scale.dtype != torch.float32 or row_scale.device != packed.device:
        raise ValueError(f"dequantize_scaled_into: row_scale must be ({n},) fp32 on {packed.device}, got "
                         f"{tuple(row_scale.shape)} {row_scale.dtype} on {row_scale.device}")  # fmt: skip
    _launch(packed, state, out, out, row_scale.contiguous(), False, True)
    return out


def _register_aot_specs() -> None:
    """What the DoRA op launches, per dtype (fp16/bf16) and nesting: the norm pass (NORM) at RP = 16/32/64 and the
    scaled dequantisation (STORE + SCALE), each aligned at the 8B shapes (K = 4096 / 14336: K, kch and the row
    strides multiples of 16, every pointer 16-byte aligned) and general (odd K: no integer hints, RP = 16)."""
    common = {
        "packed_ptr": "*u8",
        "absmax_ptr": None,
        "nested_absmax_ptr": "*fp32",
        "nested_code_ptr": "*fp32",
        "a_ptr": None,
        "out_ptr": None,
        "sq_ptr": "*fp32",
        "wa_ptr": "*fp32",
        "scale_ptr": "*fp32",
        "offset": "fp32",
        **dict.fromkeys(("N", "K", "R", "kch", "stride_out", "stride_a", "log2_blocksize"), "i32"),
    }
    flags = ("ALIGNED", "FP4", "NESTED", "ASM_LUT", "ROUND_BITS", "FP32_DOT", "NORM", "STORE", "SCALE", "ROWS", "BC",
             "RP")  # fmt: skip
    variants = [("norm", rp, aligned) for rp, aligned in ((16, True), (32, True), (64, True), (16, False))]
    variants += [("scale", 16, aligned) for aligned in (True, False)]
    for dtype in (torch.float16, torch.bfloat16):  # fp32 is not launched on a GPU (see supports)
        ptr = TL_POINTER[dtype]
        for nested in (False, True):
            for mode, rp, aligned in variants:
                sig = dict(common, absmax_ptr="*u8" if nested else "*fp32", a_ptr=ptr, out_ptr=ptr)
                pointers = tuple(name for name, t in sig.items() if t.startswith("*"))
                ints = ("N", "K", "kch", "stride_out", "stride_a") if aligned else ()
                norm = mode == "norm"
                tag = f"{str(dtype)[6:]},nested={nested},{mode}" + (f",rp={rp}" if norm else "")
                register(
                    KernelSpec(
                        name=f"dora_norm[{tag}{'' if aligned else ',general'}]",
                        fn=_dequant_norm_kernel,
                        signature={**sig, **dict.fromkeys(flags, "constexpr")},
                        constexprs={
                            "ALIGNED": aligned,
                            "FP4": False,
                            "NESTED": nested,
                            "ASM_LUT": True,
                            "ROUND_BITS": False,
                            "FP32_DOT": False,
                            "NORM": norm,
                            "STORE": not norm,
                            "SCALE": not norm,
                            "ROWS": ROWS,
                            "BC": BC,
                            "RP": rp,
                        },
                        num_warps=num_warps(aligned),
                        div16=(*pointers, *ints),
                    )
                )


_register_aot_specs()
