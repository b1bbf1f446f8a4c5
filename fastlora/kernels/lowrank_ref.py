"""Plain-PyTorch reference of LoRA's low-rank products: the spec :mod:`fastlora.kernels.lowrank` follows.

    lora_down:   u  = d(x)·Aᵀ                  (M, r)    mask over x's (M, K) positions
    lora_up:     C  = d'(s·(u·L)) + bias       (M, N)    mask over C's (M, N) positions
    lora_grads:  v  = s·g·B,   dB = s·gᵀ·u     (M, r), (N, r)
    lora_grad_a: dA = vᵀ·d(x)                  (r, K)    mask over x's (M, K) positions

``d`` is inverted dropout with the counter-based mask of :func:`fastlora.functional.apply_dropout`.
Used by the torch backend and, in float64, by the tests.
"""

from __future__ import annotations

import torch

from fastlora.functional import apply_dropout

__all__ = ["lora_down", "lora_grad_a", "lora_grads", "lora_up"]


def lora_down(x: torch.Tensor, a: torch.Tensor, p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """u = d(x)·Aᵀ: x (M, K), a = A (r, K) -> (M, r) in x's dtype."""
    return apply_dropout(x, p, seed) @ a.T


def lora_up(
    u: torch.Tensor,
    l: torch.Tensor,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    p: float = 0.0,
    seed: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """C = d'(scale·(u·L)) + bias: u (M, r), l = L (r, N), bias (N,) or None -> (M, N) in u's dtype
    (written into ``out`` when given)."""
    if p == 0.0 and bias is not None:
        c = torch.addmm(bias, u, l, alpha=scale)  # s and the bias on the fp32 accumulator: one rounding
    else:
        c = apply_dropout(_scaled_mm(u, l, scale), p, seed)
        if bias is not None:
            c = c + bias
    if out is None:
        return c
    return out.copy_(c)


def lora_grads(g: torch.Tensor, b: torch.Tensor, u: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, dB) = (scale·g·B, scale·gᵀ·u): g (M, N), b = B (N, r), u (M, r) -> (M, r), (N, r)."""
    return _scaled_mm(g, b, scale), _scaled_mm(g.T, u, scale)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · a @ b`` with the scale applied to the fp32 accumulator (addmm's alpha on CPU and cuBLAS), so an
    fp16/bf16 result overflows only where the exact one does (``scale * (a @ b)`` rounds ``a @ b`` first, and
    ``(scale * a) @ b`` overflows an operand). a: (M, K), b: (K, N)."""
    return torch.addmm(a.new_zeros(()).expand(a.shape[0], b.shape[1]), a, b, beta=0, alpha=scale)


def lora_grad_a(v: torch.Tensor, x: torch.Tensor, p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """dA = vᵀ·d(x): v (M, r), x (M, K) -> (r, K)."""
    return v.T @ apply_dropout(x, p, seed)
