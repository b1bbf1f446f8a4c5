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


_MIX1 = 0x21F0AAAD  # the mixing constants of a 32-bit integer hash (both < 2**31: their products with a
_MIX2 = 0x735A2D97  # 32-bit value fit an int64 without overflow, so torch and Triton compute the same bits)
_MASK32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash of int64 tensors holding values in [0, 2**32): xorshift-multiply, twice."""
    h = h ^ (h >> 16)
    h = (h * _MIX1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MIX2) & _MASK32
    return h ^ (h >> 15)


def seed32(seed: int) -> int:
    """The 32-bit key of a dropout ``seed`` (any Python int): what the kernels take."""
    seed &= (1 << 64) - 1
    return (seed ^ (seed >> 32)) & _MASK32


def drop_threshold(p: float) -> int:
    """The integer threshold of drop probability p: an element is kept when its 24-bit draw is >= this."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"fastlora dropout: p must be in [0, 1), got {p!r}")
    return round(p * (1 << 24))


def dropout_keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """The LoRA-dropout mask as a pure function of ``seed`` and the element's position: True where kept.

    Counter-based, so that every kernel regenerates it where it needs it, never storing it: the
    element (i, j) of the tensor viewed as 2-D (rows = every leading dimension, columns = the last)
    draws ``hash(hash(i ^ key) ^ j) >> 8``, 24 bits, with ``key = seed32(seed)`` and the hash
    :func:`_mix32`; it is kept when that draw is ``>= drop_threshold(p)`` (probability 1 - p up to
    2**-25). The same bits on every device; :func:`fastlora.kernels.primitives.keep_mask` is the
    Triton twin.

    Args:
        shape: the shape of the tensor dropped out, e.g. (M, K); at least 1-D.
        p: drop probability in [0, 1).
        seed: the mask's seed (any Python int).
        device: where the mask is made.

    Returns:
        bool tensor of ``shape`` on ``device``.
    """
    threshold = drop_threshold(p)
    cols = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    r = torch.arange(rows, device=device, dtype=torch.int64)[:, None]
    c = torch.arange(cols, device=device, dtype=torch.int64)[None, :]
    h = _mix32(_mix32((r & _MASK32) ^ seed32(seed)) ^ c)
    return ((h >> 8) >= threshold).reshape(shape)


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
