"""The LoRA linear op: ``torch.library`` custom ops (opaque to torch.compile, with fake shapes),
their autograd, and the functional entry point :func:`lora_linear`.

Chain rule (g = dL/dy, s = scale, d = LoRA dropout, u = d(x) Aᵀ saved from the forward):

    v  = s · g B          dB = s · gᵀ u         dA = vᵀ d(x)
    dx = g W + d'(v A)    (one fused GEMM ``[g | v]·[W ; A]`` when there is no dropout)

Saved for backward: x, u, the frozen weight (packed when 4-bit) and the dropout seed; never a
dequantised W nor an M×N tensor. The skinny products (u, v, dA, dB) go through torch/cuBLAS.
"""

from __future__ import annotations

import torch

from fastlora import _backend
from fastlora.kernels.lora_ref import apply_dropout
from fastlora.quant import QUANT_TYPES, QuantState, dequantize_4bit, get_code
from fastlora.quant.state import NestedState

# quant = [kind, blocksize, rows, cols]; kind 0 = dense weight, 1 = nf4, 2 = fp4.
_KINDS = ("dense", *QUANT_TYPES)
MAX_DECODE_M = 16  # rows of x up to which a 4-bit forward is a decode GEMV (native backend)


def _state(weight, absmax, nested_absmax, nested_code, quant, nested_offset) -> QuantState | None:
    kind, blocksize, rows, cols = quant
    if kind == 0:
        return None
    qt = _KINDS[kind]
    nested = None
    if nested_absmax is not None:
        nested = NestedState(absmax=nested_absmax, code=nested_code, offset=nested_offset)
    return QuantState(
        absmax=absmax,
        shape=torch.Size((rows, cols)),
        dtype=torch.bfloat16,
        blocksize=blocksize,
        quant_type=qt,
        code=get_code(qt, weight.device),
        nested=nested,
    )


def _dense_weight(weight: torch.Tensor, state: QuantState | None, dtype: torch.dtype) -> torch.Tensor:
    """The reference path's W: the weight itself, or the 4-bit weight dequantised. On a CPU the
    dequantiser is the native one when built (bit-identical to the PyTorch one, ~15x faster); on a
    GPU this path stays pure PyTorch (it is the reference the Triton kernels are tested against)."""
    if state is None:
        return weight
    return dequantize_4bit(weight, state, dtype, backend=None if weight.device.type == "cpu" else "torch")


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
    quant: list[int],
    nested_offset: float,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    state = _state(weight, absmax, nested_absmax, nested_code, quant, nested_offset)
    u = apply_dropout(x, dropout_p, seed) @ lora_a.T
    # Decode (a 4-bit weight, at most MAX_DECODE_M rows): fastlora's native GEMV reads W once and
    # adds s·u Bᵀ in its epilogue (u carries the dropout). Default on CPU; on CUDA when requested.
    native = ("cpu", "cuda") if state is not None and x.shape[0] <= MAX_DECODE_M else ()
    backend = _backend.select(x, op="lora_linear", native=native)
    if backend == "cuda":
        from fastlora import native as native_kernels

        with_lora = lora_b.shape[1] > 0  # r = 0: the base alone (a disabled or merged adapter)
        y = native_kernels.gemv_4bit(
            x, weight, state, bias, lora_b=lora_b if with_lora else None, lora_u=u if with_lora else None, scale=scale
        )
    elif backend == "triton":
        from fastlora.kernels.lora import lora_fwd_triton

        y = lora_fwd_triton(x, weight, state, bias, u * scale, lora_b)
    else:
        y = torch.nn.functional.linear(x, _dense_weight(weight, state, x.dtype), bias)
        y = y + (u * scale) @ lora_b.T
    return y, u


@_lora_linear_op.register_fake
def _(
    x, weight, bias, lora_a, lora_b, absmax, nested_absmax, nested_code, quant, nested_offset, scale, dropout_p, seed
):
    n = quant[2] if quant[0] else weight.shape[0]
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], lora_a.shape[0]))


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
    quant: list[int],
    nested_offset: float,
    scale: float,
    dropout_p: float,
    seed: int,
    needs_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    state = _state(weight, absmax, nested_absmax, nested_code, quant, nested_offset)
    v = (grad @ lora_b) * scale
    grad_b = (grad.T @ u) * scale
    grad_a = v.T @ apply_dropout(x, dropout_p, seed)
    if not needs_dx:
        return x.new_empty((0,)), grad_a, grad_b
    triton_path = _backend.select(grad, op="lora_linear backward") == "triton"
    fused = dropout_p == 0.0  # with dropout, v A needs the mask applied before it is added
    if triton_path:
        from fastlora.kernels.lora import lora_bwd_dx_triton

        grad_x = lora_bwd_dx_triton(grad, weight, state, v if fused else None, lora_a if fused else None)
    else:
        grad_x = grad @ _dense_weight(weight, state, grad.dtype)
        if fused:
            grad_x = grad_x + v @ lora_a
    if not fused:
        grad_x = grad_x + apply_dropout(v @ lora_a, dropout_p, seed)
    return grad_x, grad_a, grad_b


@_lora_linear_backward_op.register_fake
def _(grad, x, weight, lora_a, lora_b, u, absmax, nested_absmax, nested_code, quant, nested_offset, scale, dropout_p,
      seed, needs_dx):  # fmt: skip
    grad_x = torch.empty_like(x) if needs_dx else x.new_empty((0,))
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, absmax, nested_absmax, nested_code, quant, nested_offset, scale, p, seed = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], absmax, nested_absmax, nested_code)
    ctx.args = (quant, nested_offset, scale, p, seed)
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward(ctx, grad_y, grad_u):
    x, weight, lora_a, lora_b, u, absmax, nested_absmax, nested_code = ctx.saved_tensors
    quant, nested_offset, scale, p, seed = ctx.args
    grad_y = grad_y.contiguous() if grad_y.stride(-1) != 1 else grad_y
    grad_x, grad_a, grad_b = torch.ops.fastlora.lora_linear_backward(
        grad_y, x, weight, lora_a, lora_b, u, absmax, nested_absmax, nested_code, quant, nested_offset, scale, p, seed,
        ctx.needs_input_grad[0],
    )  # fmt: skip
    grad_bias = grad_y.sum(0) if ctx.bias_grad else None
    grad_x = grad_x if ctx.needs_input_grad[0] else None
    return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None, None, None, None, None


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

    Returns:
        (..., N) in x's dtype. Differentiable in x, bias, lora_a and lora_b.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if quant_state is None:
        quant, absmax, nested_absmax, nested_code, offset = [0, 0, *weight.shape], None, None, None, 0.0
    else:
        quant = [_KINDS.index(quant_state.quant_type), quant_state.blocksize, *quant_state.shape]
        absmax = quant_state.absmax
        nested = quant_state.nested
        nested_absmax = nested.absmax if nested is not None else None
        nested_code = nested.code if nested is not None else None
        offset = nested.offset if nested is not None else 0.0
    y, _ = torch.ops.fastlora.lora_linear(
        x2, weight, bias, lora_a, lora_b, absmax, nested_absmax, nested_code, quant, offset, float(scale),
        float(dropout_p), int(seed),
    )  # fmt: skip
    return y.view(*lead, y.shape[-1])
