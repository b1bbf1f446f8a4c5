"""Bandwidth-bound dequantisation of a 4-bit (N, K) weight into a caller's (N, K) buffer.

The large-M LoRA path (:mod:`fastlora.ops.scratch`) dequantises W once per use into a shared
bf16/fp16 scratch buffer and hands it to a dense GEMM, so this kernel only has to run at HBM speed:
it reads 0.5 byte a weight (plus one absmax a block) and writes 2 (bf16/fp16) or 4 (fp32).

Fast variant (K % 32 == 0): the flat bitsandbytes stream is cut into 16-byte chunks of packed bytes
(32 weights, one output row, one absmax block since every blocksize is a multiple of 32). A program
takes ``CHUNKS`` whole chunks: one 16-byte load a chunk, one absmax a chunk (de-nested there), the
nibbles decoded, and the 32 values stored as 16-byte vectors at ``out + row * stride + col``.
General variant (K odd, or not a multiple of 32): every element gathers its byte and absmax.

The code lookup is a compile-time choice (``TABLE``): a 64-byte table read through L1 (one load
a weight) or the select tree of :func:`~fastlora.kernels.quant4.code_value`. sm_90 SASS of the fast
variant, bf16, nested, per 16-byte chunk (triton 3.6 / 3.9): 390 / 368 instructions with the table,
648 / 656 with the select tree (320 FSEL); both 1 LDG.E.128 and 4 STG.E.128 (8 for fp32), 62 / 96
registers. The issue budget at HBM speed is about 805 (:func:`bandwidth_ceiling`), so the table keeps
half of it free; the general variant (about 1540 a 32 weights, nested) is issue-bound near 50 %.

Bit-equal to :func:`fastlora.quant.ref.dequantize_4bit_ref` in every output dtype: the product
``code * absmax`` is one fp32 multiply, nested absmax ``code2[q] * absmax2 + offset`` is compiled
without FMA contraction (as bitsandbytes), and the cast rounds to nearest-even (the GPU's cast does;
under the interpreter, whose fp32 -> bf16 cast truncates, the bits are rounded first).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from fastlora import _alloc, dispatch
from fastlora.kernels.primitives import round_to_bf16_bits
from fastlora.kernels.quant4 import code_value, load_absmax
from fastlora.kernels.specs import TL_POINTER, KernelSpec, register
from fastlora.quant.state import QuantState

FAST_CHUNKS = 512  # 16-byte chunks a program of the fast variant: 8 KiB packed, 16384 weights
FAST_WARPS = 8  # 2 chunks a thread: 96 registers (4 chunks a thread take 211)
GENERAL_TILE = 2048  # elements a program of the general variant
TABLE = True  # code lookup of the GPU launch: the L1 table (see the module docstring)


@triton.jit
def _store(out_ptrs, value, mask, ROUND_BITS: tl.constexpr):
    if ROUND_BITS:  # noqa: SIM102 (two constexpr tests, valid on every triton)
        if out_ptrs.dtype.element_ty == tl.bfloat16:
            value = round_to_bf16_bits(value)  # the interpreter's cast truncates
    tl.store(out_ptrs, value.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _code(code_ptr, idx, FP4: tl.constexpr, TABLE: tl.constexpr):
    if TABLE:
        return tl.load(code_ptr + idx)
    else:
        return code_value(idx, FP4)


@triton.jit
def _dequant_chunks_kernel(
    packed_ptr,  # (N * K / 2,) uint8
    absmax_ptr,  # (nblocks,) fp32, or uint8 when NESTED
    code_ptr,  # (16,) fp32
    nested_absmax_ptr,  # (ceil(nblocks / 256),) fp32 (unused unless NESTED)
    nested_code_ptr,  # (256,) fp32 (unused unless NESTED)
    out_ptr,  # (N, K) fp32/fp16/bf16, column stride 1
    offset,  # fp32 nested offset
    n_chunks,  # N * K / 32
    chunks_per_row,  # K / 32
    stride_out,  # out's row stride in elements
    log2_blocksize,
    FP4: tl.constexpr,
    NESTED: tl.constexpr,
    TABLE: tl.constexpr,
    ROUND_BITS: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    chunk = tl.program_id(0) * CHUNKS + tl.arange(0, CHUNKS)  # int32: N * K / 32 < 2**31
    live = chunk < n_chunks
    byte = tl.load(
        packed_ptr + chunk.to(tl.int64)[:, None] * 16 + tl.arange(0, 16)[None, :], mask=live[:, None], other=0
    ).to(tl.int32)
    idx = tl.reshape(tl.join(byte >> 4, byte & 0xF), (CHUNKS, 32))  # high nibble first
    # One absmax a chunk: a chunk starts at a multiple of 32 of the flat stream, inside one block.
    block = (chunk.to(tl.int64) * 32) >> log2_blocksize
    absmax = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, live, NESTED)
    value = _code(code_ptr, idx, FP4, TABLE) * absmax[:, None]
    row = chunk // chunks_per_row
    col = (chunk - row * chunks_per_row) * 32
    start = row.to(tl.int64) * stride_out + col
    _store(out_ptr + start[:, None] + tl.arange(0, 32)[None, :], value, live[:, None], ROUND_BITS)


@triton.jit
def _dequant_general_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    out_ptr,
    offset,
    N,
    K,
    stride_out,
    log2_blocksize,
    FP4: tl.constexpr,
    NESTED: tl.constexpr,
    TABLE: tl.constexpr,
    ROUND_BITS: tl.constexpr,
    ROWS: tl.constexpr,
    BC: tl.constexpr,
):
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(0) * BC + tl.arange(0, BC)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    flat = rows.to(tl.int64)[:, None] * K + cols[None, :]
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    idx = tl.where((flat & 1) == 1, byte & 0xF, byte >> 4)  # even element: high nibble
    absmax = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, flat >> log2_blocksize, mask, NESTED)
    value = _code(code_ptr, idx, FP4, TABLE) * absmax
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    _store(out_ptrs, value, mask, ROUND_BITS)


def _check(packed: torch.Tensor, state: QuantState, out: torch.Tensor) -> tuple[int, int]:
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantize_4bit_into: state must be a fastlora QuantState, got {type(state).__name__}")
    state.validate(packed, where="dequantize_4bit_into")
    if len(state.shape) != 2:
        raise ValueError(f"dequantize_4bit_into: the weight must be 2-D (N, K), its shape is {tuple(state.shape)}")
    n, k = state.shape
    if tuple(out.shape) != (n, k):
        raise ValueError(f"dequantize_4bit_into: out has shape {tuple(out.shape)}, the weight {(n, k)}")
    if out.dtype not in TL_POINTER:
        raise TypeError(f"dequantize_4bit_into: out must be float32/float16/bfloat16, got {out.dtype}")
    if out.stride(1) != 1 and k > 1:
        raise ValueError(f"dequantize_4bit_into: out's column stride must be 1, found {out.stride(1)}")
    if out.stride(0) < k and n > 1:
        raise ValueError(f"dequantize_4bit_into: out's row stride {out.stride(0)} is below K = {k}")
    if out.device != packed.device:
        raise ValueError(f"dequantize_4bit_into: out is on {out.device}, the weight on {packed.device}")
    if n * k >= 2**31:
        raise ValueError(f"dequantize_4bit_into: {n} x {k} weights exceed the kernel's int32 index")
    return n, k


def dequantize_4bit_into(packed: torch.Tensor, state: QuantState, out: torch.Tensor) -> torch.Tensor:
    """Write the 4-bit weight ``(packed, state)`` dequantised into ``out``; return ``out``.

    Args:
        packed: the packed bytes, ``state.packed_numel`` of them (any storage dtype, any shape).
        state: its :class:`~fastlora.quant.QuantState`, ``state.shape == (N, K)``, NF4 or FP4, any
            blocksize, nested (double-quantised) or not; on packed's device.
        out: (N, K) fp32/fp16/bf16 tensor on the same device, column stride 1, row stride >= K (the
            columns beyond K are left untouched, so a caller can place other columns beside W).

    Returns:
        ``out``, holding ``code[index] * absmax[block]`` rounded to nearest-even, bit-equal to
        :func:`fastlora.quant.ref.dequantize_4bit_ref`.

    Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``. Launched on the current stream.
    """
    n, k = _check(packed, state, out)
    packed = packed.reshape(-1).view(torch.uint8)
    nested = state.nested
    if nested is not None:
        nested_absmax, nested_code, offset = nested.absmax, nested.code, nested.offset
    else:  # unused by the kernel; any fp32 tensors will do
        nested_absmax, nested_code, offset = state.code, state.code, 0.0
    args = (packed, state.absmax, state.code, nested_absmax, nested_code, out, offset)
    flags = {
        "FP4": state.quant_type == "fp4",
        "NESTED": nested is not None,
        "TABLE": TABLE,
        "ROUND_BITS": dispatch.interpreting(),
        "enable_fp_fusion": False,  # nested absmax: code2 * absmax2, then + offset, as bitsandbytes
    }
    log2_bs = int(math.log2(state.blocksize))
    stride = out.stride(0) if n > 1 else k
    if k % 32 == 0:
        n_chunks = n * k // 32
        grid = (triton.cdiv(n_chunks, FAST_CHUNKS),)
        _dequant_chunks_kernel[grid](
            *args, n_chunks, k // 32, stride, log2_bs, CHUNKS=FAST_CHUNKS, num_warps=FAST_WARPS, **flags
        )
    else:
        bc = min(triton.next_power_of_2(k), 512)
        rows = GENERAL_TILE // bc
        grid = (triton.cdiv(k, bc), triton.cdiv(n, rows))
        _dequant_general_kernel[grid](*args, n, k, stride, log2_bs, ROWS=rows, BC=bc, **flags)
    return out


def dequantize_4bit_fast(packed: torch.Tensor, state: QuantState, out_dtype: torch.dtype) -> torch.Tensor:
    """The ``dequantize_4bit`` dispatch signature over :func:`dequantize_4bit_into`: a new tensor of ``state.shape``
    (any shape: the flat stream is dequantised as one (1, n) row when W is not 2-D) and ``out_dtype``."""
    shape = tuple(state.shape)
    flat = shape if len(shape) == 2 else (1, state.numel)
    out = _alloc.empty(flat, dtype=out_dtype, device=packed.device)
    if flat != shape:
        state = dataclasses.replace(state, shape=torch.Size(flat))
    return dequantize_4bit_into(packed, state, out).view(shape)


def bandwidth_ceiling(
    instructions_per_chunk: float,
    out_bytes: int = 2,
    blocksize: int = 64,
    nested: bool = True,
    *,
    sms: int = 132,
    clock_ghz: float = 1.98,
    bandwidth_tbs: float = 3.35,
) -> float:
    """Fraction of HBM bandwidth the fast variant can draw when its issue rate limits it (capped at 1).

    The model of ``benchmarks/cuda_sass.py`` (H100 SXM: 132 SMs, 1.98 GHz, 3.35 TB/s): an SM issues at
    most 4 warp-instructions = 128 lane-instructions a cycle; a lane's chunk is 32 weights, so an SM
    decodes ``128 * 32 / instructions_per_chunk`` weights a cycle, against the ``bandwidth / (SMs x
    clock)`` bytes a cycle that HBM delivers to it divided by the bytes a weight moves: 0.5 packed +
    ``out_bytes`` written + the absmax (1 byte nested, 4 plain) per ``blocksize`` weights.
    """
    bytes_per_weight = 0.5 + out_bytes + (1 if nested else 4) / blocksize
    needed = bandwidth_tbs * 1e12 / (sms * clock_ghz * 1e9) / bytes_per_weight  # weights a cycle an SM
    return min(1.0, 128 * 32 / instructions_per_chunk / needed)


_SIG_COMMON = {
    "packed_ptr": "*u8",
    "absmax_ptr": None,
    "code_ptr": "*fp32",
    "nested_absmax_ptr": "*fp32",
    "nested_code_ptr": "*fp32",
    "out_ptr": None,
    "offset": "fp32",
}
_FLAGS = ("FP4", "NESTED", "TABLE", "ROUND_BITS")


def _register_aot_specs() -> None:
    """Both variants x dtype x nesting, with the launcher's table lookup (the binary is the same for NF4 and
    FP4, so FP4=False stands for both), at the 8B shapes: pointers 16-byte aligned, and for the fast variant
    n_chunks / chunks_per_row / stride_out multiples of 16 (K = 4096 or 14336, a row stride of K or more)."""
    for dtype, ptr in TL_POINTER.items():
        for nested in (False, True):
            common = dict(_SIG_COMMON, absmax_ptr="*u8" if nested else "*fp32", out_ptr=ptr)
            flags = {"FP4": False, "NESTED": nested, "TABLE": TABLE, "ROUND_BITS": False}
            tag = f"{str(dtype)[6:]},nested={nested}"
            pointers = tuple(name for name, t in common.items() if t.startswith("*"))
            fast = dict(common, n_chunks="i32", chunks_per_row="i32", stride_out="i32", log2_blocksize="i32")
            register(
                KernelSpec(
                    name=f"dequant_chunks[{tag}]",
                    fn=_dequant_chunks_kernel,
                    signature={**fast, **dict.fromkeys((*_FLAGS, "CHUNKS"), "constexpr")},
                    constexprs={**flags, "CHUNKS": FAST_CHUNKS},
                    num_warps=FAST_WARPS,
                    div16=(*pointers, "n_chunks", "chunks_per_row", "stride_out"),
                )
            )
            general = dict(common, N="i32", K="i32", stride_out="i32", log2_blocksize="i32")
            register(
                KernelSpec(
                    name=f"dequant_general[{tag}]",
                    fn=_dequant_general_kernel,
                    signature={**general, **dict.fromkeys((*_FLAGS, "ROWS", "BC"), "constexpr")},
                    constexprs={**flags, "ROWS": GENERAL_TILE // 512, "BC": 512},
                    div16=pointers,  # an odd K: no hint on K or the row stride
                )
            )


_register_aot_specs()
