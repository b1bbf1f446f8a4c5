"""Plain-PyTorch reference of the grouped LoRA linear (:mod:`fastlora.ops.lora_group`): the spec, float64-capable.

    y_i = x·W_iᵀ + b_i + s_i·d_i(x)·A_iᵀ·B_iᵀ        (member i; no adapter: x·W_iᵀ + b_i)
    act None: (y_1, ..., y_n);  act: h = act(y_gate)·y_up

Everything in the dtype of x (pass float64 tensors for the reference of the tests); a 4-bit W_i is
dequantised to fp32 by the PyTorch reference (exact: one fp32 product a weight), then cast. Differentiable
by torch's autograd in x, the biases and the LoRA factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastlora.functional import apply_activation, apply_dropout
from fastlora.ops.lora_group_paths import GroupMember
from fastlora.quant import dequantize_4bit


def lora_group_ref(
    x: torch.Tensor, members: Sequence[GroupMember], act: str | None = None
) -> tuple[torch.Tensor, ...] | torch.Tensor:
    """The members' outputs over x (..., K): one (..., N_i) tensor each, or with ``act`` act(gate)·up (..., I)."""
    ys = []
    for m in members:
        w = m.weight
        if m.quant_state is not None:
            w = dequantize_4bit(m.weight, m.quant_state, torch.float32, backend="torch")
        y = torch.nn.functional.linear(x, w.to(x.dtype), None if m.bias is None else m.bias.to(x.dtype))
        if m.lora_a is not None and m.lora_a.shape[0] > 0:
            xd = apply_dropout(x.reshape(-1, x.shape[-1]), m.dropout_p, m.seed).view(x.shape)
            y = y + m.scale * ((xd @ m.lora_a.to(x.dtype).T) @ m.lora_b.to(x.dtype).T)
        ys.append(y)
    if act:
        return apply_activation(ys[0], act) * ys[1]
    return tuple(ys)
