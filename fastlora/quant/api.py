"""Public 4-bit API: ``quantize_4bit`` and ``dequantize_4bit``: checks, then the op's implementation.

The implementations live in :mod:`fastlora.dispatch`'s tables: the PyTorch reference
(:mod:`fastlora.quant.ref`) is registered here, the Triton and native kernels by
:mod:`fastlora.ops.quant` (imported with fastlora), so this layer imports nothing above it.
Every implementation of ``quantize_4bit`` maps ``(w, quant_type, blocksize)`` to
``(packed (ceil(n/2),) uint8, absmax (nblocks,) fp32)``; of ``quantize_blockwise``
``(x, code, blocksize)`` to ``(q (n,) uint8, absmax fp32)``; of ``dequantize_4bit``
``(packed, state, out_dtype)`` to a tensor of ``state.shape``.
"""

from __future__ import annotations

import torch

from fastlora import dispatch
from fastlora.quant.codes import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, get_code, get_dynamic_map
from fastlora.quant.ref import (
    dequantize_4bit_ref,
    dequantize_blockwise_ref,
    quantize_4bit_ref,
    quantize_blockwise_ref,
)
from fastlora.quant.state import NestedState, QuantState

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    *,
    quant_storage: torch.dtype = torch.uint8,
    backend: str | None = None,
) -> tuple[torch.Tensor, QuantState]:
    """Quantise a float tensor to blockwise 4-bit, byte-identical to ``bnb.functional.quantize_4bit``.

    Args:
        w: fp32/fp16/bf16 tensor of any shape (n elements), e.g. a (N, K) linear weight.
        quant_type: "nf4" or "fp4".
        blocksize: 32, 64, 128, 256, 512, 1024, 2048 or 4096 values per absmax.
        double_quant: quantise the absmax statistics to 8 bits (bitsandbytes' compress_statistics).
        quant_storage: dtype the packed bytes are viewed as (uint8, or e.g. bf16 for FSDP).
        backend: "torch", "triton" or "native" (CPU tensors only, elsewhere it falls back with a
            warning); default by device (see :mod:`fastlora.dispatch`): the native kernels for CPU
            tensors when built (bit-identical to the PyTorch reference), else the reference.

    Returns:
        packed: (ceil(n / 2) / itemsize(quant_storage), 1) tensor of ``quant_storage``.
        state: the :class:`QuantState` that dequantises it.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_4bit: w must be a tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_4bit: w must be float32/float16/bfloat16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"quantize_4bit: w is empty (shape {tuple(w.shape)})")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quantize_4bit: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_4bit: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    nbytes = -(-w.numel() // 2)
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if nbytes % itemsize:
        raise ValueError(
            f"quantize_4bit: {nbytes} packed bytes do not fill whole {quant_storage} elements ({itemsize} bytes each)"
        )
    if w.is_meta:  # shapes only: meta-device model construction
        return _quantize_meta(w, quant_type, blocksize, double_quant, quant_storage)
    choice = dispatch.choose("quantize_4bit", w.device, backend)
    native = choice.backend == "native"
    if not native:  # the native kernel's absmax propagates NaN/Inf: checked after, more cheaply
        _check_finite(w)
    packed, absmax = choice.fn(w, quant_type, blocksize)
    if native and not torch.isfinite(absmax).all():
        _check_finite(w)
    nested = None
    if double_quant:
        offset = absmax.mean()
        code2 = get_dynamic_map(w.device)
        # the statistics go through the native kernel when the weights did, else the reference
        blockwise = dispatch.choose("quantize_blockwise", w.device, "native" if native else "torch")
        absmax, absmax2 = blockwise.fn(absmax - offset, code2, NESTED_BLOCKSIZE)
        nested = NestedState(absmax=absmax2, code=code2, offset=float(offset), blocksize=NESTED_BLOCKSIZE)
    state = QuantState(
        absmax=absmax,
        shape=w.shape,
        dtype=w.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=get_code(quant_type, w.device),
        nested=nested,
    )
    return packed.view(quant_storage).unsqueeze(1), state


def _check_finite(w: torch.Tensor) -> None:
    bad = (~torch.isfinite(w)).sum().item()
    if bad:
        raise ValueError(f"quantize_4bit: w has {bad} NaN/Inf values; a 4-bit block cannot represent them")


def _quantize_meta(w, quant_type, blocksize, double_quant, quant_storage) -> tuple[torch.Tensor, QuantState]:
    nblocks = -(-w.numel() // blocksize)
    packed = torch.empty((-(-w.numel() // 2),), dtype=torch.uint8, device="meta")
    nested = None
    if double_quant:
        absmax = torch.empty((nblocks,), dtype=torch.uint8, device="meta")
        nested = NestedState(
            absmax=torch.empty((-(-nblocks // NESTED_BLOCKSIZE),), device="meta"),
            code=torch.empty((256,), device="meta"),
            offset=0.0,
        )
    else:
        absmax = torch.empty((nblocks,), dtype=torch.float32, device="meta")
    state = QuantState(absmax, w.shape, w.dtype, blocksize, quant_type, torch.empty((16,), device="meta"), nested)
    return packed.view(quant_storage).unsqueeze(1), state


def absmax_fp32(state: QuantState) -> torch.Tensor:
    """(nblocks,) fp32 absmax of ``state``, de-nesting double-quantised statistics as bitsandbytes does."""
    if state.nested is None:
        return state.absmax
    nested = state.nested
    return dequantize_blockwise_ref(state.absmax, nested.absmax, nested.code, nested.blocksize) + nested.offset


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState,
    out_dtype: torch.dtype | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Dequantise a blockwise 4-bit tensor; equal to ``bnb.functional.dequantize_4bit``.

    Args:
        packed: the packed data from :func:`quantize_4bit` (or bitsandbytes), any storage dtype.
        state: its :class:`QuantState`, on the same device.
        out_dtype: fp32, fp16 or bf16; default ``state.dtype``. Values are computed in fp32 and
            rounded to nearest-even.
        backend: "torch", "triton" or "native" (CPU and CUDA tensors); default by device
            (see :mod:`fastlora.dispatch`).

    Returns:
        Tensor of ``state.shape`` and ``out_dtype``.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantize_4bit: state must be a fastlora QuantState, got {type(state).__name__}")
    state.validate(packed, where="dequantize_4bit")
    out_dtype = out_dtype or state.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize_4bit: out_dtype must be float32/float16/bfloat16, got {out_dtype}")
    return dispatch.choose("dequantize_4bit", packed.device, backend).fn(packed, state, out_dtype)


@dispatch.register("quantize_4bit", "torch")
def _quantize_torch(w: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_4bit_ref(w, quant_type, blocksize)


@dispatch.register("quantize_blockwise", "torch")
def _quantize_blockwise_torch(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_blockwise_ref(x, code, blocksize)


@dispatch.register("dequantize_4bit", "torch")
def _dequantize_torch(packed: torch.Tensor, state: QuantState, out_dtype: torch.dtype) -> torch.Tensor:
    return dequantize_4bit_ref(packed, absmax_fp32(state), state.code, state.blocksize, tuple(state.shape), out_dtype)
