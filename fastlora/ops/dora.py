"""DoRA (weight-decomposed LoRA, Liu et al. 2024) on top of :func:`fastlora.ops.lora_linear`.

    y = m ⊙ (W + s·B A) x / ‖W + s·B A‖_row + b        (no LoRA dropout)
    y = x Wᵀ + b + (g - 1) ⊙ d(x) Wᵀ + g ⊙ s·d(x) Aᵀ Bᵀ,  g = m / ‖W + s·B A‖_row   (with dropout d, as peft)

The row norm is a constant in backward (detached, DoRA paper §4.3, as peft does), so the gradients of
x, A and B are LoRA's with the output gradient scaled by g, and dm = Σ_rows g_out ⊙ z / ‖·‖.

The norm never materialises W + s·B A (N, K): per output row n,

    ‖W_n + s B_n A‖² = ‖W_n‖² + 2s Σ_j B[n,j] (W Aᵀ)[n,j] + s² B_n (A Aᵀ) B_nᵀ

Where the 4-bit forward runs the training-size path (Triton, ``dequant_gemm``: W dequantised into the shared
scratch, then one GEMM), g = m / ‖·‖ is folded into the operands (``fastlora::dora_dequant_gemm``):

    forward   sq, W Aᵀ   one pass over the packed W (:func:`fastlora.kernels.dora_norm.norm_terms`; no write)
              g          (N,) from the norm (small ops on (N, r) tensors)
              W_g        diag(g)·W dequantised into the scratch (``dora_norm.dequantize_scaled_into``)
              y          C = s·u·(g ⊙ B)ᵀ, then one GEMM y = C + x·W_gᵀ = g ⊙ z   (LoRA's two passes, no [M, N] pass)
    backward  v, dA, dB  LoRA's gradients through B_g = g ⊙ B (dB = g ⊙ dB_g); dx = dy·W_g + v·A (W_g dequantised
                         once, as LoRA's backward dequantises W); dm_n = Σ_i dy[i, n]·y[i, n] / m_n (one read of dy, y)

so DoRA adds to LoRA one read of the packed W (0.5 byte a weight) and the dm reduction; a bias is added to y
outside the op (bias layers only), so that dm reads g ⊙ z unswamped by b. A magnitude exactly 0 leaves no z in y:
its dm is taken as 0 (the true value is Σ_i dy·z / norm).

Elsewhere (small M: the fused kernel or the native GEMV; dense bases; the reference) ‖W_n‖² is frozen
(computed once per base weight by :func:`weight_row_sqnorm`, row-chunked) and W Aᵀ (N, r) is one skinny pass
over W. For a 4-bit W at small M (the fused kernel or the native GEMV, which dequantise in registers) that pass
is folded into the forward's own: the call takes the stacked rows [x; A] (M + r), one read of the packed W, and
the A rows' outputs A·(W + s·B A)ᵀ give W Aᵀ after subtracting s·B (A Aᵀ) (:func:`stacked_applies`); their rows get
no gradient (the norm is detached), so the backward's extra r rows are zeros. Elsewhere W Aᵀ is
``lora_linear(A, W)`` with a zero-rank adapter (W read packed). Everything accumulates in fp32.

LoRA dropout (d) costs a second GEMM over W: y = x Wᵀ + b + (g − 1) ⊙ d(x) Wᵀ + g ⊙ s·d(x) Aᵀ Bᵀ needs both x Wᵀ
and d(x) Wᵀ, two different left operands of W, so there is no exact one-GEMM form; peft's DoRA computes the same
two products (its base layer on x, and ``x_dropped @ Wᵀ`` inside the DoRA term). fastlora runs them as
``(x − d(x)) Wᵀ + b`` and ``d(x) Wᵀ + s·d(x) Aᵀ Bᵀ`` (one fused LoRA pass each); stacking [x − d(x); d(x)] into one
GEMM of 2M rows reads W once but costs the same FLOPs plus an [2M, K] copy.
"""

from __future__ import annotations

import torch

from fastlora import dispatch
from fastlora.functional import apply_dropout
from fastlora.kernels.dora_norm import dequantize_scaled_into, norm_terms, supports
from fastlora.ops import lora_paths, scratch
from fastlora.ops.lora import lora_linear
from fastlora.ops.planner import OP, decide_path, requested_path
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
    a = lora_a.detach().float()
    if quant_state is None:
        wa = torch.mm(a.to(weight.dtype), weight.T).float()  # (r, N): one pass over W, fp32 accumulate
    else:  # x = A (r rows) through the 4-bit linear: W read packed; zero-rank adapter
        k, n = a.shape[1], lora_b.shape[0]
        wa = lora_linear(a, weight, None, a.new_zeros((0, k)), a.new_zeros((n, 0)), 0.0,
                         quant_state=quant_state, backend=backend)  # fmt: skip
        wa = wa.float()
    return norm_from(w_sqnorm, wa.T, lora_a, lora_b, scale)


@torch.no_grad()
def norm_from(sq: torch.Tensor, wa: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float):
    """(N,) fp32 ``sqrt(sq + 2s·Σ_j B[n, j]·wa[n, j] + s²·B_n (A Aᵀ) B_nᵀ)``: sq (N,) ``‖W_n‖²``, wa (N, r) ``W Aᵀ``."""
    a, b = lora_a.detach().float(), lora_b.detach().float()
    cross = (b * wa.float()).sum(1)
    quad = ((b @ (a @ a.T)) * b).sum(1)
    return (sq + (2.0 * scale) * cross + (scale * scale) * quad).clamp_min(0.0).sqrt()


def fused_norm_applies(m: int, k: int, n: int, r: int, quant_state: QuantState | None, dtype: torch.dtype,
                       device: torch.device, backend: str | None, path: str | None) -> bool:  # fmt: skip
    """True when the DoRA forward takes :func:`dequant_norm_into` (see the module docstring): a 4-bit W the kernel
    takes (:func:`~fastlora.kernels.dora_norm.supports`: r <= 64...) and the LoRA forward of this size on Triton's
    ``dequant_gemm`` path."""
    if quant_state is None or len(quant_state.shape) != 2 or not supports(dtype, k, quant_state.blocksize, r):
        return False
    if dispatch.choose(OP, device, backend, m=m, quantized=True).backend != "triton":
        return False
    return decide_path(OP, "triton", path, m, k, n, quant_state.quant_type, dtype)[0] == "dequant_gemm"


def stacked_applies(m: int, k: int, n: int, r: int, quant_state: QuantState | None, dtype: torch.dtype,
                    device: torch.device, backend: str | None, path: str | None) -> bool:  # fmt: skip
    """True when the small-M DoRA forward runs x and A's r rows as one call, [x; A]: a 4-bit W, r > 0, and M + r rows
    on a kernel that reads W packed (the native GEMV, or Triton's fused path), so W is read once."""
    if quant_state is None or r == 0 or len(quant_state.shape) != 2:
        return False
    chosen = dispatch.choose(OP, device, backend, m=m + r, quantized=True).backend
    if chosen == "native":
        return True
    if chosen != "triton":
        return False
    return decide_path(OP, "triton", path, m + r, k, n, quant_state.quant_type, dtype)[0] == "fused"


# -- the training-size 4-bit op: g folded into W's and B's rows ---------------------------------------------------


def _scaled_weight(weight, state, g, dtype):
    """diag(g)·W_dq (N, K) in ``dtype``, dequantised into the shared scratch (valid until its next use)."""
    return dequantize_scaled_into(weight, state, g, scratch.scratch(tuple(state.shape), dtype, weight.device))


@torch.library.custom_op("fastlora::dora_dequant_gemm", mutates_args=())
def _dora_dequant_gemm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    quant_type: str,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    nested_offset: float,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, u, norm): y = g ⊙ (x·W_dqᵀ + s·u·Bᵀ) (M, N) without bias, u = x·Aᵀ (M, r), norm (N,) fp32 ‖W_n + s·B_n A‖,
    g = m / norm. The norm pass reads the packed W; g goes into the scratch's rows and into B's: no [M, N] pass."""
    state = QuantState.from_op_args(absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
                                    nested_offset)  # fmt: skip
    sq, wa = norm_terms(weight, state, lora_a, x.dtype)
    norm = norm_from(sq, wa, lora_a, lora_b, scale)
    g = magnitude.float() / norm
    u = x @ lora_a.T
    w = _scaled_weight(weight, state, g, x.dtype)
    return lora_paths.forward(x, w, None, None, u, (lora_b.float() * g[:, None]).to(x.dtype), scale, "triton"), u, norm


@_dora_dequant_gemm_op.register_fake
def _(x, weight, lora_a, lora_b, magnitude, absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
      nested_offset, scale, backend):  # fmt: skip
    return (x.new_empty((x.shape[0], shape[0])), x.new_empty((x.shape[0], lora_a.shape[0])),
            x.new_empty((shape[0],), dtype=torch.float32))  # fmt: skip


@torch.library.custom_op("fastlora::dora_dequant_gemm_backward", mutates_args=())
def _dora_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    u: torch.Tensor,
    y: torch.Tensor,
    norm: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    quant_type: str,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    nested_offset: float,
    scale: float,
    backend: str,
    needs_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dm) with the norm a constant: LoRA's gradients through B_g = g ⊙ B and W_g = diag(g)·W (one
    dequantisation, as LoRA's backward), dB = g ⊙ dB_g, dm_n = Σ_i dy[i, n]·y[i, n] / m_n (= Σ_i dy·z / norm_n)."""
    state = QuantState.from_op_args(absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
                                    nested_offset)  # fmt: skip
    g = magnitude.float() / norm
    b_g = (lora_b.float() * g[:, None]).to(grad.dtype)
    v, grad_a, grad_bg = lora_paths.lora_grads(grad, x, lora_a, b_g, u, scale, 0.0, 0, backend or None)
    grad_b = (grad_bg.float() * g[:, None]).to(lora_b.dtype)
    # m_n = 0 makes y's column 0 and leaves z unknown: its dm is taken as 0 (the folded path keeps no z)
    m = magnitude.float()
    dm = torch.einsum("mn,mn->n", grad, y).float() / torch.where(m == 0, 1.0, m)
    grad_m = torch.where(m == 0, 0.0, dm).to(magnitude.dtype)
    if not needs_dx:
        return x.new_empty((0,)), grad_a, grad_b, grad_m
    w = _scaled_weight(weight, state, g, grad.dtype)
    return lora_paths.input_grad(grad, w, None, v, lora_a, 0.0, 0, "triton"), grad_a, grad_b, grad_m


@_dora_backward_op.register_fake
def _(grad, x, weight, lora_a, lora_b, magnitude, u, y, norm, absmax, nested_absmax, nested_code, quant_type,
      blocksize, shape, dtype, nested_offset, scale, backend, needs_dx):  # fmt: skip
    grad_x = torch.empty_like(x) if needs_dx else x.new_empty((0,))
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(magnitude)


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, magnitude, absmax, nested_absmax, nested_code, *rest = inputs
    y, u, norm = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, u, y, norm, absmax, nested_absmax, nested_code)
    ctx.args = rest  # quant_type, blocksize, shape, dtype, nested_offset, scale, backend


def _backward(ctx, grad_y, grad_u, grad_norm):
    grad_y = grad_y.contiguous() if grad_y.stride(-1) != 1 else grad_y
    grad_x, grad_a, grad_b, grad_m = torch.ops.fastlora.dora_dequant_gemm_backward(
        grad_y, *ctx.saved_tensors, *ctx.args, ctx.needs_input_grad[0])  # fmt: skip
    grad_x = grad_x if ctx.needs_input_grad[0] else None
    return grad_x, None, grad_a, grad_b, grad_m, *[None] * (3 + len(ctx.args))


_dora_dequant_gemm_op.register_autograd(_backward, setup_context=_setup_context)


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
    path: str | None = None,
) -> torch.Tensor:
    """DoRA forward (see the module docstring), differentiable in x, bias, lora_a, lora_b and magnitude.

    Args:
        x: (..., K) fp32/fp16/bf16.  weight: (N, K) dense in x's dtype, or 4-bit packed with ``quant_state``.
        bias: (N,) in x's dtype or None.  lora_a: (r, K), lora_b: (N, r) in x's dtype.
        magnitude: (N,) any float dtype (the trained ``lora_magnitude_vector``).
        scale: the LoRA scaling.  w_sqnorm: (N,) fp32 ``‖W_n‖²`` (:func:`weight_row_sqnorm`).
        dropout_p, seed: LoRA dropout on the adapter path (peft's placement: the base sees x undropped).
        backend, path: as :func:`fastlora.lora_linear` takes them (default: by device and size).

    Returns:
        (..., N) in x's dtype.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    requested_path(path)
    n, r = lora_b.shape
    if dropout_p == 0.0 and fused_norm_applies(x2.shape[0], k, n, r, quant_state, x.dtype, x.device, backend, path):
        x2 = x2.contiguous() if x2.stride(-1) != 1 else x2
        y, _, _ = torch.ops.fastlora.dora_dequant_gemm(x2, weight, lora_a, lora_b, magnitude,
                                                       *quant_state.op_args(), float(scale), backend or "")  # fmt: skip
        # a bias is added outside (one [M, N] pass, bias layers only): dm reads y = g ⊙ z, which b would swamp
        y = y if bias is None else y + bias
        return y.view(*lead, n)
    if dropout_p == 0.0 and stacked_applies(x2.shape[0], k, n, r, quant_state, x.dtype, x.device, backend, path):
        # [x; A] through one fused pass over the packed W: rows M.. are A·(W + s·B A)ᵀ, the norm's W Aᵀ
        out = lora_linear(torch.cat([x2, lora_a.detach()]), weight, None, lora_a, lora_b, scale,
                          quant_state=quant_state, backend=backend, path=path)  # fmt: skip
        z, p = out[: x2.shape[0]], out[x2.shape[0] :].detach().float()
        with torch.no_grad():
            a32, b32 = lora_a.float(), lora_b.float()
            wa = p.T - scale * (b32 @ (a32 @ a32.T))  # (W + s·B A) Aᵀ − s·B (A Aᵀ) = W Aᵀ
            norm = norm_from(w_sqnorm, wa, lora_a, lora_b, scale)
        g = (magnitude.float() / norm).to(x.dtype)
        y = z * g if bias is None else torch.addcmul(bias, z, g)
        return y.view(*lead, n)
    norm = dora_weight_norm(weight, lora_a, lora_b, scale, w_sqnorm, quant_state=quant_state, backend=backend)
    g = (magnitude.float() / norm).to(x.dtype)  # the norm is a constant for autograd (detached)
    if dropout_p == 0.0:
        z = lora_linear(x2, weight, None, lora_a, lora_b, scale, quant_state=quant_state, backend=backend, path=path)
        y = z * g if bias is None else torch.addcmul(bias, z, g)
    else:
        xd = apply_dropout(x2, dropout_p, seed)
        empty_a, empty_b = x2.new_zeros((0, k)), x2.new_zeros((lora_b.shape[0], 0))
        # x Wᵀ + b − d(x) Wᵀ in one pass over W, then g ⊙ (d(x) Wᵀ + s·d(x) Aᵀ Bᵀ) in a second
        base = lora_linear(x2 - xd, weight, bias, empty_a, empty_b, 0.0, quant_state=quant_state, backend=backend,
                           path=path)  # fmt: skip
        z = lora_linear(xd, weight, None, lora_a, lora_b, scale, quant_state=quant_state, backend=backend, path=path)
        y = torch.addcmul(base, z, g)
    return y.view(*lead, y.shape[-1])
