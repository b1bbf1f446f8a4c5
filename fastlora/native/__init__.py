"""fastlora's native kernels (csrc/): the loader and the public entry points.

``fastlora._C`` holds OpenMP C++ kernels for CPU tensors (always) and CUDA kernels (when built
against a CUDA torch): blockwise 4-bit quantise / dequantise, bit-identical to
:mod:`fastlora.quant`'s PyTorch reference; a 4-bit GEMV for small M with a fused LoRA term (one
adapter, or each row's own adapter from a pool: :func:`gemv_4bit_multi`); and
the LoRA merge ``dequant(W) + s·B A``. They are ``torch.library`` ops
(``torch.ops.fastlora.*_native``) with fake implementations, so ``torch.compile`` treats them as
opaque ops with known shapes. The dispatcher (:mod:`fastlora.dispatch`, tables in
:mod:`fastlora.ops`) calls them as the "native" backend.

- :mod:`~fastlora.native.loader`: finding, JIT-building and loading the extension
  (:func:`load`, :func:`is_built`, :func:`has_cuda`, :func:`unavailable_reason`).
- :mod:`~fastlora.native.api`: the entry points (checks, then the op; reference fallback).
- :mod:`~fastlora.native.ref`: the PyTorch spec of the GEMV and the merge.
"""

from fastlora.native.api import (
    MAX_DECODE_M,
    dequantize_4bit_cpu,
    dequantize_blocks,
    gemv_4bit,
    gemv_4bit_multi,
    merge_4bit,
    quantize_4bit_blocks,
    quantize_4bit_cpu,
    quantize_blockwise_blocks,
)
from fastlora.native.loader import has_cuda, is_built, load, unavailable_reason
from fastlora.native.ref import gemv_4bit_multi_ref, gemv_4bit_ref, merge_4bit_ref

__all__ = [
    "MAX_DECODE_M",
    "dequantize_4bit_cpu",
    "dequantize_blocks",
    "gemv_4bit",
    "gemv_4bit_multi",
    "gemv_4bit_multi_ref",
    "gemv_4bit_ref",
    "has_cuda",
    "is_built",
    "load",
    "merge_4bit",
    "merge_4bit_ref",
    "quantize_4bit_blocks",
    "quantize_4bit_cpu",
    "quantize_blockwise_blocks",
    "unavailable_reason",
]
