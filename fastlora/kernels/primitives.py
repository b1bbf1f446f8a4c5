"""Triton building blocks shared by the kernels, and the one launch path every launcher takes.

- :func:`mma`: a tile product into an fp32 accumulator, on tensor cores or in IEEE fp32;
- :func:`round_to_bf16_bits`, :func:`round_like`: round to an output dtype to nearest, the same on
  the GPU and under the interpreter (whose fp32 -> bf16 cast truncates);
- :func:`launch`: one fixed config under the interpreter, the autotuned configs on a GPU.

The 4-bit decoding the GEMM shares with dequantisation (``code_value``, ``load_absmax``, ``w4_tile``)
lives with the 4-bit kernels in :mod:`fastlora.kernels.quant4`: a kernel reading 4-bit weights
depends on that format, not on a general primitive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from fastlora import dispatch


@triton.jit
def mma(a, b, acc, FP32_DOT: tl.constexpr):
    """``acc + a · b`` for tiles a (BM, BK) and b (BK, BN), acc fp32 (BM, BN).

    FP32_DOT: fp32 inputs as IEEE fp32 (no TF32), used for fp32 and for every dtype under the
    interpreter; otherwise a tensor-core dot in a's dtype (b cast to it).
    """
    if FP32_DOT:  # fp32 inputs (IEEE, no TF32), and every dtype under the interpreter
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def round_to_bf16_bits(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (exact to cast afterwards)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_like(x, ptr):
    """fp32 x rounded (to nearest) to ``ptr``'s element type, kept in fp32; exact to cast afterwards."""
    if ptr.dtype.element_ty == tl.bfloat16:
        return round_to_bf16_bits(x)  # the interpreter's fp32 -> bf16 cast truncates
    elif ptr.dtype.element_ty == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def mix32(h):
    """:func:`fastlora.functional._mix32` on uint32 values (multiplication wraps mod 2**32)."""
    h = h ^ (h >> 16)
    h = h * 0x21F0AAAD
    h = h ^ (h >> 15)
    h = h * 0x735A2D97
    return h ^ (h >> 15)


@triton.jit
def keep_mask(rows, cols, key, threshold):
    """The LoRA-dropout keep mask of a [len(rows), len(cols)] tile, bit-equal to
    :func:`fastlora.functional.dropout_keep_mask`: rows/cols int32 or int64 positions in the 2-D view,
    key = ``seed32(seed)`` and threshold = ``drop_threshold(p)`` (ints). The row hash is computed once
    per row; each element costs one more hash and a compare."""
    hr = mix32(rows.to(tl.uint32) ^ key.to(tl.uint32))
    h = mix32(hr[:, None] ^ cols.to(tl.uint32)[None, :])
    return (h >> 8) >= threshold.to(tl.uint32)


def check_float(t: torch.Tensor, where: str) -> None:
    """``TypeError`` unless ``t`` is fp32, fp16 or bf16, the dtypes the Triton kernels take."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{where}: the Triton kernels take float32/float16/bfloat16, got {t.dtype}")


# (id of the kernel, ids of its configs) -> (the autotuner, the configs). Keyed by identity: the
# config lists are module constants, and the value holds them so that no id can be reused.
_AUTOTUNED: dict[tuple[int, tuple[int, ...]], tuple[Any, Sequence[triton.Config]]] = {}


def _autotuned(kernel: Any, configs: Sequence[triton.Config], key: list[str]) -> Any:
    """``triton.autotune(configs, key)(kernel)``, made once per kernel and config list."""
    cache_key = (id(kernel), tuple(map(id, configs)))
    if cache_key not in _AUTOTUNED:
        _AUTOTUNED[cache_key] = (triton.autotune(configs=list(configs), key=key)(kernel), configs)
    return _AUTOTUNED[cache_key][0]


def launch(
    kernel: Any,
    grid: Callable[[dict[str, Any]], tuple[int, ...]],
    args: Sequence[Any],
    flags: dict[str, Any],
    *,
    configs: Sequence[triton.Config],
    key: list[str],
    interpreter_config: triton.Config,
) -> None:
    """Launch ``kernel(*args, **flags)`` over ``grid(meta)`` programs, ``meta`` holding the tile sizes.

    On a GPU the launch is autotuned over ``configs`` (re-tuned when an argument named in ``key``
    changes); every one of them is compiled ahead of time in CI (:mod:`fastlora.aot`). Under the
    interpreter ``interpreter_config`` runs alone, because triton.autotune with several configs fails
    there.

    Args:
        kernel: the ``@triton.jit`` kernel.
        grid: the number of programs for a config's constexprs, e.g. ``lambda meta: (cdiv(m, meta["BM"]),)``.
        args: the kernel's runtime arguments, in order.
        flags: its constexpr arguments other than the tuned tile sizes.
        configs: the tuning configs (their kwargs are constexprs of the kernel).
        key: the arguments whose values select a tuning.
        interpreter_config: the one config run under the interpreter.
    """
    if dispatch.interpreting():
        cfg = interpreter_config.kwargs
        kernel[grid(cfg)](*args, **flags, **cfg)
    else:
        _autotuned(kernel, configs, key)[grid](*args, **flags)
