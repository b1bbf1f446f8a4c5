"""The bottleneck-adapter op: ``torch.library`` custom ops (opaque to torch.compile, with fake
shapes), their autograd, and the functional entry point :func:`adapter_forward`.

Forward (res = x for the serial adapter, a separate tensor for the parallel one):

    z = x W_downᵀ + b_down      h = d(act(z))      y = res + h W_upᵀ + b_up

Chain rule (g = dL/dy; d = inverted dropout on the bottleneck, its mask a function of ``seed``):

    dz = d'(g W_up) ⊙ act'(z)       dx = [g] + dz W_down       d res = g (parallel form)
    dW_up = gᵀ d(act(z))            db_up = Σ_M g
    dW_down = dzᵀ x                 db_down = Σ_M dz

On the Triton backend the two M×d-sized products run as fused kernels (bias and activation, or
residual, in their epilogues; :mod:`fastlora.kernels.adapter`), as do the two M×r-sized ones. The
dropout mask multiplies M×r tensors only, outside the kernels (it commutes with the epilogue's
``⊙ act'(z)``). The weight-gradient reductions over M go through torch/cuBLAS.

Saved for backward: x, z (M×r, the input's dtype) and the weights; h is recomputed from z.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlora import dispatch
from fastlora.functional import ACTIVATIONS, activation_grad, apply_activation, apply_dropout, check_activation
from fastlora.kernels import adapter as adapter_kernels

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OP = "adapter"  # forward: (x, w_down, b_down, w_up, b_up, res, activation, dropout_p, seed, save_z) -> (y, z)
OP_BWD = "adapter_backward"  # (grad, w_down, w_up, z, activation, dropout_p, seed, serial, need_dx) -> (dz, h, dx)


def _act_grad_mul(dh: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    """``dh ⊙ act'(z)`` evaluated in fp32 (at least), in dh's dtype."""
    compute = torch.promote_types(z.dtype, torch.float32)
    return (dh.to(compute) * activation_grad(z.to(compute), activation)).to(dh.dtype)


# -- the dispatch tables --------------------------------------------------------------------------


@dispatch.register(OP, "triton", devices=("cuda",), default_on=("cuda",))
def _fwd_triton(x, w_down, b_down, w_up, b_up, res, activation, dropout_p, seed, save_z):
    """Down GEMM with bias and activation in its epilogue; up GEMM with bias and residual in its epilogue."""
    h, z = adapter_kernels.adapter_down_triton(x, w_down, b_down, activation, save_z)
    return adapter_kernels.adapter_up_triton(apply_dropout(h, dropout_p, seed), w_up, b_up, res), z


@dispatch.register(OP, "torch")
def _fwd_torch(x, w_down, b_down, w_up, b_up, res, activation, dropout_p, seed, save_z):
    z = F.linear(x, w_down, b_down)
    return res + F.linear(apply_dropout(apply_activation(z, activation), dropout_p, seed), w_up, b_up), z


@dispatch.register(OP_BWD, "triton", devices=("cuda",), default_on=("cuda",))
def _bwd_triton(grad, w_down, w_up, z, activation, dropout_p, seed, serial, need_dx):
    """dz = (g W_up) ⊙ act'(z) with h recomputed, in one kernel; dx = dz W_down (+ g) in another."""
    dz, h = adapter_kernels.adapter_dz_triton(grad, w_up, z, activation)
    dz = apply_dropout(dz, dropout_p, seed)  # the mask commutes with ⊙ act'(z)
    dx = adapter_kernels.adapter_dx_triton(dz, w_down, grad if serial else None) if need_dx else None
    return dz, h, dx


@dispatch.register(OP_BWD, "torch")
def _bwd_torch(grad, w_down, w_up, z, activation, dropout_p, seed, serial, need_dx):
    h = apply_activation(z, activation)
    dz = apply_dropout(_act_grad_mul(grad @ w_up, z, activation), dropout_p, seed)
    dx = ((grad + dz @ w_down) if serial else dz @ w_down) if need_dx else None
    return dz, h, dx


@torch.library.custom_op("fastlora::adapter", mutates_args=())
def _adapter_op(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    dropout_p: float,
    seed: int,
    save_z: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    res = x if residual is None else residual
    y, z = dispatch.choose(OP, x.device, backend).fn(x, w_down, b_down, w_up, b_up, res, activation, dropout_p, seed,
                                                      save_z)  # fmt: skip
    return y, (z if save_z else x.new_empty((0,)))


@_adapter_op.register_fake
def _(x, w_down, b_down, w_up, b_up, residual, activation, dropout_p, seed, save_z, backend):
    z = x.new_empty((x.shape[0], w_down.shape[0])) if save_z else x.new_empty((0,))
    return x.new_empty(x.shape), z


@torch.library.custom_op("fastlora::adapter_backward", mutates_args=())
def _adapter_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    z: torch.Tensor,
    activation: str,
    dropout_p: float,
    seed: int,
    serial: bool,
    needs: list[bool],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW_down, db_down, dW_up, db_up); ``needs`` says which of the five to compute (the rest are empty)."""
    need_dx, need_wd, need_bd, need_wu, need_bu = needs

    def none():  # a fresh placeholder per output: custom-op outputs may not alias each other
        return x.new_empty((0,))

    dz, h, dx = dispatch.choose(OP_BWD, grad.device, backend).fn(grad, w_down, w_up, z, activation, dropout_p, seed,
                                                                  serial, need_dx)  # fmt: skip
    dx = dx if need_dx else none()
    h = apply_dropout(h, dropout_p, seed)
    return (
        dx,
        dz.T @ x if need_wd else none(),
        dz.sum(0) if need_bd else none(),
        grad.T @ h if need_wu else none(),
        grad.sum(0) if need_bu else none(),
    )


@_adapter_backward_op.register_fake
def _(grad, x, w_down, w_up, z, activation, dropout_p, seed, serial, needs, backend):
    shapes = (x.shape, w_down.shape, w_down.shape[:1], w_up.shape, w_up.shape[:1])
    return tuple(x.new_empty(s if need else (0,)) for s, need in zip(shapes, needs, strict=True))


def _setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, residual, activation, p, seed, _save_z, backend = inputs
    ctx.save_for_backward(x, w_down, w_up, output[1])
    ctx.args = (activation, p, seed, residual is None, backend)
    ctx.has_bias = (b_down is not None, b_up is not None)


def _backward(ctx, grad_y, grad_z):
    x, w_down, w_up, z = ctx.saved_tensors
    activation, p, seed, serial, backend = ctx.args
    ni = ctx.needs_input_grad
    if z.numel() == 0 and x.shape[0] * w_down.shape[0] != 0:
        raise RuntimeError("fastlora adapter: backward without a saved pre-activation (forward ran with save_z=False)")
    grad_y = grad_y.contiguous() if grad_y.stride(-1) != 1 else grad_y
    needs = [ni[0], ni[1], ctx.has_bias[0] and ni[2], ni[3], ctx.has_bias[1] and ni[4]]
    grads = torch.ops.fastlora.adapter_backward(grad_y, x, w_down, w_up, z, activation, p, seed, serial, needs,
                                                backend)  # fmt: skip
    dx, dwd, dbd, dwu, dbu = (g if need else None for g, need in zip(grads, needs, strict=True))
    grad_res = grad_y if not serial and ni[5] else None
    return dx, dwd, dbd, dwu, dbu, grad_res, None, None, None, None, None


_adapter_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, w_down, b_down, w_up, b_up, residual, activation, dropout_p) -> None:
    tensors = {"x": x, "w_down": w_down, "w_up": w_up}
    for name, t in (("b_down", b_down), ("b_up", b_up), ("residual", residual)):
        if t is not None:
            tensors[name] = t
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastlora adapter: {name} must be a tensor, got {type(t).__name__}")
    check_activation(activation, where="fastlora adapter")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastlora adapter: dropout_p must be in [0, 1), got {dropout_p!r}")
    if x.dim() == 0:
        raise ValueError("fastlora adapter: x must have shape (..., d), got a 0-d tensor")
    d = x.shape[-1]
    if w_down.dim() != 2 or w_down.shape[1] != d or w_down.shape[0] < 1:
        raise ValueError(f"fastlora adapter: w_down must have shape (r, d) = (r, {d}) with r >= 1, got "
                         f"{tuple(w_down.shape)}")  # fmt: skip
    r = w_down.shape[0]
    expected = {"w_up": (d, r), "b_down": (r,), "b_up": (d,), "residual": tuple(x.shape)}
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"fastlora adapter: {name} must have shape {shape} (x is {tuple(x.shape)}, w_down "
                f"{tuple(w_down.shape)}), got {tuple(tensors[name].shape)}"
            )
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"fastlora adapter: {name} is {t.dtype} but x is {x.dtype}; all tensors must share a dtype")
        if t.device != x.device:
            raise ValueError(f"fastlora adapter: {name} is on {t.device} but x on {x.device}")


def adapter_forward(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str = "gelu",
    residual: torch.Tensor | None = None,
    backend: str | None = None,
    *,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Bottleneck adapter ``y = res + d(act(x W_downᵀ + b_down)) W_upᵀ + b_up``, fused kernels.

    Args:
        x: (..., d) fp32/fp16/bf16 (float64 too on the torch backend); any leading shape and strides.
        w_down: (r, d).  b_down: (r,) or None.  w_up: (d, r).  b_up: (d,) or None.  All in x's dtype
            and on x's device.
        activation: one of ``"relu"``, ``"gelu"`` (exact erf, as ``nn.GELU()``), ``"gelu_tanh"``, ``"silu"``.
        residual: None for the serial adapter (res = x, Houlsby/Pfeiffer), or (..., d) like x for
            the parallel adapter (res = e.g. the output of the module the adapter runs beside).
        backend: "torch" or "triton" ("native" falls back: no native adapter kernel); default
            ``FASTLORA_BACKEND``, else by device (see :mod:`fastlora.dispatch`).
        dropout_p: inverted dropout on the bottleneck activation, in [0, 1); the mask is a function of ``seed``.

    Returns:
        (..., d) in x's dtype. Differentiable in x, all four weights and residual.
    """
    _check(x, w_down, b_down, w_up, b_up, residual, activation, dropout_p)
    chosen = dispatch.choose(OP, x.device, backend).backend
    if x.dtype not in _DTYPES and not (chosen == "torch" and x.dtype == torch.float64):
        raise TypeError(
            f"fastlora adapter: x must be float32/float16/bfloat16 (float64 on the torch backend), got {x.dtype} "
            f"on the {chosen} backend"
        )
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    res2 = None
    if residual is not None:
        res2 = residual.reshape(-1, d)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
    inputs = (x, w_down, b_down, w_up, b_up, residual)
    save_z = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, _ = torch.ops.fastlora.adapter(x2, w_down, b_down, w_up, b_up, res2, activation, float(dropout_p), int(seed),
                                      save_z, chosen)  # fmt: skip
    return y.reshape(*lead, d)


__all__ = ["ACTIVATIONS", "adapter_forward"]
