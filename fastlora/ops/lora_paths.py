"""The training-size path of the LoRA linear (``dequant_gemm``) and the low-rank products' tables.

At training sizes a 4-bit W is dequantised once per use into a scratch buffer that every layer
shares (:mod:`fastlora.ops.scratch`; never saved for backward, never a parameter), at memory speed,
and one GEMM on dense operands carries the low-rank term as its C operand:

    forward   C = s·u·Bᵀ + b        (skinny GEMM, K = r)      y  = C + x·W_dqᵀ   (cuBLAS, C read in the epilogue)
    input     C = d'(v·A)           (skinny GEMM, mask in-kernel) dx = C + g·W_dq

or, where the crossover table's model finds it faster at training M ("kext"), the K-extended Triton
kernel of the fused path run over the dense scratch, ``[x | u]·[W_dqᵀ ; Bᵀ]``: no [M, N] pass outside
the GEMM at all, at the Triton GEMM's efficiency instead of cuBLAS's.

Bytes moved per forward, e = bytes per element (2 for bf16), W 4-bit = N·K/2 bytes + absmax:

    fastlora dequant_gemm  dequant: read N·K/2, write N·K·e (the scratch, in L2 for the GEMM that follows at
                           training M); C: read M·r·e, write M·N·e; GEMM: read M·K·e + N·K·e, read C in its
                           epilogue (M·N·e), write y (M·N·e). Outside the GEMMs: the one [M, N] write of C.
    unsloth-style          the same dequant; GEMM writes y (M·N·e); ``y.addmm_(x·A ᵀ, Bᵀ)`` reads and writes
                           y again: an extra read AND write of [M, N] outside the big GEMM, plus x·Aᵀ.
    peft + bitsandbytes    dequant (bnb) and GEMM as above; then ``result.clone()`` (read + write [M, N]),
                           dropout(x) (read + write [M, K] when p > 0), x·Aᵀ, ·Bᵀ (write [M, N]), ``* scale``
                           (read + write [M, N]), ``result + ...`` (two reads, one write of [M, N]).

The LoRA gradients read g (the largest tensor of the backward) once for v = s·g·B and dB = s·gᵀ·u
together (:func:`fastlora.kernels.lowrank.lora_grads`); dA = vᵀ·d(x) regenerates the dropout mask
in-kernel, as do u = d(x)·Aᵀ and C = d'(v·A): no M×K mask tensor is ever stored on the GPU.
"""

from __future__ import annotations

import torch

from fastlora import dispatch
from fastlora.functional import apply_dropout
from fastlora.kernels import lora as lora_kernels
from fastlora.kernels import lowrank, lowrank_ref
from fastlora.ops import scratch
from fastlora.ops.planner import crossover

OP_DOWN = "lora_down"  # u = d(x)·Aᵀ
OP_UP = "lora_up"  # C = d'(s·(u·L)) + bias
OP_GRADS = "lora_grads"  # (v, dA, dB) from (g, x, A, B, u)

_triton = {"devices": ("cuda",), "default_on": ("cuda",)}
dispatch.register(OP_DOWN, "triton", **_triton)(lowrank.lora_down)
dispatch.register(OP_DOWN, "torch")(lowrank_ref.lora_down)
dispatch.register(OP_UP, "triton", **_triton)(lowrank.lora_up)
dispatch.register(OP_UP, "torch")(lowrank_ref.lora_up)


@dispatch.register(OP_GRADS, "triton", **_triton)
def _grads_triton(grad, x, lora_a, lora_b, u, scale, dropout_p, seed):
    """v and dB in one pass over g; dA with the dropout mask regenerated in-kernel."""
    v, grad_b = lowrank.lora_grads(grad, lora_b, u, scale)
    return v, lowrank.lora_grad_a(v, x, dropout_p, seed), grad_b


@dispatch.register(OP_GRADS, "torch")
def _grads_torch(grad, x, lora_a, lora_b, u, scale, dropout_p, seed):
    v, grad_b = lowrank_ref.lora_grads(grad, lora_b, u, scale)
    return v, v.T @ apply_dropout(x, dropout_p, seed), grad_b


def lora_down(x: torch.Tensor, lora_a: torch.Tensor, dropout_p: float, seed: int, backend: str | None) -> torch.Tensor:
    """u = d(x)·Aᵀ, (M, r) in x's dtype: a plain matmul without dropout, else the dispatched kernel."""
    if dropout_p == 0.0:
        return x @ lora_a.T
    return dispatch.choose(OP_DOWN, x.device, backend).fn(x, lora_a, dropout_p, seed)


def lora_grads(grad, x, lora_a, lora_b, u, scale, dropout_p, seed, backend):
    """(v, grad_a, grad_b) = (s·g·B, vᵀ·d(x), s·gᵀ·u) by the dispatched implementation."""
    choice = dispatch.choose(OP_GRADS, grad.device, backend, m=grad.shape[0])
    return choice.fn(grad, x, lora_a, lora_b, u, scale, dropout_p, seed)


def _gemm(fwd: bool, w_rows: int, w_cols: int, state, dtype: torch.dtype, backend: str) -> str:
    """The GEMM of this pass: "kext" (the K-extended Triton kernel over the dense scratch) where the crossover
    table says it beats cuBLAS with C at training sizes and Triton runs; else "cublas_c"."""
    if backend != "triton":
        return "cublas_c"
    cross = crossover(w_cols, w_rows, None if state is None else state.quant_type, dtype)
    return cross.fwd_gemm if fwd else cross.dx_gemm


def forward(x, weight, state, bias, u, lora_b, scale, backend: str) -> torch.Tensor:
    """y = x·W_dqᵀ + (s·u·Bᵀ + b): the low-rank term and bias as the GEMM's C operand (or K-extended steps).

    x (M, K); weight (N, K) dense or 4-bit with ``state``; u (M, r) = d(x)·Aᵀ; lora_b (N, r). Returns (M, N).
    """
    w = scratch.dequantized_weight(weight, state, x.dtype, backend=backend)
    if _gemm(True, w.shape[0], w.shape[1], state, x.dtype, backend) == "kext":
        return lora_kernels.lora_fwd_triton(x, w, None, bias, u, lora_b, scale)
    up = dispatch.choose(OP_UP, x.device, backend).fn
    c = up(u, lora_b.T, scale, bias, 0.0, 0)  # [M, N]: the one write outside the GEMM
    return c.addmm_(x, w.T)


def input_grad(grad, weight, state, v, lora_a, dropout_p: float, seed: int, backend: str) -> torch.Tensor:
    """dx = g·W_dq + d'(v·A) (v None: g·W_dq alone). grad (M, N); v (M, r); lora_a (r, K). Returns (M, K)."""
    w = scratch.dequantized_weight(weight, state, grad.dtype, backend=backend)
    if _gemm(False, w.shape[0], w.shape[1], state, grad.dtype, backend) == "kext":
        return lora_kernels.lora_bwd_dx_triton(grad, w, None, v, lora_a, dropout_p=dropout_p, seed=seed)
    if v is None:
        return grad @ w
    up = dispatch.choose(OP_UP, grad.device, backend).fn
    c = up(v, lora_a, 1.0, None, dropout_p, seed)  # [M, K], the mask of the output positions applied in-kernel
    return c.addmm_(grad, w)
