"""Triton kernels: the fused bottleneck adapter, forward and the M-sized backward GEMMs.

Two GEMM shapes cover all four M-sized products (reference: :mod:`fastlora.kernels.adapter_ref`),
one module each; this module holds the four entry points the op calls:

- :mod:`~fastlora.kernels.adapter_down`, (M, K)·(K, R) -> (M, R), inner size K = d, with an activation epilogue:
    forward:  ``z = x W_downᵀ + b_down``, writes ``h = act(z)`` and (training) ``z``;
    backward: ``dh = g W_up``, reads z, writes ``dz = dh ⊙ act'(z)`` and ``h = act(z)``.
- :mod:`~fastlora.kernels.adapter_up`, (M, R)·(R, N) -> (M, N), inner size R = r, with a bias + residual epilogue:
    forward:  ``y  = res + h W_upᵀ + b_up``;
    backward: ``dx = g + dz W_down`` (serial form; the parallel form has no g term).

Weights are read through strides, so one kernel serves both directions with no transposed copy.
The r tile is padded to >= 16 (the smallest tensor-core K and N) with masks, so r = 1 or 8 runs.

What the backward needs, and why z is saved rather than recomputed: act'(z) needs the
pre-activation z, which cannot be recovered from h for GELU or SiLU. Recomputing it means a
second ``x W_downᵀ`` GEMM: 2·M·d·r FLOPs and a full read of x (M·d), one sixth of the adapter's
FLOPs per step (forward 2 GEMMs + backward 4 GEMMs of 2·M·d·r each). Saving z costs M·r elements,
r/d of the input x that the backward keeps anyway: at Llama-8B sizes (M = 4096 tokens, d = 4096,
r = 64, bf16) 0.5 MiB per adapter beside 32 MiB for x, and the backward reads z in the epilogue of
a GEMM that streams g (32 MiB) anyway. h is NOT saved: the backward's down-shaped kernel recomputes
``h = act(z)`` in the same epilogue (M·r elementwise work, no GEMM) for ``dW_up = gᵀ h``. z is kept in
the input's dtype and the forward computes h from that rounded z, as PyTorch does, so the backward
differentiates the function the forward evaluated.

The weight gradients ``dW_up = gᵀ h`` (d×r) and ``dW_down = dzᵀ x`` (r×d), and the bias sums, reduce
over M: outputs of a few tiles with a long inner loop, which cuBLAS runs with split-K across the
whole GPU; a Triton kernel would need split-K with atomics (non-deterministic) or a second pass
to fill the machine. They go through torch (see :mod:`fastlora.ops.adapter`).
"""

from __future__ import annotations

import torch

from fastlora import _alloc
from fastlora.kernels.adapter_down import down_gemm
from fastlora.kernels.adapter_up import up_gemm


def adapter_down_triton(
    x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, activation: str, store_z: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``z = x W_downᵀ + b_down``, ``h = act(z)`` in one launch.

    Args:
        x: (M, d) fp32/fp16/bf16, any strides.
        w_down: (r, d) in x's dtype, any strides.  b_down: (r,) or None.
        activation: one of ``ACTIVATIONS``.
        store_z: also write z (for the backward).

    Returns:
        h (M, r) and z (M, r) or None, contiguous, in x's dtype.
    """
    m, r = x.shape[0], w_down.shape[0]
    z = _alloc.empty((m, r), dtype=x.dtype, device=x.device) if store_z else None
    h, _ = down_gemm(x, w_down, (w_down.stride(1), w_down.stride(0)), b_down, z, activation, False, store_z)
    return h, z


def adapter_up_triton(
    h: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """``y = residual + h W_upᵀ + b_up`` in one launch.

    Args:
        h: (M, r) fp32/fp16/bf16, any strides.  w_up: (d, r) in h's dtype.  b_up: (d,) or None.
        residual: (M, d), any strides: x (serial adapter) or a module's output (parallel adapter).

    Returns:
        (M, d) contiguous, in h's dtype.
    """
    return up_gemm(h, w_up, (w_up.stride(1), w_up.stride(0)), w_up.shape[0], b_up, residual)


def adapter_dz_triton(
    g: torch.Tensor, w_up: torch.Tensor, z: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dz = (g W_up) ⊙ act'(z)`` and ``h = act(z)`` in one launch.

    Args:
        g: (M, d) gradient of the output, any strides.  w_up: (d, r) in g's dtype.
        z: (M, r) contiguous pre-activation saved by :func:`adapter_down_triton`.

    Returns:
        dz (M, r) and h (M, r), contiguous, in g's dtype.
    """
    if not z.is_contiguous():
        z = z.contiguous()
    dz, h = down_gemm(g, w_up, (w_up.stride(0), w_up.stride(1)), None, z, activation, True, False)
    return dz, h


def adapter_dx_triton(dz: torch.Tensor, w_down: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """``dx = g + dz W_down`` in one launch (``g=None`` for the parallel form: ``dz W_down`` alone).

    Args:
        dz: (M, r).  w_down: (r, d) in dz's dtype.  g: (M, d) or None, any strides.

    Returns:
        (M, d) contiguous, in dz's dtype.
    """
    return up_gemm(dz, w_down, (w_down.stride(0), w_down.stride(1)), w_down.shape[1], None, g)
