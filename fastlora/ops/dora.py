"""DoRA (weight-decomposed LoRA, Liu et al. 2024) on top of :func:`fastlora.ops.lora_linear`.

    y = m ⊙ (W + s·B A) x / ‖W + s·B A‖_row + b        (no LoRA dropout)
    y = x Wᵀ + b + (g - 1) ⊙ d(x) Wᵀ + g ⊙ s·d(x) Aᵀ Bᵀ,  g = m / ‖W + s·B A‖_row   (with dropout d, as peft)

The row norm is a constant in backward (detached, DoRA paper §4.3, as peft does), so the gradients of
x, A and B are LoRA's with the output gradient scaled by g, and dm = Σ_rows g_out ⊙ z / ‖·‖.

The norm never materialises W + s·B A (N, K): per output row n,

    ‖W_n + s B_n A‖² = ‖W_n‖² + 2s Σ_j B[n,j] (W Aᵀ)[n,j] + s² B_n (A Aᵀ) B_nᵀ

‖W_n‖² is frozen (computed once per base weight by :func:`weight_row_sqnorm`, row-chunked), W Aᵀ (N, r)
is one skinny pass over W: for a 4-bit W it is ``lora_linear(A, W)`` with a zero-rank adapter, which reads W
packed (the fused Triton kernel on CUDA, the native GEMV on CPU for r ≤ 16). Everything accumulates in fp32.
"""

from __future__ import annotations

import torch

from fastlora.functional import apply_dropout
from fastlora.ops.lora import lora_linear
from fastlora.quant import QuantState
from fastlora.quant.api import absmax_fp32
from fastlora.quant.ref import dequantize_4bit_ref

_CHUNK_ELEMENTS = 1 << 22  # rows dequantised at a time by weight_row_sqnorm: 16 MB of fp32


@torch.no_grad()
def weight_row_sqnorm(weight: torch.Tensor, quant_state: QuantState | None = None) -> torch.Tensor:
    """(N,) fp32 ``‖W_n‖²`` of a frozen (N, K) weight, dense or 4-bit packed with ``quant_state``.

    A 4-bit weight is dequantised a few rows at a time (chunks aligned to the quantisation blocks,
    at most ~16 MB of fp32), so no (N, K) copy is made.
    """
    if quant_state is None:
        return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
    n, k = (int(d) for d in quant_state.shape)
    bs = quant_state.blocksize
    absmax = absmax_fp32(quant_state).float()
    flat = weight.reshape(-1).view(torch.uint8)
    step = bs // _gcd(k, bs)  # rows per block-aligned group
    rows = max(step, (_CHUNK_ELEMENTS // max(k, 1)) // step * step)
    out = torch.empty(n, dtype=torch.float32, device=weight.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        e0, e1 = r0 * k, r1 * k
        w = dequantize_4bit_ref(flat[e0 // 2 : (e1 + 1) // 2], absmax[e0 // bs : -(-e1 // bs)],
                                quant_state.code, bs, (r1 - r0, k), torch.float32)  # fmt: skip
        out[r0:r1] = w.square().sum(1)
    return out


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@torch.no_grad()
def dora_weight_norm(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    w_sqnorm: torch.Tensor,
    *,
    quant_state: QuantState | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """(N,) fp32 ``‖W_n + s·B_n A‖`` per output row, without forming W + s·B A; no gradient.

    Args:
        weight: (N, K) dense (any float dtype), or packed 4-bit with ``quant_state``.
        lora_a: (r, K), lora_b: (N, r), any float dtype (used in fp32).
        w_sqnorm: (N,) fp32 ``‖W_n‖²`` from :func:`weight_row_sqnorm`.
    """
    a, b = lora_a.detach().float(), lora_b.detach().float()
    if quant_state is None:
        wa = torch.mm(a.to(weight.dtype), weight.T).float()  # (r, N): one pass over W, fp32 accumulate
    else:  # x = A (r rows) through the 4-bit linear: W read packed; zero-rank adapter
        k, n = a.shape[1], lora_b.shape[0]
        wa = lora_linear(a, weight, None, a.new_zeros((0, k)), a.new_zeros((n, 0)), 0.0,
                         quant_state=quant_state, backend=backend)  # fmt: skip
        wa = wa.float()
    cross = (b * wa.T).sum(1)
    quad = ((b @ (a @ a.T)) * b).sum(1)
    return (w_sqnorm + (2.0 * scale) * cross + (scale * scale) * quad).clamp_min(0.0).sqrt()


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    w_sqnorm: torch.Tensor,
    *,
    quant_state: QuantState | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """DoRA forward (see the module docstring), differentiable in x, bias, lora_a, lora_b and magnitude.

    Args:
        x: (..., K) fp32/fp16/bf16.  weight: (N, K) dense in x's dtype, or 4-bit packed with ``quant_state``.
        bias: (N,) in x's dtype or None.  lora_a: (r, K), lora_b: (N, r) in x's dtype.
        magnitude: (N,) any float dtype (the trained ``lora_magnitude_vector``).
        scale: the LoRA scaling.  w_sqnorm: (N,) fp32 ``‖W_n‖²`` (:func:`weight_row_sqnorm`).
        dropout_p, seed: LoRA dropout on the adapter path (peft's placement: the base sees x undropped).

    Returns:
        (..., N) in x's dtype.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    norm = dora_weight_norm(weight, lora_a, lora_b, scale, w_sqnorm, quant_state=quant_state, backend=backend)
    g = (magnitude.float() / norm).to(x.dtype)  # the norm is a constant for autograd (detached)
    if dropout_p == 0.0:
        z = lora_linear(x2, weight, None, lora_a, lora_b, scale, quant_state=quant_state, backend=backend)
        y = z * g if bias is None else torch.addcmul(bias, z, g)
    else:
        xd = apply_dropout(x2, dropout_p, seed)
        empty_a, empty_b = x2.new_zeros((0, k)), x2.new_zeros((lora_b.shape[0], 0))
        # x Wᵀ + b − d(x) Wᵀ in one pass over W, then g ⊙ (d(x) Wᵀ + s·d(x) Aᵀ Bᵀ) in a second
        base = lora_linear(x2 - xd, weight, bias, empty_a, empty_b, 0.0, quant_state=quant_state, backend=backend)
        z = lora_linear(xd, weight, None, lora_a, lora_b, scale, quant_state=quant_state, backend=backend)
        y = torch.addcmul(base, z, g)
    return y.view(*lead, y.shape[-1])
