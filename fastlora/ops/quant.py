"""The 4-bit ops' kernels in the dispatch tables: quantise, dequantise, and the LoRA merge.

:func:`fastlora.quantize_4bit` / :func:`fastlora.dequantize_4bit` (in :mod:`fastlora.quant.api`)
check their arguments and call what :func:`fastlora.dispatch.choose` picks; the PyTorch
references are registered beside them, the kernels here:

    op                   native (csrc/)            triton                torch
    quantize_4bit        CPU (default)             CUDA (default)        reference
    quantize_blockwise   CPU (with native 4-bit)   -                     reference
    dequantize_4bit      CPU (default), CUDA       CUDA (default)        reference
    merge_4bit           CPU, CUDA (default)       -                     reference

The native kernels are bit-identical to the references (tests/test_native_cpu.py).
"""

from __future__ import annotations

import torch

from fastlora import dispatch, native
from fastlora.kernels import dequant, quant4
from fastlora.quant.api import dequantize_4bit
from fastlora.quant.state import QuantState

_native = {"available": native.unavailable_reason}

dispatch.register("quantize_4bit", "native", devices=("cpu",), default_on=("cpu",), **_native)(
    native.quantize_4bit_blocks
)
dispatch.register("quantize_4bit", "triton", devices=("cuda",), default_on=("cuda",))(quant4.quantize_4bit_triton)
dispatch.register("quantize_blockwise", "native", devices=("cpu",), **_native)(native.quantize_blockwise_blocks)
dispatch.register("dequantize_4bit", "native", devices=("cpu", "cuda"), default_on=("cpu",), **_native)(
    native.dequantize_blocks
)
# the bandwidth-bound kernel (16-byte loads and stores; 390 against the old kernel's 1430 instructions per
# 32 weights in the sm_90 model, kernels/dequant.py), bit-equal to the reference
dispatch.register("dequantize_4bit", "triton", devices=("cuda",), default_on=("cuda",))(dequant.dequantize_4bit_fast)


@dispatch.register("merge_4bit", "native", devices=("cpu", "cuda"), default_on=("cpu", "cuda"), **_native)
def _merge_native(packed, state, lora_a, lora_b, scale, out_dtype):
    return native.merge_4bit(packed, state, lora_a, lora_b, scale, out_dtype)


@dispatch.register("merge_4bit", "torch")
def _merge_torch(packed, state, lora_a, lora_b, scale, out_dtype):
    delta = scale * (lora_b.float() @ lora_a.float())
    return (dequantize_4bit(packed, state, torch.float32) + delta).to(out_dtype)


def merge_4bit(
    packed: torch.Tensor,
    state: QuantState,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype = torch.float32,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``dequant(W) + scale · B A`` for a 4-bit (N, K) weight W, in fp32, rounded once to ``out_dtype``.

    The native kernel where it is built (one pass over W, no dequantised copy), else PyTorch.

    Args:
        packed, state: the 4-bit weight and its :class:`QuantState` (shape (N, K)).
        lora_a: (r, K) and lora_b: (N, r), fp32/fp16/bf16 (one dtype), on W's device.
        scale: the LoRA scaling.
        out_dtype: fp32, fp16 or bf16.
        backend: "native" or "torch"; default by device (see :mod:`fastlora.dispatch`).

    Returns:
        (N, K) tensor of ``out_dtype``.
    """
    if lora_a.dtype != lora_b.dtype:
        lora_a, lora_b = lora_a.float(), lora_b.float()
    choice = dispatch.choose("merge_4bit", packed.device, backend)
    return choice.fn(packed, state, lora_a, lora_b, float(scale), out_dtype)
