"""The native kernels' Python entry points: argument checks, then ``torch.ops.fastlora.*_native``.

Each falls back to its PyTorch reference (:mod:`fastlora.native.ref`, :mod:`fastlora.quant.ref`)
with one logged warning when the extension is not loaded (:mod:`fastlora.native.loader`).
"""

from __future__ import annotations

import torch

from fastlora.native import loader
from fastlora.native.ref import gemv_4bit_ref, merge_4bit_ref
from fastlora.quant.api import dequantize_4bit, quantize_4bit
from fastlora.quant.codes import get_bounds
from fastlora.quant.ref import _blockwise_lut, quantize_4bit_ref, quantize_blockwise_ref
from fastlora.quant.state import QuantState

MAX_DECODE_M = 16  # rows of x the CUDA decode GEMV takes (one register accumulator per row)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# -- raw kernels (the "native" implementations in fastlora.ops.quant's dispatch tables) -----------------


def _state_args(state: QuantState) -> tuple:
    nested = state.nested
    if nested is None:
        return state.absmax, state.code, None, None, 0.0, state.blocksize
    return state.absmax, state.code, nested.absmax, nested.code, float(nested.offset), state.blocksize


def quantize_4bit_blocks(w: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Native twin of :func:`~fastlora.quant.ref.quantize_4bit_ref` (bit-identical; CPU).

    Args:
        w: fp32/fp16/bf16 CPU tensor, any shape, n finite values.

    Returns:
        packed: (ceil(n / 2),) uint8; absmax: (ceil(n / blocksize),) fp32.
    """
    ops = loader.ops(w.device, "quantisation")
    if ops is None:
        return quantize_4bit_ref(w, quant_type, blocksize)
    midpoints, order = get_bounds(quant_type, w.device)
    return ops.quantize_4bit_native(w, midpoints, order, blocksize)


def quantize_blockwise_blocks(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Native twin of :func:`~fastlora.quant.ref.quantize_blockwise_ref` (bit-identical; CPU).

    Args:
        x: (n,) fp32 CPU tensor; code: (256,) fp32 sorted code.

    Returns:
        q: (n,) uint8; absmax: (ceil(n / blocksize),) fp32.
    """
    ops = loader.ops(x.device, "quantisation")
    if ops is None:
        return quantize_blockwise_ref(x, code, blocksize)
    lut = _blockwise_lut(tuple(code.tolist()))
    return ops.quantize_blockwise_native(x.reshape(-1).float(), lut.to(x.device), blocksize)


def dequantize_blocks(packed: torch.Tensor, state: QuantState, out_dtype: torch.dtype) -> torch.Tensor:
    """Native twin of :func:`~fastlora.quant.ref.dequantize_4bit_ref`, de-nesting in the kernel.

    Args:
        packed: ``state.packed_numel`` bytes of packed data (any storage dtype), CPU or CUDA.
        state: its validated :class:`QuantState`, same device.
        out_dtype: fp32, fp16 or bf16.

    Returns:
        Tensor of ``state.shape`` and ``out_dtype`` (bit-identical to the reference).
    """
    ops = loader.ops(packed.device, "dequantisation")
    if ops is None:
        return dequantize_4bit(packed, state, out_dtype, backend="torch")
    flat = packed.reshape(-1) if packed.is_contiguous() else packed.contiguous().reshape(-1)
    out = ops.dequantize_4bit_native(flat, *_state_args(state), state.numel, out_dtype)
    return out.view(state.shape)


# -- public API ------------------------------------------------------------------------------------


def quantize_4bit_cpu(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    *,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """:func:`fastlora.quantize_4bit` through the native CPU kernels (OpenMP), bit-identical to it.

    Args:
        w: fp32/fp16/bf16 CPU tensor of any shape (n elements).
        quant_type, blocksize, double_quant, quant_storage: as :func:`fastlora.quantize_4bit`.

    Returns:
        packed: (ceil(n / 2) / itemsize(quant_storage), 1) of ``quant_storage``; state: its :class:`QuantState`.
    """
    if isinstance(w, torch.Tensor) and w.device.type != "cpu":
        raise ValueError(f"fastlora quantize_4bit_cpu: w must be a CPU tensor, got one on {w.device}")
    return quantize_4bit(w, quant_type, blocksize, double_quant, quant_storage=quant_storage, backend="native")


def dequantize_4bit_cpu(
    packed: torch.Tensor, quant_state: QuantState, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """:func:`fastlora.dequantize_4bit` through the native CPU kernels, bit-identical to it.

    Args:
        packed: packed 4-bit CPU data (any storage dtype); quant_state: its :class:`QuantState`.
        out_dtype: fp32, fp16 or bf16; default ``quant_state.dtype``.

    Returns:
        Tensor of ``quant_state.shape`` and ``out_dtype``.
    """
    if isinstance(packed, torch.Tensor) and packed.device.type != "cpu":
        raise ValueError(f"fastlora dequantize_4bit_cpu: packed must be a CPU tensor, got one on {packed.device}")
    return dequantize_4bit(packed, quant_state, out_dtype, backend="native")


def _check_quant_state(where: str, packed: torch.Tensor, quant_state: QuantState) -> tuple[int, int]:
    if not isinstance(quant_state, QuantState):
        got = type(quant_state).__name__
        raise TypeError(f"fastlora {where}: quant_state must be a fastlora QuantState, got {got}")
    if len(quant_state.shape) != 2:
        got = tuple(quant_state.shape)
        raise ValueError(f"fastlora {where}: the 4-bit weight must be 2-D (N, K), got shape {got}")
    quant_state.validate(packed, where=f"fastlora {where}")
    n, k = quant_state.shape
    return n, k


def gemv_4bit(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    quant_state: QuantState,
    bias: torch.Tensor | None = None,
    *,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_u: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``y = x Wᵀ + bias (+ scale · (x Aᵀ) Bᵀ)`` with W a 4-bit (N, K) weight, in one native kernel.

    The decode-time GEMV: W is read once and dequantised in registers, the products accumulate
    in fp32 and y is rounded once. On CUDA at most :data:`MAX_DECODE_M` rows; on CPU any M (the
    OpenMP kernel reuses each dequantised row of W for every row of x).

    Args:
        x: (..., K) fp32/fp16/bf16; M = prod of the leading dims.
        packed_weight: the packed data of W, described by ``quant_state`` (shape (N, K)).
        quant_state: :class:`QuantState` of W, on x's device.
        bias: (N,) in x's dtype, or None.
        lora_a: (r, K) and lora_b: (N, r), in x's dtype: adds ``scale · (x Aᵀ) Bᵀ``.
        lora_u: (..., r) in x's dtype, an already computed ``u = x Aᵀ`` (e.g. with dropout) used
            with ``lora_b`` instead of ``lora_a``.
        scale: the LoRA scaling.

    Returns:
        (..., N) in x's dtype. Without the native extension: the same through
        :func:`gemv_4bit_ref` in fp32, after one warning.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"fastlora gemv_4bit: x must be a float32/float16/bfloat16 tensor, got {got}")
    n, k = _check_quant_state("gemv_4bit", packed_weight, quant_state)
    if x.dim() == 0 or x.shape[-1] != k:
        got = tuple(x.shape)
        raise ValueError(f"fastlora gemv_4bit: x must be (..., {k}) for a weight of shape ({n}, {k}), got {got}")
    if x.device != packed_weight.device:
        raise ValueError(f"fastlora gemv_4bit: x is on {x.device}, the weight on {packed_weight.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x.is_cuda and x2.shape[0] > MAX_DECODE_M:
        raise ValueError(
            f"fastlora gemv_4bit: the CUDA decode kernel takes at most {MAX_DECODE_M} rows of x, got {x2.shape[0]} "
            "(use fastlora.lora_linear for larger batches)"
        )
    u2 = lora_u.reshape(-1, lora_u.shape[-1]) if lora_u is not None else None
    ops = loader.ops(x.device, "GEMV")
    if ops is None:
        y = gemv_4bit_ref(x2, packed_weight, quant_state, bias, lora_a=lora_a, lora_b=lora_b, lora_u=u2, scale=scale)
    else:
        y = ops.gemv_4bit_native(
            x2, packed_weight.reshape(-1), *_state_args(quant_state), n, _contiguous(bias), _contiguous(lora_a),
            _contiguous(lora_b), _contiguous(u2), float(scale),
        )  # fmt: skip
    return y.view(*lead, n)


def merge_4bit(
    packed_weight: torch.Tensor,
    quant_state: QuantState,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dequant(W) + scale · B A``: a 4-bit (N, K) weight with its LoRA update merged, in float.

    Computed in fp32 and rounded once. Re-quantise the result with :func:`fastlora.quantize_4bit`
    for a 4-bit merged weight.

    Args:
        packed_weight, quant_state: the 4-bit weight W of shape (N, K).
        lora_a: (r, K) and lora_b: (N, r), fp32/fp16/bf16 (one dtype), on W's device.
        out_dtype: fp32, fp16 or bf16; default ``quant_state.dtype``.

    Returns:
        (N, K) tensor of ``out_dtype``.
    """
    n, k = _check_quant_state("merge_4bit", packed_weight, quant_state)
    out_dtype = out_dtype or quant_state.dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fastlora merge_4bit: out_dtype must be float32/float16/bfloat16, got {out_dtype}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"fastlora merge_4bit: {name} must be a 2-D tensor, got {getattr(t, 'shape', t)!r}")
    if lora_a.shape[1] != k or lora_b.shape[0] != n or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"fastlora merge_4bit: need lora_a (r, {k}) and lora_b ({n}, r) for a ({n}, {k}) weight, "
            f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    ops = loader.ops(packed_weight.device, "merge")
    if ops is None:
        return merge_4bit_ref(packed_weight, quant_state, lora_a, lora_b, scale, out_dtype)
    return ops.merge_4bit_native(
        packed_weight.reshape(-1), *_state_args(quant_state), _contiguous(lora_a), _contiguous(lora_b), float(scale),
        out_dtype,
    )  # fmt: skip


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()
