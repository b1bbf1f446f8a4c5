"""Plain-PyTorch reference of one LoRA linear layer: the spec the fused kernels follow.

    u  = d(x) Aᵀ                               (M×r)
    y  = x Wᵀ + b + s · u Bᵀ                   (M×N)
    v  = s · g B                               (M×r)     g = dL/dy
    dB = s · gᵀ u                              (N×r)
    dA = vᵀ d(x)                               (r×K)
    dx = g W + d'(v A)                         (M×K)

``d`` is inverted dropout on the LoRA path only: ``d(x) = x * keep / (1 - p)``, and ``d'`` the
same mask applied to a gradient (:func:`fastlora.functional.apply_dropout`). Run it in float64 for
test references; autograd through :func:`lora_linear_ref` gives every reference gradient.
"""

from __future__ import annotations

import torch

from fastlora.functional import apply_dropout

__all__ = ["lora_linear_ref"]


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """``x Wᵀ + b + s · d(x) Aᵀ Bᵀ``.

    Args:
        x: (..., K).
        weight: (N, K) dense (already dequantised) base weight.
        bias: (N,) or None.
        lora_a: (r, K).  lora_b: (N, r).
        scale: s, e.g. alpha / r.

    Returns:
        (..., N) in x's dtype.
    """
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y + scale * ((apply_dropout(x, dropout_p, seed) @ lora_a.T) @ lora_b.T)
