"""The LoRA linear op: ``torch.library`` custom ops (opaque to torch.compile, with fake shapes),
their autograd, and the functional entry point :func:`lora_linear`.

Chain rule (g = dL/dy, s = scale, d = LoRA dropout, u = d(x) Aᵀ saved from the forward):

    v  = s · g B          dB = s · gᵀ u         dA = vᵀ d(x)
    dx = g W + d'(v A)    (one fused GEMM ``[g | v]·[W ; A]`` when there is no dropout)

Saved for backward: x, u, the frozen weight (packed when 4-bit) and the dropout seed; never a
dequantised W nor an M×N tensor. The skinny products (u, v, dA, dB) go through torch/cuBLAS.

Where s is applied: on the fp32 accumulator of the product it scales (``addmm``'s alpha, the Triton
kernel's u Bᵀ steps, the native GEMV's fp32 epilogue), never on an fp16/bf16 operand. ``(s·u) Bᵀ``
overflows fp16 as soon as |s·u| > 65504 (alpha 2048, r 8, |x| ≈ 300: every output inf/NaN, the exact
ones below 1000); ``s·(u Bᵀ)`` in fp32 rounds once and overflows only where the exact result does.
"""

from __future__ import annotations

import math
import weakref

import torch

from fastlora import dispatch, native
from fastlora.functional import apply_dropout
from fastlora.kernels import lora as lora_kernels
from fastlora.quant import QuantArgs, QuantState, dequantize_4bit

OP = "lora_linear"  # forward: y = x Wᵀ + b + s·u Bᵀ
OP_DX = "lora_linear_dx"  # backward input gradient: dx = g W (+ v A)


def _dense_weight(weight: torch.Tensor, state: QuantState | None, dtype: torch.dtype) -> torch.Tensor:
    """The reference path's W: the weight itself, or the 4-bit weight dequantised. On a CPU the
    dequantiser is the native one when built (bit-identical to the PyTorch one, ~15x faster); on a
    GPU this path stays pure PyTorch (it is the reference the Triton kernels are tested against)."""
    if state is None:
        return weight
    return dequantize_4bit(weight, state, dtype, backend=None if weight.device.type == "cpu" else "torch")


# -- the dispatch tables: forward (x, weight, state, bias, u, lora_b, scale) -> y ------------------


def _decode_only(facts) -> str | None:
    if not facts["quantized"]:
        return "the native GEMV takes a 4-bit weight"
    if facts["m"] > native.MAX_DECODE_M:
        return f"the native GEMV takes at most {native.MAX_DECODE_M} rows, got {facts['m']}"
    return None


@dispatch.register(OP, "native", devices=("cpu", "cuda"), default_on=("cpu",), when=_decode_only,
                   available=native.unavailable_reason)  # fmt: skip
def _fwd_native(x, weight, state, bias, u, lora_b, scale):
    """Decode: W read once, dequantised in registers, s·u Bᵀ added in the epilogue (u carries the dropout)."""
    with_lora = lora_b.shape[1] > 0  # r = 0: the base alone (a disabled or merged adapter)
    return native.gemv_4bit(x, weight, state, bias, lora_b=lora_b if with_lora else None,
                            lora_u=u if with_lora else None, scale=scale)  # fmt: skip


@dispatch.register(OP, "triton", devices=("cuda",), default_on=("cuda",))
def _fwd_triton(x, weight, state, bias, u, lora_b, scale):
    """One GEMM over ``[x | s·u]·[Wᵀ ; Bᵀ]``, a 4-bit W dequantised tile by tile, s on the fp32 sum u Bᵀ."""
    return lora_kernels.lora_fwd_triton(x, weight, state, bias, u, lora_b, scale)


@dispatch.register(OP, "torch")
def _fwd_torch(x, weight, state, bias, u, lora_b, scale):
    y = torch.nn.functional.linear(x, _dense_weight(weight, state, x.dtype), bias)
    return torch.addmm(y, u, lora_b.T, alpha=scale)  # y + s·(u Bᵀ), s on the fp32 accumulator: one rounding


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · a @ b`` with the scale applied to the fp32 accumulator (addmm's alpha on CPU and cuBLAS),
    so an fp16/bf16 result overflows only where the exact one does. a: (M, K), b: (K, N)."""
    return torch.addmm(a.new_zeros(()).expand(a.shape[0], b.shape[1]), a, b, beta=0, alpha=scale)


# backward input gradient (grad, weight, state, v, lora_a) -> g W + v A (v A skipped when v is None)


@dispatch.register(OP_DX, "triton", devices=("cuda",), default_on=("cuda",))
def _dx_triton(grad, weight, state, v, lora_a):
    """One GEMM over ``[g | v]·[W ; A]``."""
    return lora_kernels.lora_bwd_dx_triton(grad, weight, state, v, lora_a)


@dispatch.register(OP_DX, "torch")
def _dx_torch(grad, weight, state, v, lora_a):
    grad_x = grad @ _dense_weight(weight, state, grad.dtype)
    return grad_x if v is None else grad_x + v @ lora_a


# -- the custom ops -----------------------------------------------------------------------------


@torch.library.custom_op("fastlora::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    quant_type: str,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    nested_offset: float,
    scale: float,
    dropout_p: float,
    seed: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    state = QuantState.from_op_args(absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
                                    nested_offset)  # fmt: skip
    u = apply_dropout(x, dropout_p, seed) @ lora_a.T
    choice = dispatch.choose(OP, x.device, backend or None, m=x.shape[0], quantized=state is not None)
    return choice.fn(x, weight, state, bias, u, lora_b, scale), u


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
      nested_offset, scale, dropout_p, seed, backend):  # fmt: skip
    return x.new_empty((x.shape[0], shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("fastlora::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    u: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    quant_type: str,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    nested_offset: float,
    scale: float,
    dropout_p: float,
    seed: int,
    backend: str,
    needs_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    state = QuantState.from_op_args(absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
                                    nested_offset)  # fmt: skip
    v = _scaled_mm(grad, lora_b, scale)  # s·g B
    grad_b = _scaled_mm(grad.T, u, scale)  # s·gᵀ u
    grad_a = v.T @ apply_dropout(x, dropout_p, seed)
    if not needs_dx:
        return x.new_empty((0,)), grad_a, grad_b
    fused = dropout_p == 0.0  # with dropout, v A needs the mask applied before it is added
    choice = dispatch.choose(OP_DX, grad.device, backend or None, m=grad.shape[0], quantized=state is not None)
    grad_x = choice.fn(grad, weight, state, v if fused else None, lora_a if fused else None)
    if not fused:
        grad_x = grad_x + apply_dropout(v @ lora_a, dropout_p, seed)
    return grad_x, grad_a, grad_b


@_lora_linear_backward_op.register_fake
def _(grad, x, weight, lora_a, lora_b, u, absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
      nested_offset, scale, dropout_p, seed, backend, needs_dx):  # fmt: skip
    grad_x = torch.empty_like(x) if needs_dx else x.new_empty((0,))
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, absmax, nested_absmax, nested_code, *rest = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], absmax, nested_absmax, nested_code)
    ctx.args = rest  # quant_type, blocksize, shape, dtype, nested_offset, scale, dropout_p, seed, backend
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward(ctx, grad_y, grad_u):
    saved = ctx.saved_tensors
    grad_y = grad_y.contiguous() if grad_y.stride(-1) != 1 else grad_y
    grad_x, grad_a, grad_b = torch.ops.fastlora.lora_linear_backward(grad_y, *saved, *ctx.args,
                                                                     ctx.needs_input_grad[0])  # fmt: skip
    grad_bias = grad_y.sum(0) if ctx.bias_grad else None
    grad_x = grad_x if ctx.needs_input_grad[0] else None
    # no gradient for weight, the three statistics tensors and the non-tensor arguments
    return grad_x, None, grad_bias, grad_a, grad_b, *[None] * (3 + len(ctx.args))


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    quant_state: QuantState | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + scale · d(x) Aᵀ Bᵀ`` with W frozen (dense, or 4-bit with ``quant_state``).

    Args:
        x: (..., K) fp32/fp16/bf16; any leading shape and strides.
        weight: (N, K) dense in x's dtype, or packed 4-bit data described by ``quant_state``.
        bias: (N,) in x's dtype, or None.
        lora_a: (r, K) and lora_b: (N, r), in x's dtype.
        scale: the LoRA scaling (alpha / r, or alpha / sqrt(r) with rsLoRA).
        quant_state: the :class:`QuantState` of a 4-bit (N, K) weight.
        dropout_p: LoRA dropout probability in [0, 1); the mask is a function of ``seed``.
        backend: "torch", "triton" or "native" for every pass of this call; default
            ``FASTLORA_BACKEND``, else by device and size (see :mod:`fastlora.dispatch`).

    Returns:
        (..., N) in x's dtype. Differentiable in x, bias, lora_a and lora_b.
    """
    if not math.isfinite(scale):
        raise ValueError(f"fastlora lora_linear: scale must be finite, got {scale!r}")
    if quant_state is not None:
        _check_code_table(quant_state)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    quant = QuantArgs.dense(weight) if quant_state is None else quant_state.op_args()
    dispatch.requested_backend(backend, op=OP)  # an unknown name fails here, not inside the op
    y, _ = torch.ops.fastlora.lora_linear(x2, weight, bias, lora_a, lora_b, *quant, float(scale), float(dropout_p),
                                          int(seed), backend or "")  # fmt: skip
    return y.view(*lead, y.shape[-1])


_STANDARD_TABLE: weakref.WeakSet[QuantState] = weakref.WeakSet()  # states whose quant_map was checked


def _check_code_table(state: QuantState) -> None:
    """The op carries no quant_map (every path uses the standard NF4/FP4 table): refuse a state with another
    one. Checked once per state object (a device sync on CUDA), never while torch.compile traces."""
    if torch.compiler.is_compiling() or state.code.device.type == "meta" or state in _STANDARD_TABLE:
        return
    state.check_code_table(where="fastlora lora_linear")
    _STANDARD_TABLE.add(state)
