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
reference gradient. :func:`activation_grad` is the closed-form act'(z) the kernels evaluate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlora.kernels.lora_ref import apply_dropout

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
"""Known activations: ReLU, exact (erf) GELU as ``nn.GELU()``, tanh-approximated GELU, SiLU (swish)."""

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(activation: str, *, where: str = "fastlora") -> None:
    """``ValueError`` naming the known activations unless ``activation`` is one of :data:`ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {activation!r}; known activations: {', '.join(ACTIVATIONS)}")


def apply_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """``act(z)`` elementwise, in z's dtype (``nn.ReLU``, ``nn.GELU()``, ``nn.GELU("tanh")``, ``nn.SiLU``)."""
    check_activation(name)
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


def activation_grad(z: torch.Tensor, name: str) -> torch.Tensor:
    """``act'(z)`` elementwise, in z's dtype, in closed form (the kernels' backward epilogue).

    relu: 1[z > 0] (0 at z = 0, as PyTorch);  gelu: Φ(z) + z φ(z);
    gelu_tanh: ½(1 + t) + ½ z (1 − t²) √(2/π) (1 + 3·0.044715 z²), t = tanh(√(2/π)(z + 0.044715 z³));
    silu: σ(z) (1 + z (1 − σ(z))).
    """
    check_activation(name)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        return cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    if name == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


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
            drawn over the flattened (M, r) activation (:func:`fastlora.kernels.lora_ref.dropout_keep_mask`).

    Returns:
        (..., d) in x's dtype.
    """
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)
    h = apply_activation(F.linear(x2, w_down, b_down), activation)
    delta = F.linear(apply_dropout(h, dropout_p, seed), w_up, b_up)
    res = x2 if residual is None else residual.reshape(-1, d)
    return (res + delta).reshape(*lead, d)
