"""The state-dict keys of a :class:`~fastlora.modules.lora.FastLoRALinear` beyond its parameters: a 4-bit base's
statistics under bitsandbytes' ``Linear4bit`` names (``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``...),
and the refit residual of an error-compensated 4-bit merge (``merge(requantize=True, refit_rank=k)``):
``weight.residual_R`` (k, K) and ``weight.residual_L`` (N, k), fp32, the layer adding x Rᵀ Lᵀ to x Q̂ᵀ. A state dict
holding them is a merged layer's: loading it installs the residual and marks the layer merged (as the saved one
was; its unmerge is refused, as after ``merge(keep_original=False)``), so the reloaded layer gives the same outputs.

The layer's ``_save_to_state_dict`` / ``_load_from_state_dict`` call these, so the names live in one place.
"""

from __future__ import annotations

import torch
from torch import nn

from fastlora.quant import QuantState

_QUANT_PREFIX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.")
RESIDUAL_KEYS = ("weight.residual_R", "weight.residual_L")  # (R (k, K), L (N, k)) of FastLoRALinear._residual


def save_extra(layer, destination: dict[str, torch.Tensor], prefix: str) -> None:
    """Add the 4-bit statistics of ``layer``'s base (if 4-bit) to ``destination`` under ``prefix + "weight."``, and
    its refit residual (if any) under ``prefix + RESIDUAL_KEYS``."""
    if layer.quant_state is not None:
        destination.update(layer.quant_state.state_dict(prefix + "weight."))
    residual = getattr(layer, "_residual", None)
    if residual is not None:
        for key, t in zip(RESIDUAL_KEYS, residual, strict=True):
            destination[prefix + key] = t.detach()


def _load_residual(layer, state_dict: dict, prefix: str) -> dict:
    """Install a refit residual from ``state_dict`` (both keys, or neither: a ValueError otherwise); returns the
    state dict without them."""
    keys = [prefix + k for k in RESIDUAL_KEYS]
    present = [k in state_dict for k in keys]
    if not any(present):
        return state_dict
    if not all(present):
        raise ValueError(f"FastLoRALinear: state dict has only one of {keys}")
    r, lo = (state_dict[k] for k in keys)
    fits = r.dim() == lo.dim() == 2 and r.shape == (lo.shape[1], layer.in_features)
    if not fits or lo.shape[0] != layer.out_features:
        raise ValueError(f"FastLoRALinear: refit residual R {tuple(r.shape)}, L {tuple(lo.shape)} do not fit the layer "
                         f"({layer.out_features}, {layer.in_features})")  # fmt: skip
    device = layer.weight.device
    layer._residual = (r.detach().float().to(device).contiguous(), lo.detach().float().to(device).contiguous())
    layer.merged, layer._stash = True, None
    return {k: v for k, v in state_dict.items() if k not in keys}


def load_extra(layer, state_dict: dict, prefix: str, missing_keys: list[str]) -> dict:
    """Take a 4-bit base out of ``state_dict`` (packed ``weight`` + statistics) and install it on ``layer``.

    A refit residual (``RESIDUAL_KEYS``) is installed too, the layer marked merged. Returns the state dict the
    parameters load from (without the keys consumed here). A 4-bit base whose shape
    is not the layer's raises a ValueError naming both shapes; statistics without ``weight`` raise too.
    """
    layer._missing_before_load = None
    state_dict = _load_residual(layer, state_dict, prefix)
    quant_keys = [k for k in state_dict if k.startswith(prefix + "weight.") and
                  k[len(prefix) + 7:].startswith(_QUANT_PREFIX)]  # fmt: skip
    if not quant_keys:
        return state_dict
    packed = state_dict.get(prefix + "weight")
    if packed is None:
        raise ValueError(f"FastLoRALinear: state dict has {prefix}weight.* statistics but no {prefix}weight")
    state = QuantState.from_state_dict(state_dict, prefix + "weight.", packed=packed)
    if tuple(state.shape) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"FastLoRALinear: state dict weight is {tuple(state.shape)}, the layer "
            f"({layer.out_features}, {layer.in_features})"
        )
    device = layer.weight.device
    layer.weight = nn.Parameter(packed.to(device), requires_grad=False)
    layer.quant_state = state.to(device)
    layer._missing_before_load = set(missing_keys)
    return {k: v for k, v in state_dict.items() if k not in quant_keys and k != prefix + "weight"}


def finish_load(layer, prefix: str, missing_keys: list[str]) -> None:
    """After the parameters loaded: the 4-bit ``weight`` consumed by :func:`load_extra` is not missing."""
    before = getattr(layer, "_missing_before_load", None)
    if before is None:
        return
    missing_keys[:] = [k for k in missing_keys if k in before or k != prefix + "weight"]
    layer._missing_before_load = None
