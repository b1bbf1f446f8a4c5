"""PyTorch references of the native GEMV and merge: the spec the kernels are tested against."""

from __future__ import annotations

import torch

from fastlora.quant.api import dequantize_4bit
from fastlora.quant.state import QuantState


def gemv_4bit_ref(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    quant_state: QuantState,
    bias: torch.Tensor | None = None,
    *,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_u: torch.Tensor | None = None,
    scale: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of :func:`gemv_4bit` for x of shape (M, K): every operand in ``compute_dtype``
    (fp32 like the kernels, or float64 for tests), the result cast to x's dtype."""
    w = dequantize_4bit(packed_weight, quant_state, torch.float32, backend="torch").to(compute_dtype)
    xc = x.to(compute_dtype)
    y = xc @ w.T
    if bias is not None:
        y = y + bias.to(compute_dtype)
    if lora_b is not None:
        u = lora_u.to(compute_dtype) if lora_u is not None else xc @ lora_a.to(compute_dtype).T
        y = y + (scale * u) @ lora_b.to(compute_dtype).T
    return y.to(x.dtype)


def merge_4bit_ref(
    packed_weight: torch.Tensor,
    quant_state: QuantState,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of :func:`merge_4bit`: ``dequant(W) + scale · B A`` in ``compute_dtype``, cast to ``out_dtype``."""
    w = dequantize_4bit(packed_weight, quant_state, torch.float32, backend="torch").to(compute_dtype)
    return (w + scale * (lora_b.to(compute_dtype) @ lora_a.to(compute_dtype))).to(out_dtype)


def gemv_4bit_multi_ref(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    quant_state: QuantState,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    pool_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_idx: torch.Tensor,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of :func:`gemv_4bit_multi` for x (M, K): ``y[m] = x[m] Wᵀ + b + scales[i] · u[m] B_iᵀ`` with
    ``i = adapter_idx[m]`` (no LoRA term for -1), every operand in ``compute_dtype``, cast to x's dtype.

    Shapes: u (M, R), pool_b (S, N, R), scales (S,), adapter_idx (M,) integer."""
    w = dequantize_4bit(packed_weight, quant_state, torch.float32, backend="torch").to(compute_dtype)
    y = x.to(compute_dtype) @ w.T
    if bias is not None:
        y = y + bias.to(compute_dtype)
    if pool_b.shape[0] == 0 or pool_b.shape[2] == 0:  # no slot or rank 0: the base alone
        return y.to(x.dtype)
    idx = adapter_idx.long()
    on = idx >= 0
    slot = idx.clamp(min=0)
    b_rows = pool_b.to(compute_dtype)[slot]  # (M, N, R): each row's B
    term = torch.einsum("mr,mnr->mn", u.to(compute_dtype), b_rows) * scales.to(compute_dtype)[slot, None]
    y = y + torch.where(on[:, None], term, torch.zeros_like(term))
    return y.to(x.dtype)
