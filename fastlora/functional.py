"""Dropout and activation functions shared by the kernels' references, the ops and the modules.

Plain PyTorch, importing nothing from fastlora. The fused kernels evaluate the same functions:
dropout from the same seed-derived mask (never stored; forward and backward regenerate it) and
the activations in closed form (:func:`activation_grad` is the derivative their backward
epilogue computes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
"""Known activations: ReLU, exact (erf) GELU as ``nn.GELU()``, tanh-approximated GELU, SiLU (swish).

The kernels index this tuple (``ACT`` = position), so its order is part of their interface."""

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def dropout_keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """The LoRA-dropout mask as a pure function of ``seed``: bool, True where kept (probability 1 - p).

    Forward and backward regenerate it from the seed, so the mask is never stored.

    Args:
        shape: the shape of the tensor dropped out, e.g. (M, K).
        p: drop probability in [0, 1).
        seed: the generator's seed.
        device: where the mask is drawn (the draw differs between CPU and CUDA generators).

    Returns:
        bool tensor of ``shape`` on ``device``.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.rand(shape, generator=g, device=device, dtype=torch.float32) >= p


def apply_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout ``x * keep / (1 - p)`` with the mask of :func:`dropout_keep_mask`; identity at p = 0.

    Args:
        x: any shape, floating dtype.
        p: drop probability in [0, 1).
        seed: the mask's seed.

    Returns:
        Tensor of x's shape and dtype (x itself when p = 0).
    """
    if p == 0.0:
        return x
    keep = dropout_keep_mask(tuple(x.shape), p, seed, x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def check_activation(activation: str, *, where: str = "fastlora") -> None:
    """``ValueError`` naming the known activations unless ``activation`` is one of :data:`ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {activation!r}; known activations: {', '.join(ACTIVATIONS)}")


def apply_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """``act(z)`` elementwise, in z's dtype (``nn.ReLU``, ``nn.GELU()``, ``nn.GELU("tanh")``, ``nn.SiLU``).

    Args:
        z: any shape, floating dtype.
        name: one of :data:`ACTIVATIONS`.
    """
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

    Args:
        z: the pre-activation, any shape, floating dtype.
        name: one of :data:`ACTIVATIONS`.
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
