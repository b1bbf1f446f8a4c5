"""Reference implementations the layer suite times fastlora against, written here (no unsloth import).

``unsloth_style_lora``: the unfused QLoRA layer of unsloth's fast path, the baseline issue 20 sets:
dequantise W into a shared bf16/fp16 buffer at memory speed, one cuBLAS GEMM, the low-rank term added in
place. Per pass, beside the GEMMs' own traffic, it moves one extra read and write of the [M, N] output
(``addmm_`` reads y back) and of the [M, K] input gradient. Dropout is unsupported, as in unsloth's fast path.

``path_scope``: runs a callable's forward and backward with ``FASTLORA_PATH`` set, to time one of
fastlora's paths on its own (the bench only sets the variable; :mod:`fastlora.ops.planner` reads it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from fastlora.ops.scratch import dequantized_weight

PATH_ENV = "FASTLORA_PATH"


class UnslothStyleLoRA(torch.autograd.Function):
    """``y = x Wᵀ + s (x Aᵀ) Bᵀ`` for a 4-bit (N, K) W, A (r, K), B (N, r); x (M, K), all in one dtype.

    Forward:  W_dq = dequant(W) into the shared scratch;  y = x @ W_dqᵀ;  u = x @ Aᵀ;  y.addmm_(u, Bᵀ, alpha=s).
    Backward (g = dL/dy, W dequantised again: nothing of W is saved):
        v  = s · g @ B                      (M, r)
        dx = g @ W_dq;  dx.addmm_(v, A)     (M, K)   = g W + s (g B) A
        dA = vᵀ @ x                         (r, K)   = s (g B)ᵀ x
        dB = s · gᵀ @ u                     (N, r)   = s gᵀ (x Aᵀ)
    Saved for backward: x, u (M × r), A, B and the packed W with its state.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, packed, state, scale):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        w = dequantized_weight(packed, state, x.dtype)
        y = torch.matmul(x2, w.t())
        u = torch.matmul(x2, lora_a.t())
        y.addmm_(u, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, u, lora_a, lora_b, packed)
        ctx.state, ctx.scale, ctx.shape = state, scale, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, u, lora_a, lora_b, packed = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        v = torch.matmul(g, lora_b) * ctx.scale
        w = dequantized_weight(packed, ctx.state, x2.dtype)
        dx = torch.matmul(g, w)
        dx.addmm_(v, lora_a)
        grad_a = torch.matmul(v.t(), x2)
        grad_b = torch.matmul(g.t(), u) * ctx.scale
        return dx.view(ctx.shape), grad_a, grad_b, None, None, None


def unsloth_style_lora(x, lora_a, lora_b, packed, state, scale: float) -> torch.Tensor:
    """:class:`UnslothStyleLoRA` applied: x (..., K) -> (..., N)."""
    return UnslothStyleLoRA.apply(x, lora_a, lora_b, packed, state, float(scale))


class _SetEnv(torch.autograd.Function):
    """Identity whose backward sets ``FASTLORA_PATH`` (``value`` a path) or restores it (``value`` None)."""

    @staticmethod
    def forward(ctx, t, value, saved):
        ctx.value, ctx.saved = value, saved
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        if ctx.value is not None:
            ctx.saved[0] = os.environ.get(PATH_ENV)
            os.environ[PATH_ENV] = ctx.value
        elif ctx.saved[0] is None:
            os.environ.pop(PATH_ENV, None)
        else:
            os.environ[PATH_ENV] = ctx.saved[0]
        return grad, None, None


def path_scope(fn: Callable[[torch.Tensor], torch.Tensor], path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` with ``FASTLORA_PATH=path`` around its forward and around its backward (set by the output's
    gradient, restored when the gradient reaches the input), and the previous value everywhere else."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        previous = os.environ.get(PATH_ENV)
        saved: list[str | None] = [None]
        os.environ[PATH_ENV] = path
        try:
            y = fn(_SetEnv.apply(x, None, saved) if x.requires_grad else x)
        finally:
            if previous is None:
                os.environ.pop(PATH_ENV, None)
            else:
                os.environ[PATH_ENV] = previous
        return _SetEnv.apply(y, path, saved) if y.requires_grad else y

    return forward
