"""Plain-PyTorch reference of the bottleneck adapter: the spec the fused kernels follow.

    z  = x W_downᵀ + b_down                    (M×r)   pre-activation, saved for backward
    h  = d(act(z))                             (M×r)   d: inverted dropout on the bottleneck
    y  = res + h W_upᵀ + b_up                  (M×d)   res = x (serial, Houlsby) or a separate
                                                       tensor (parallel, He et al. 2022)
Backward, g = dL/dy:
    dz = d'(g W_up) ⊙ act'(z)                  (M×r)
    dx = [g if serial] + dz W_down             (M×d)   d res = g (parallel)
    dW_up = gᵀ h   db_up = Σ_M g   dW_down = dzᵀ x   db_down = Σ_M dz

Run it in float64 for test references; autograd through :func:`adapter_ref` gives every
reference gradient. The activations, their closed-form derivative act'(z) (the kernels' backward
epilogue) and dropout are :mod:`fastlora.functional`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlora.functional import (
    ACTIVATIONS,
    activation_grad,
    apply_activation,
    apply_dropout,
    check_activation,
)

# Re-exported until fastlora/ops/adapter.py, fastlora/modules/adapter.py and
# fastlora/strategies/bottleneck.py import them from fastlora.functional, their home.
__all__ = ["ACTIVATIONS", "activation_grad", "adapter_ref", "apply_activation", "check_activation"]


def adapter_ref(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str = "gelu",
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """``res + d(act(x W_downᵀ + b_down)) W_upᵀ + b_up`` with ``res = x`` unless ``residual`` is given.

    Args:
        x: (..., d) adapter input.
        w_down: (r, d).  b_down: (r,) or None.  w_up: (d, r).  b_up: (d,) or None.
        activation: one of :data:`ACTIVATIONS`.
        residual: (..., d) like x for the parallel form (e.g. the output of the module the adapter
            runs beside); None for the serial form, whose residual is x itself.
        dropout_p, seed: inverted dropout on the bottleneck activation, mask a function of ``seed``
            drawn over the flattened (M, r) activation (:func:`fastlora.functional.dropout_keep_mask`).

    Returns:
        (..., d) in x's dtype.
    """
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)
    h = apply_activation(F.linear(x2, w_down, b_down), activation)
    delta = F.linear(apply_dropout(h, dropout_p, seed), w_up, b_up)
    res = x2 if residual is None else residual.reshape(-1, d)
    return (res + delta).reshape(*lead, d)
