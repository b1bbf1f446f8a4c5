"""The native kernels' Python entry points: argument checks, then ``torch.ops.fastlora.*_native``.

Each falls back to its PyTorch reference (:mod:`fastlora.native.ref`, :mod:`fastlora.quant.ref`)
with one logged warning when the extension is not loaded (:mod:`fastlora.native.loader`).
"""

from __future__ import annotations

import torch

from fastlora.native import loader
from fastlora.native.ref import gemv_4bit_multi_ref, gemv_4bit_ref, merge_4bit_ref
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


def gemv_4bit_multi(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    quant_state: QuantState,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    pool_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_idx: torch.Tensor,
    *,
    check_index: bool = True,
) -> torch.Tensor:
    """``y[m] = x[m] Wᵀ + bias + scales[i] · u[m] B_iᵀ`` with ``i = adapter_idx[m]``: a 4-bit base and every
    row's own adapter in one native kernel (no LoRA term for a row of slot -1, the bare base).

    The grouped (BGMV-style) decode GEMV: W is read once and dequantised in registers (on CPU each
    dequantised row of W serves every row of x), the products accumulate in fp32, and the epilogue
    reads each row's slot once and adds its gathered ``B_i`` term; y is rounded once. On CUDA at
    most :data:`MAX_DECODE_M` rows; on CPU any M.

    Args:
        x: (..., K) fp32/fp16/bf16; M = prod of the leading dims.
        packed_weight: the packed data of W, described by ``quant_state`` (shape (N, K)), on x's device.
        quant_state: :class:`QuantState` of W.
        bias: (N,) in x's dtype, or None.
        u: (..., R) (M rows) in x's dtype: ``d_i(x[m]) A_iᵀ``, already computed (zero rows for slot -1).
        pool_b: (S, N, R) in x's dtype: slot i's B in ``pool_b[i]`` (zero-padded past its rank).
        scales: (S,) fp32: slot i's LoRA scaling.
        adapter_idx: (M,) int32/int64: each row's slot in [0, S), or -1 for the bare base.
        check_index: check the index values (a device sync on CUDA; skipped under torch.compile). The
            CUDA kernel skips a row whose slot is out of range instead of reading past the pool.

    Returns:
        (..., N) in x's dtype. Without the native kernel: the same through :func:`gemv_4bit_multi_ref`
        in fp32, after one warning.
    """
    where = "gemv_4bit_multi"
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"fastlora {where}: x must be a float32/float16/bfloat16 tensor, got {got}")
    n, k = _check_quant_state(where, packed_weight, quant_state)
    if x.dim() == 0 or x.shape[-1] != k:
        got = tuple(x.shape)
        raise ValueError(f"fastlora {where}: x must be (..., {k}) for a weight of shape ({n}, {k}), got {got}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    u2, idx = _check_multi_operands(where, x, n, m, bias, u, pool_b, scales, adapter_idx, packed_weight)
    if x.is_cuda and m > MAX_DECODE_M:
        raise ValueError(
            f"fastlora {where}: the CUDA decode kernel takes at most {MAX_DECODE_M} rows of x, got {m} "
            "(use fastlora.ops.lora_multi.lora_linear_multi for larger batches)"
        )
    s = pool_b.shape[0]
    if check_index and idx.numel() > 0 and not torch.compiler.is_compiling():
        bad = (idx < -1) | (idx >= s)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"fastlora {where}: adapter_idx[{pos}] = {int(idx[pos])} is not a slot of the pool: expected -1 "
                f"(the bare base) or 0 <= i < {s} (pool_b has {s} slots)"
            )
    ops = loader.ops(x.device, "grouped GEMV")
    if ops is not None and not hasattr(ops, "gemv_4bit_multi_native"):
        loader._warn_once(
            "fastlora: the loaded native extension has no gemv_4bit_multi_native (built from older sources); "
            "the grouped GEMV falls back to the PyTorch reference"
        )
        ops = None
    if ops is None:
        y = gemv_4bit_multi_ref(x2, packed_weight, quant_state, bias, u2, pool_b, scales, idx)
    else:
        y = ops.gemv_4bit_multi_native(
            x2, packed_weight.reshape(-1), *_state_args(quant_state), n, _contiguous(bias), _contiguous(u2),
            _contiguous(pool_b), _contiguous(scales), _contiguous(idx),
        )  # fmt: skip
    return y.view(*lead, n)


def _check_multi_operands(where, x, n, m, bias, u, pool_b, scales, adapter_idx, packed):
    """Dtypes, shapes and devices of gemv_4bit_multi's LoRA operands; returns u as (M, R) and the index as int32."""
    named = {"bias": bias, "u": u, "pool_b": pool_b, "scales": scales, "adapter_idx": adapter_idx}
    for name, t in named.items():
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastlora {where}: {name} must be a tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"fastlora {where}: {name} is on {t.device}, expected x's device {x.device}")
    if packed.device != x.device:
        raise ValueError(f"fastlora {where}: x is on {x.device}, the weight on {packed.device}")
    for name, t in (("bias", bias), ("u", u), ("pool_b", pool_b)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"fastlora {where}: {name} must be {x.dtype} (x's dtype), got {t.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"fastlora {where}: scales must be float32, got {scales.dtype}")
    if adapter_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fastlora {where}: adapter_idx must be int32 or int64, got {adapter_idx.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fastlora {where}: bias must have shape ({n},), got {tuple(bias.shape)}")
    if pool_b.dim() != 3 or pool_b.shape[1] != n:
        raise ValueError(f"fastlora {where}: pool_b must have shape (S, {n}, R), got {tuple(pool_b.shape)}")
    s, r = pool_b.shape[0], pool_b.shape[2]
    if tuple(scales.shape) != (s,):
        raise ValueError(f"fastlora {where}: scales must have shape ({s},) (one per slot), got {tuple(scales.shape)}")
    if u.dim() == 0 or u.shape[-1] != r or u.numel() != m * r:
        raise ValueError(f"fastlora {where}: u must have shape ({m}, {r}) (M rows of rank R), got {tuple(u.shape)}")
    if tuple(adapter_idx.shape) != (m,):
        raise ValueError(
            f"fastlora {where}: adapter_idx must have shape ({m},) (one slot per row of x), got "
            f"{tuple(adapter_idx.shape)}"
        )
    return u.reshape(m, r), adapter_idx.to(torch.int32)


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
