"""Triton kernels: blockwise 4-bit (NF4/FP4) quantisation, and the decoding the GEMM shares
(``code_value``, ``load_absmax``, ``w4_tile``: a W tile dequantised in registers). Dequantisation
to memory is :mod:`fastlora.kernels.dequant` (bandwidth-bound: 16-byte loads and stores).

The PyTorch reference (the spec) is :mod:`fastlora.quant.ref`; both are byte-for-byte
equal to bitsandbytes. The kernels run on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (tests).

Quantisation divides with ``tl.div_rn`` (IEEE round-to-nearest; plain ``/`` may be an approximate
division on the GPU), which keeps its bytes equal to the reference's on every backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora import _alloc
from fastlora.kernels.specs import TL_POINTER, KernelSpec, register
from fastlora.quant.codes import BLOCKSIZES, get_bounds, get_code


@triton.jit
def _quantize_4bit_kernel(
    w_ptr,  # (n,) fp32/fp16/bf16
    packed_ptr,  # (ceil(n/2),) uint8
    absmax_ptr,  # (nblocks,) fp32
    bounds_ptr,  # (15,) fp32 midpoints between sorted codes
    order_ptr,  # (16,) int32 stored index of the i-th smallest code
    n,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,  # blocks per program
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCKSIZE)
    offs = rows.to(tl.int64)[:, None] * BLOCKSIZE + cols[None, :]
    x = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)

    absmax = tl.max(tl.abs(x), axis=1)
    # 1e-38 is subnormal in fp32: as a bare literal triton 3.6 types it fp64, so it is made fp32 here.
    clamped = tl.maximum(absmax, tl.full([ROWS], 1e-38, tl.float32))
    # Full blocks: x * (1 / absmax); the partial last block: x / absmax (as bitsandbytes).
    recip = tl.div_rn(tl.full([ROWS], 1.0, tl.float32), clamped)
    is_full = (rows.to(tl.int64) + 1) * BLOCKSIZE <= n
    scaled = tl.where(is_full[:, None], x * recip[:, None], tl.div_rn(x, clamped[:, None]))
    # An all-zero block scales to 0 even where the GPU flushes the 1e-38 clamp to zero.
    scaled = tl.where(absmax[:, None] > 0, scaled, 0.0)
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)

    # Nearest code: count the midpoints strictly below the value (ties go to the lower code).
    rank = tl.zeros([ROWS, BLOCKSIZE], dtype=tl.int32)
    for i in tl.static_range(15):
        rank += (scaled > tl.load(bounds_ptr + i)).to(tl.int32)
    idx = tl.load(order_ptr + rank)

    hi, lo = tl.split(tl.reshape(idx, (ROWS, BLOCKSIZE // 2, 2)))
    byte = ((hi << 4) | lo).to(tl.uint8)
    boffs = rows.to(tl.int64)[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + boffs, byte, mask=boffs < (n + 1) // 2)
    tl.store(absmax_ptr + rows, absmax, mask=rows.to(tl.int64) * BLOCKSIZE < n)


@triton.jit
def _pick(bit, if_set, if_clear):
    return tl.where(bit, if_set, if_clear)


@triton.jit
def code_value(idx, FP4: tl.constexpr):
    """fp32 code of 4-bit indices ``idx`` (int32 in 0..15) from the standard NF4/FP4 table, in registers.

    A select tree rather than a table load: inside a GEMM loop a per-element gather is staged in
    shared memory by the software pipeliner (64 KB a stage for a 64x256 tile), and spills.
    """
    b0 = (idx & 1) != 0
    b1 = (idx & 2) != 0
    b2 = (idx & 4) != 0
    if FP4:  # sign-magnitude e2m1 / 12: bit 3 is the sign
        low = _pick(b1, _pick(b0, 1.0, 0.6666666865348816), _pick(b0, 0.0052083334885537624, 0.0))
        high = _pick(b1, _pick(b0, 0.25, 0.1666666716337204), _pick(b0, 0.5, 0.3333333432674408))
        magnitude = _pick(b2, high, low)
        return tl.where((idx & 8) != 0, -magnitude, magnitude)
    else:
        n0 = _pick(b1, _pick(b0, -0.39491748809814453, -0.5250730514526367), _pick(b0, -0.6961928009986877, -1.0))
        n1 = _pick(b1, _pick(b0, 0.0, -0.09105003625154495), _pick(b0, -0.18477343022823334, -0.28444138169288635))
        p0 = _pick(
            b1, _pick(b0, 0.33791524171829224, 0.24611230194568634), _pick(b0, 0.16093020141124725, 0.07958029955625534)
        )
        p1 = _pick(b1, _pick(b0, 1.0, 0.7229568362236023), _pick(b0, 0.5626170039176941, 0.44070982933044434))
        return _pick((idx & 8) != 0, _pick(b2, p1, p0), _pick(b2, n1, n0))


def _lut_words(quant_type: str) -> list[int]:
    """The 16 words of the byte-plane table: plane k (byte k of every code) as codes 0-3, 4-7, 8-11, 12-15."""
    code = [c & 0xFFFFFFFF for c in get_code(quant_type).view(torch.int32).tolist()]
    return [
        sum(((code[first + i] >> (8 * k)) & 0xFF) << (8 * i) for i in range(4))
        for k in range(4)
        for first in (0, 4, 8, 12)
    ]


def _prmt_lut_asm(quant_type: str) -> str:
    """PTX decoding 4 packed bytes (8 indices) into their 8 fp32 codes with byte permutes (PRMT).

    The 16 codes are held as 4 byte planes (plane k: byte k of every code), each 4 words; one ``prmt``
    looks 4 indices up in 8 entries (its selector is 4 nibbles: the packed bytes are that already,
    bit 3 cleared), a second in the other 8, and a ``lop3`` keeps one per index by bit 3. Eight
    ``prmt`` transpose the 4 planes of 4 codes into 4 fp32 values: 47 instructions per 8 weights,
    against about 17 a weight for a 16-way select tree. A ``prmt`` takes one of its two table words
    as an immediate; the other 8 words come in registers ($9, $13, ..., $37: pack 4 gives each 32-bit argument 4
    registers, all equal), held across the K loop.
    Outputs $0..$3: the codes of the high nibbles of bytes 0..3; $4..$7: of the low nibbles; $8: the bytes.
    """
    words = _lut_words(quant_type)
    lines = [
        "{",
        ".reg .b32 m, s1, t, t1, k0, k1, pl, ph, q0, q1, q2, q3, r0, r1;",
        "and.b32 m, $8, 0x77777777;",  # the low 3 bits of each index: 4 selectors a 16-bit half
        "shr.u32 s1, m, 16;",
        "shr.u32 t, $8, 3;",
        "and.b32 t, t, 0x11111111;",  # bit 3 of each index as selector 0 / 1
        "shr.u32 t1, t, 16;",
        "prmt.b32 k0, 0xFF00, 0, t;",  # bit 3 -> byte mask 0x00 / 0xFF
        "prmt.b32 k1, 0xFF00, 0, t1;",
    ]
    # selector nibbles of a half: (low of byte 2h, high of byte 2h, low of byte 2h+1, high of byte 2h+1)
    for sel, mask, outs in (("m", "k0", ("$4", "$0", "$5", "$1")), ("s1", "k1", ("$6", "$2", "$7", "$3"))):
        for k in range(4):
            lines += [
                f"prmt.b32 pl, ${9 + 8 * k}, {hex(words[4 * k + 1])}, {sel};",
                f"prmt.b32 ph, ${13 + 8 * k}, {hex(words[4 * k + 3])}, {sel};",
                f"lop3.b32 q{k}, ph, pl, {mask}, 0xE4;",  # mask ? ph : pl, bitwise
            ]
        lines += [
            "prmt.b32 r0, q0, q1, 0x5140;",
            "prmt.b32 r1, q2, q3, 0x5140;",
            f"prmt.b32 {outs[0]}, r0, r1, 0x5410;",
            f"prmt.b32 {outs[1]}, r0, r1, 0x7632;",
            "prmt.b32 r0, q0, q1, 0x7362;",
            "prmt.b32 r1, q2, q3, 0x7362;",
            f"prmt.b32 {outs[2]}, r0, r1, 0x5410;",
            f"prmt.b32 {outs[3]}, r0, r1, 0x7632;",
        ]
    return "\n".join([*lines, "}"])


# 8 outputs, the packed bytes, then 8 table words of 4 registers each (pack 4: one per element)
_LUT_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 33))
_NF4_LUT_ASM = tl.constexpr(_prmt_lut_asm("nf4"))
_FP4_LUT_ASM = tl.constexpr(_prmt_lut_asm("fp4"))
# The 8 table words a prmt takes in a register (planes 0-3 of codes 0-3 and 8-11), int32; a jit function
# reads module constants one name at a time. tests/test_lora_sass.py checks them against _lut_words.
_NF4_R0 = tl.constexpr(-1607421696)
_NF4_R1 = tl.constexpr(987620351)
_NF4_R2 = tl.constexpr(845887744)
_NF4_R3 = tl.constexpr(50645754)
_NF4_R4 = tl.constexpr(-905563520)
_NF4_R5 = tl.constexpr(-1384373086)
_NF4_R6 = tl.constexpr(-1094729793)
_NF4_R7 = tl.constexpr(1044266557)
_FP4_R0 = tl.constexpr(11250432)
_FP4_R1 = tl.constexpr(11250432)
_FP4_R2 = tl.constexpr(11184640)
_FP4_R3 = tl.constexpr(11184640)
_FP4_R4 = tl.constexpr(-2144687616)
_FP4_R5 = tl.constexpr(-2144687616)
_FP4_R6 = tl.constexpr(1061108480)
_FP4_R7 = tl.constexpr(-1077953792)


@triton.jit
def code_value_bytes(byte, zero, FP4: tl.constexpr, ASM_LUT: tl.constexpr):
    """fp32 codes (high nibble, low nibble) of packed uint8 ``byte``: two tiles of byte's shape.

    ASM_LUT (GPU only: inline assembly does not run under the interpreter): a byte-permute table,
    :func:`_prmt_lut_asm`; ``zero`` is an int32 0 (tile broadcastable to byte's) the compiler cannot see
    through, OR-ed into the table words: a per-thread value, so ptxas keeps the words in registers
    instead of holding them in uniform registers and copying them before every use (39 IMAD.U32 a K
    step of the 128 x 128 x 32 tile). Otherwise the select tree :func:`code_value`. Both give the
    table's bits.
    """
    if ASM_LUT:
        if FP4:
            hi, lo = tl.inline_asm_elementwise(
                _FP4_LUT_ASM,
                _LUT_CONSTRAINTS,
                [
                    byte,
                    zero | _FP4_R0,
                    zero | _FP4_R1,
                    zero | _FP4_R2,
                    zero | _FP4_R3,
                    zero | _FP4_R4,
                    zero | _FP4_R5,
                    zero | _FP4_R6,
                    zero | _FP4_R7,
                ],
                (tl.float32, tl.float32),
                True,
                4,
            )
        else:
            hi, lo = tl.inline_asm_elementwise(
                _NF4_LUT_ASM,
                _LUT_CONSTRAINTS,
                [
                    byte,
                    zero | _NF4_R0,
                    zero | _NF4_R1,
                    zero | _NF4_R2,
                    zero | _NF4_R3,
                    zero | _NF4_R4,
                    zero | _NF4_R5,
                    zero | _NF4_R6,
                    zero | _NF4_R7,
                ],
                (tl.float32, tl.float32),
                True,
                4,
            )
    else:
        b = byte.to(tl.int32)
        hi = code_value(b >> 4, FP4)
        lo = code_value(b & 0xF, FP4)
    return hi, lo


@triton.jit
def load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask, NESTED: tl.constexpr):
    """fp32 absmax of each ``block`` index, de-nesting double-quantised statistics."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        absmax = tl.load(nested_code_ptr + q) * scale + offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def w4_tile(
    w_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset,
    log2_blocksize,
    rows,
    c0,
    N,
    K,
    ALIGNED: tl.constexpr,
    FP4: tl.constexpr,
    NESTED: tl.constexpr,
    ROWS: tl.constexpr,
    BC: tl.constexpr,
    ASM_LUT: tl.constexpr = False,
):
    """fp32 tile ``W[rows, c0 : c0 + BC]`` of a 4-bit (N, K) W, zero outside W, dequantised in registers.

    The GEMM's view of the format (:mod:`fastlora.kernels.lora` reads W through it, so no dequantised
    copy of W is written).

    ALIGNED (K even, K % blocksize == 0, c0 even): the bytes load as a [ROWS, BC/2] tile and
    decode in pairs (:func:`code_value_bytes`, a byte-permute table when ASM_LUT); absmax loads once
    per 32 columns (the smallest blocksize) and is broadcast. The tile is then finite but not zero
    outside W (masked bytes and absmax read 0): the GEMM multiplies it by zeros of x there, or stores
    no output. Otherwise (odd K, blocks across rows) every element gathers its byte and absmax, and the
    tile is zero outside W.
    """
    cols = c0 + tl.arange(0, BC)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    if ALIGNED:
        # The mask on the byte index (not the element index 2 * byte, of stride 2) keeps the bytes of a
        # row one contiguous run to the compiler: one wide load a thread, which the pipeliner issues
        # as cp.async, instead of a byte load per element used a few instructions later.
        half = c0 // 2 + tl.arange(0, BC // 2)
        byte = tl.load(
            w_ptr + rows[:, None] * (K // 2) + half[None, :],
            mask=(rows < N)[:, None] & (half < K // 2)[None, :],
            other=0,
        )
        hi, lo = code_value_bytes(byte, ((rows | c0) >> 31)[:, None], FP4, ASM_LUT)  # rows, c0 >= 0: zero
        code = tl.reshape(tl.join(hi, lo), (ROWS, BC))  # high nibble first
        # one absmax per CW columns: 32 (the smallest blocksize), or the whole tile when it is narrower
        CW: tl.constexpr = 32 if BC > 32 else BC
        chunk = c0 + CW * tl.arange(0, BC // CW)
        block = rows[:, None] * (K >> log2_blocksize) + (chunk >> log2_blocksize)[None, :]
        chunk_mask = (rows < N)[:, None] & (chunk < K)[None, :]
        absmax = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, chunk_mask, NESTED)
        absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (ROWS, BC // CW, CW)), (ROWS, BC))
        return code * absmax
    else:
        flat = rows[:, None] * K + cols[None, :]
        byte = tl.load(w_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        idx = tl.where((flat & 1) == 1, byte & 0xF, byte >> 4)  # even element: high nibble
        block = flat >> log2_blocksize
        absmax = load_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask, NESTED)
        return tl.where(mask, code_value(idx, FP4) * absmax, 0.0)


def _rows_per_program(blocksize: int) -> int:
    return max(1, 2048 // blocksize)


def _num_warps(blocksize: int) -> int:
    """8 warps for blocks of 1024 or more: with 4, a 2048-value block spills a register on sm_80 (fp16/bf16,
    triton 3.9) once the pointers carry the run-time divisibility hints."""
    return 8 if blocksize >= 1024 else 4


def quantize_4bit_triton(w: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`~fastlora.quant.ref.quantize_4bit_ref`.

    Args:
        w: float tensor (fp32/fp16/bf16), any shape, n elements; made contiguous if needed.

    Returns:
        packed: (ceil(n / 2),) uint8; absmax: (ceil(n / blocksize),) fp32.
    """
    w = w.reshape(-1)
    if w.stride(-1) != 1:
        w = w.contiguous()
    n = w.numel()
    bounds, order = get_bounds(quant_type, w.device)
    packed = _alloc.empty(((n + 1) // 2,), dtype=torch.uint8, device=w.device)
    absmax = _alloc.empty((-(-n // blocksize),), dtype=torch.float32, device=w.device)
    rows = _rows_per_program(blocksize)
    grid = (triton.cdiv(n, rows * blocksize),)
    _quantize_4bit_kernel[grid](w, packed, absmax, bounds, order, n, BLOCKSIZE=blocksize, ROWS=rows,
                                num_warps=_num_warps(blocksize))  # fmt: skip
    return packed, absmax


def _register_aot_specs() -> None:
    for dtype, ptr in TL_POINTER.items():
        for bs in BLOCKSIZES:
            register(
                KernelSpec(
                    name=f"quantize_4bit[{str(dtype)[6:]},bs={bs}]",
                    fn=_quantize_4bit_kernel,
                    signature={
                        "w_ptr": ptr,
                        "packed_ptr": "*u8",
                        "absmax_ptr": "*fp32",
                        "bounds_ptr": "*fp32",
                        "order_ptr": "*i32",
                        "n": "i32",
                        "BLOCKSIZE": "constexpr",
                        "ROWS": "constexpr",
                    },
                    constexprs={"BLOCKSIZE": bs, "ROWS": _rows_per_program(bs)},
                    num_warps=_num_warps(bs),
                )
            )


_register_aot_specs()
