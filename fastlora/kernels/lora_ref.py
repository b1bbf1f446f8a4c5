"""Plain-PyTorch reference of one LoRA linear layer: the spec the fused kernels follow.

    u  = d(x) Aᵀ                               (M×r)
    y  = x Wᵀ + b + s · u Bᵀ                   (M×N)
    v  = s · g B                               (M×r)     g = dL/dy
    dB = s · gᵀ u                              (N×r)
    dA = vᵀ d(x)                               (r×K)
    dx = g W + d'(v A)                         (M×K)

``d`` is inverted dropout on the LoRA path only: ``d(x) = x * keep / (1 - p)``, and ``d'`` the
same mask applied to a gradient. Run it in float64 for test references; autograd through
:func:`lora_linear_ref` gives every reference gradient.
"""

from __future__ import annotations

import torch


def dropout_keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """The LoRA-dropout mask as a pure function of ``seed``: bool, True where kept (probability 1 - p).

    Forward and backward regenerate it from the seed, so the mask is never stored.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.rand(shape, generator=g, device=device, dtype=torch.float32) >= p


def apply_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout ``x * keep / (1 - p)`` with the mask of :func:`dropout_keep_mask`; identity at p = 0."""
    if p == 0.0:
        return x
    keep = dropout_keep_mask(tuple(x.shape), p, seed, x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


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
