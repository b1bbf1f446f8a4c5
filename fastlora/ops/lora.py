"""The LoRA linear op: ``torch.library`` custom ops (opaque to torch.compile, with fake shapes),
their autograd, and the functional entry point :func:`lora_linear`.

Chain rule (g = dL/dy, s = scale, d = LoRA dropout, u = d(x) Aᵀ saved from the forward):

    v  = s · g B          dB = s · gᵀ u         dA = vᵀ d(x)
    dx = g W + d'(v A)    (one fused GEMM ``[g | v]·[W ; A]`` when there is no dropout)

Saved for backward: x, u, the frozen weight (packed when 4-bit) and the dropout seed; never a
dequantised W nor an M×N tensor. Each pass runs on the path :mod:`fastlora.ops.planner` picks by size:
``fused`` (one kernel, W dequantised in registers) or ``dequant_gemm`` (W dequantised into a shared
scratch, then one GEMM carrying the low-rank term: :mod:`fastlora.ops.lora_paths`). The low-rank
products (u, v, dA, dB) have their own tables there: on the GPU, v and dB in one pass over g, and the
dropout mask regenerated in-kernel wherever it applies (u, dA, and dx's d'(v A)), never stored.

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
from fastlora.ops import lora_paths
from fastlora.ops.planner import OP, OP_DX, decide_path, requested_path
from fastlora.quant import QuantArgs, QuantState, dequantize_4bit

# OP, forward: y = x Wᵀ + b + s·u Bᵀ;  OP_DX, backward input gradient: dx = g W (+ d'(v A))


def _dense_weight(weight: torch.Tensor, state: QuantState | None, dtype: torch.dtype) -> torch.Tensor:
    """The reference path's W: the weight itself, or the 4-bit weight dequantised. On a CPU the
    dequantiser is the native one when built (bit-identical to the PyTorch one, ~15x faster); on a
    GPU this path stays pure PyTorch (it is the reference the Triton kernels are tested against)."""
    if state is None:
        return weight
    return dequantize_4bit(weight, state, dtype, backend=None if weight.device.type == "cpu" else "torch")


# -- the dispatch tables: forward (x, weight, state, bias, u, lora_b, scale, path) -> y ------------


def _decode_only(facts) -> str | None:
    if not facts["quantized"]:
        return "the native GEMV takes a 4-bit weight"
    if facts["m"] > native.MAX_DECODE_M:
        return f"the native GEMV takes at most {native.MAX_DECODE_M} rows, got {facts['m']}"
    return None


# The default for decode on CUDA too: the static sm_90 model puts the CUDA GEMV (a ring of three 16-byte W loads
# in flight) at 74-86 % of HBM for fp16/bf16 at M <= 16 (benchmarks/results/static-sm90-2026-11-25), the fused
# Triton kernel at 28 % (static-sm90-2026-12-02). Where the extension has no CUDA kernels, Triton runs.
@dispatch.register(OP, "native", devices=("cpu", "cuda"), default_on=("cpu", "cuda"), when=_decode_only,
                   available=native.unavailable_reason)  # fmt: skip
def _fwd_native(x, weight, state, bias, u, lora_b, scale, path=None):
    """Decode: W read once, dequantised in registers, s·u Bᵀ added in the epilogue (u carries the dropout)."""
    with_lora = lora_b.shape[1] > 0  # r = 0: the base alone (a disabled or merged adapter)
    return native.gemv_4bit(x, weight, state, bias, lora_b=lora_b if with_lora else None,
                            lora_u=u if with_lora else None, scale=scale)  # fmt: skip


@dispatch.register(OP, "triton", devices=("cuda",), default_on=("cuda",))
def _fwd_triton(x, weight, state, bias, u, lora_b, scale, path="fused"):
    """fused: one GEMM over ``[x | u]·[Wᵀ ; Bᵀ]``, a 4-bit W dequantised tile by tile, s on the fp32 sum u Bᵀ;
    dequant_gemm: W dequantised into the scratch, then one GEMM with C = s·u Bᵀ + b."""
    if path == "dequant_gemm":
        return lora_paths.forward(x, weight, state, bias, u, lora_b, scale, backend="triton")
    return lora_kernels.lora_fwd_triton(x, weight, state, bias, u, lora_b, scale)


@dispatch.register(OP, "torch")
def _fwd_torch(x, weight, state, bias, u, lora_b, scale, path=None):
    y = torch.nn.functional.linear(x, _dense_weight(weight, state, x.dtype), bias)
    return torch.addmm(y, u, lora_b.T, alpha=scale)  # y + s·(u Bᵀ), s on the fp32 accumulator: one rounding


# backward input gradient (grad, weight, state, v, lora_a, dropout_p, seed, path) -> g W + d'(v A)
# (v A skipped when v is None; d' the dropout mask of x's positions, scaled by 1 / (1 - p))


@dispatch.register(OP_DX, "triton", devices=("cuda",), default_on=("cuda",))
def _dx_triton(grad, weight, state, v, lora_a, dropout_p, seed, path="fused"):
    """fused: one GEMM over ``[g | v]·[W ; A]``, the mask applied to the fp32 low-rank sum in-kernel;
    dequant_gemm: W dequantised into the scratch, then one GEMM with C = d'(v A)."""
    if path == "dequant_gemm":
        return lora_paths.input_grad(grad, weight, state, v, lora_a, dropout_p, seed, backend="triton")
    return lora_kernels.lora_bwd_dx_triton(grad, weight, state, v, lora_a, dropout_p=dropout_p, seed=seed)


@dispatch.register(OP_DX, "torch")
def _dx_torch(grad, weight, state, v, lora_a, dropout_p, seed, path=None):
    grad_x = grad @ _dense_weight(weight, state, grad.dtype)
    return grad_x if v is None else grad_x + apply_dropout(v @ lora_a, dropout_p, seed)


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
    path: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    state = QuantState.from_op_args(absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
                                    nested_offset)  # fmt: skip
    choice = dispatch.choose(OP, x.device, backend or None, m=x.shape[0], quantized=state is not None)
    u = lora_paths.lora_down(x, lora_a, dropout_p, seed, choice.backend)
    chosen = _path(OP, choice.backend, path, x.shape[0], x.shape[1], shape[0], state, x.dtype)
    return choice.fn(x, weight, state, bias, u, lora_b, scale, chosen), u


def _path(op, backend, path, m, k, n, state, dtype) -> str:
    quant = None if state is None else state.quant_type
    return decide_path(op, backend, path or None, m, k, n, quant, dtype)[0]


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
      nested_offset, scale, dropout_p, seed, backend, path):  # fmt: skip
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
    path: str,
    needs_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    state = QuantState.from_op_args(absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
                                    nested_offset)  # fmt: skip
    # v = s·g B and dB = s·gᵀ u (one pass over g on the GPU), dA = vᵀ d(x) (the mask regenerated)
    v, grad_a, grad_b = lora_paths.lora_grads(grad, x, lora_a, lora_b, u, scale, dropout_p, seed, backend or None)
    if not needs_dx:
        return x.new_empty((0,)), grad_a, grad_b
    choice = dispatch.choose(OP_DX, grad.device, backend or None, m=grad.shape[0], quantized=state is not None)
    chosen = _path(OP_DX, choice.backend, path, grad.shape[0], x.shape[1], shape[0], state, grad.dtype)
    grad_x = choice.fn(grad, weight, state, v, lora_a, dropout_p, seed, chosen)
    return grad_x, grad_a, grad_b


@_lora_linear_backward_op.register_fake
def _(grad, x, weight, lora_a, lora_b, u, absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
      nested_offset, scale, dropout_p, seed, backend, path, needs_dx):  # fmt: skip
    grad_x = torch.empty_like(x) if needs_dx else x.new_empty((0,))
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, absmax, nested_absmax, nested_code, *rest = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], absmax, nested_absmax, nested_code)
    ctx.args = rest  # quant_type, blocksize, shape, dtype, nested_offset, scale, dropout_p, seed, backend, path
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
    path: str | None = None,
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
        path: "fused" or "dequant_gemm" for every pass that runs on Triton; default ``FASTLORA_PATH``, else
            by size (:func:`fastlora.plan` says which and why).

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
    requested_path(path)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastlora lora_linear: dropout_p must be in [0, 1), got {dropout_p!r}")
    y, _ = torch.ops.fastlora.lora_linear(x2, weight, bias, lora_a, lora_b, *quant, float(scale), float(dropout_p),
                                          int(seed), backend or "", path or "")  # fmt: skip
    return y.view(*lead, y.shape[-1])


_STANDARD_TABLE: weakref.WeakSet[QuantState] = weakref.WeakSet()  # states whose quant_map was checked


def _check_code_table(state: QuantState) -> None:
    """The op carries no quant_map (every path uses the standard NF4/FP4 table): refuse a state with another
    one. Checked once per state object (a device sync on CUDA), never while torch.compile traces."""
    if torch.compiler.is_compiling() or state.code.device.type == "meta" or state in _STANDARD_TABLE:
        return
    state.check_code_table(where="fastlora lora_linear")
    _STANDARD_TABLE.add(state)
