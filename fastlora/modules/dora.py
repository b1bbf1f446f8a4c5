"""DoRA slots of a :class:`~fastlora.modules.lora.FastLoRALinear`: :class:`DoraAdapter` (a LoRA slot plus the
trained magnitude ``lora_magnitude_vector`` (N,), peft's name) and the layer-side helpers the module calls."""

from __future__ import annotations

import torch
from torch import nn

from fastlora.modules.lora_adapter import LoraAdapter
from fastlora.ops.dora import dora_linear, dora_weight_norm, weight_row_sqnorm


class DoraAdapter(LoraAdapter):
    """A LoRA slot with DoRA's magnitude ``lora_magnitude_vector`` (out_features,), initialised by the layer to
    ``‖W + s·B A‖`` per output row (:func:`init_magnitude`), so the layer starts as its base when B = 0."""

    def __init__(self, in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, init, dtype, device):
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, init, dtype, device)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device))


def is_dora(adapter: nn.Module | None) -> bool:
    return isinstance(adapter, DoraAdapter)


def w_sqnorm(layer) -> torch.Tensor:
    """(N,) fp32 ``‖W_n‖²`` of the layer's current base, cached on the layer per (weight object, version,
    device): merge, unmerge, loads and dtype casts replace or bump the weight, which refreshes it."""
    weight = layer.weight
    key = (id(weight), weight.data_ptr(), weight._version, weight.device, weight.dtype, id(layer.quant_state))
    cached = getattr(layer, "_dora_wsq", None)
    if torch.compiler.is_compiling():
        if cached is None:
            return weight_row_sqnorm(weight, layer.quant_state)
        return cached[1]
    if cached is None or cached[0] != key:
        cached = (key, weight_row_sqnorm(weight, layer.quant_state))
        layer._dora_wsq = cached
    return cached[1]


@torch.no_grad()
def weight_norm(layer, adapter: LoraAdapter) -> torch.Tensor:
    """(N,) fp32 ``‖W + s·B A‖`` per output row of the layer's base and ``adapter`` (no (N, K) temporary)."""
    return dora_weight_norm(layer.weight, adapter.lora_A, adapter.lora_B, adapter.scaling, w_sqnorm(layer),
                            quant_state=layer.quant_state)  # fmt: skip


@torch.no_grad()
def init_magnitude(layer, adapter: DoraAdapter) -> None:
    """peft's start: m = ‖W + s·B A‖ per output row (‖W‖ when B = 0), in the adapter's dtype."""
    if layer.weight.device.type == "meta":
        return
    adapter.lora_magnitude_vector.copy_(weight_norm(layer, adapter))


@torch.no_grad()
def dora_factor(layer, adapter: DoraAdapter) -> torch.Tensor:
    """(N, 1) fp32 ``m / ‖W + s·B A‖``: the row scale a DoRA merge applies to ``W + s·B A``."""
    return (adapter.lora_magnitude_vector.float() / weight_norm(layer, adapter)).unsqueeze(1)


def dora_forward(layer, adapter: DoraAdapter, x, weight, bias, dropout_p: float, seed: int) -> torch.Tensor:
    """The layer's DoRA forward (:func:`fastlora.ops.dora.dora_linear`) in x's dtype."""
    dtype = x.dtype
    return dora_linear(x, weight, bias, adapter.lora_A.to(dtype), adapter.lora_B.to(dtype),
                       adapter.lora_magnitude_vector, adapter.scaling, w_sqnorm(layer),
                       quant_state=layer.quant_state, dropout_p=dropout_p, seed=seed)  # fmt: skip
