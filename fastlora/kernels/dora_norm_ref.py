"""Plain-PyTorch reference of :mod:`fastlora.kernels.dora_norm`: the spec the kernel follows.

One pass over a 4-bit (N, K) W gives, for DoRA's row norm ‖W_n + s·B_n A‖:

    w_dq = dequant(W) in ``dtype``          (N, K)   the scratch the GEMM reads (bit-equal to dequantize_4bit_ref)
    sq[n]    = Σ_k W[n, k]²                  (N,)     of the fp32 dequantised values (code · absmax)
    wa[n, j] = Σ_k w_dq[n, k] · A[j, k]      (N, r)   of the ``dtype`` values (the tensor-core operands)

Used by the tests in float64 (``acc=torch.float64``).
"""

from __future__ import annotations

import torch

from fastlora.quant.api import absmax_fp32
from fastlora.quant.ref import dequantize_4bit_ref
from fastlora.quant.state import QuantState


def dequant_norm(
    packed: torch.Tensor, state: QuantState, lora_a: torch.Tensor, dtype: torch.dtype, acc: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_dq (N, K) ``dtype``, sq (N,) ``acc``, wa (N, r) ``acc``) of a 4-bit (N, K) W and A (r, K) (used in ``dtype``)."""
    n, k = (int(d) for d in state.shape)
    flat = packed.reshape(-1).view(torch.uint8)
    w32 = dequantize_4bit_ref(flat, absmax_fp32(state).float(), state.code, state.blocksize, (n, k), torch.float32)
    w = w32.to(dtype)
    sq = w32.to(acc).square().sum(1)
    wa = w.to(acc) @ lora_a.to(dtype).to(acc).T
    return w, sq, wa


def dequant_scaled(
    packed: torch.Tensor, state: QuantState, row_scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(N, K) ``dtype``: diag(row_scale)·W with W dequantised in fp32, one rounding (row_scale (N,) fp32)."""
    n, k = (int(d) for d in state.shape)
    flat = packed.reshape(-1).view(torch.uint8)
    w32 = dequantize_4bit_ref(flat, absmax_fp32(state).float(), state.code, state.blocksize, (n, k), torch.float32)
    return (w32 * row_scale.float()[:, None]).to(dtype)
