"""Plain-PyTorch reference of the gated-linear-unit epilogue: the spec :mod:`fastlora.kernels.glu` follows.

The gate/up projections of a Llama-family MLP write one stacked pre-activation ``pre = [gate | up]``
(M, 2I); the epilogue turns it into the MLP's hidden state and its backward back into the stacked
gradient of the GEMM:

    forward:   h = act(gate) · up                                  (M, I)
    backward:  d_gate = dh · up · act'(gate),  d_up = dh · act(gate)  ->  [d_gate | d_up]  (M, 2I)

act is SiLU (SwiGLU), exact GELU or tanh-approximated GELU (GeGLU), named as
:data:`fastlora.functional.ACTIVATIONS`. The backward recomputes act(gate) from the saved ``pre``:
nothing but ``pre`` is kept for it.
"""

from __future__ import annotations

import torch

from fastlora.functional import activation_grad, apply_activation

__all__ = ["glu_backward", "glu_forward"]


def glu_forward(pre: torch.Tensor, act: str) -> torch.Tensor:
    """h = act(gate) · up: pre (M, 2I) = [gate | up] -> (M, I) in pre's dtype (eager HF's two roundings)."""
    gate, up = pre.chunk(2, dim=-1)
    return apply_activation(gate, act) * up


def glu_backward(dh: torch.Tensor, pre: torch.Tensor, act: str) -> torch.Tensor:
    """[dh · up · act'(gate) | dh · act(gate)]: dh (M, I), pre (M, 2I) -> (M, 2I) in dh's dtype."""
    gate, up = pre.chunk(2, dim=-1)
    return torch.cat((dh * up * activation_grad(gate, act), dh * apply_activation(gate, act)), dim=-1)
