"""Which blocks of a model run their shared-input projections as one op, and turning that on and off.

Detected by structure and names (Llama, Mistral, Qwen2/3, Gemma and their likes):

- attention: a module with children ``q_proj``, ``k_proj``, ``v_proj`` that are FastLoRALinear layers
  -> :class:`~fastlora.modules.group.SharedInputGroup` (q/k/v: 3 ops -> 1);
- MLP: a module with ``gate_proj``, ``up_proj``, ``down_proj`` and an ``act_fn`` that is SiLU, exact GELU or
  tanh GELU, whose class is one of :data:`GATED_MLPS` (their forward is ``down(act(gate(x)) · up(x))``)
  -> :class:`~fastlora.modules.group.GatedMLPGroup` (gate/up + activation: 2 ops + 2 elementwise -> 1).

Other models name their blocks explicitly (``LoraConfig.fuse_blocks`` = a list of specs):

    {"members": ["query", "key", "value"]}                                   # shared input, any parent
    {"members": ["w1", "w3"], "down": "w2", "act": "silu"}                    # gated MLP: down(act(w1(x))·w3(x))

A spec's optional ``"parent"`` is a regex the parent's path must match (``re.search``). Enabling is idempotent
and never touches a state dict; :func:`disable_block_groups` removes every group.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from fastlora.modules.group import GatedMLPGroup, SharedInputGroup
from fastlora.modules.lora import FastLoRALinear

__all__ = ["GATED_MLPS", "block_groups", "disable_block_groups", "enable_block_groups", "mlp_activation"]

_ATTR = "_fastlora_groups"  # on a parent module: its group objects (plain list, not a module: no state-dict keys)
QKV = {"members": ["q_proj", "k_proj", "v_proj"]}
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP", "Olmo2MLP")
# HF activation classes by the function they compute (transformers.activations, torch.nn)
_ACTS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu", "PytorchGELUTanh": "gelu_tanh",
         "GELUTanh": "gelu_tanh"}  # fmt: skip


def mlp_activation(act_fn: nn.Module | None) -> str | None:
    """ "silu", "gelu" or "gelu_tanh" for an activation module the fused epilogue computes, else None."""
    if isinstance(act_fn, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act_fn.approximate)
    name = _ACTS.get(type(act_fn).__name__)
    if name == "gelu" and getattr(act_fn, "act", None) is not nn.functional.gelu:
        return None  # GELUActivation(use_gelu_python=True) computes another formula
    return name


def _auto_specs(module: nn.Module) -> list[dict[str, Any]]:
    specs = []
    if all(isinstance(getattr(module, n, None), FastLoRALinear) for n in QKV["members"]):
        specs.append(QKV)
    names = ("gate_proj", "up_proj", "down_proj")
    if type(module).__name__ in GATED_MLPS and all(isinstance(getattr(module, n, None), nn.Module) for n in names):
        act = mlp_activation(getattr(module, "act_fn", None))
        tp = getattr(getattr(module, "config", None), "pretraining_tp", 1)
        if act is not None and (tp or 1) <= 1:
            specs.append({"members": ["gate_proj", "up_proj"], "down": "down_proj", "act": act})
    return specs


def _matches(spec: dict[str, Any], path: str, module: nn.Module) -> bool:
    if "parent" in spec and not re.search(spec["parent"], path):
        return False
    names = [*spec["members"], *([spec["down"]] if "down" in spec else [])]
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _check_spec(spec: Any) -> None:
    ok = isinstance(spec, dict) and isinstance(spec.get("members"), list) and set(spec) <= {"members", "down", "act",
                                                                                            "parent"}  # fmt: skip
    if ok and "down" in spec:
        ok = len(spec["members"]) == 2 and spec.get("act") in ("silu", "gelu", "gelu_tanh")
    if not ok or len(spec["members"]) < 2:
        raise ValueError(
            "fastlora fuse_blocks: a spec is {'members': [at least 2 child names]} or {'members': [gate, up], "
            "'down': name, 'act': 'silu'|'gelu'|'gelu_tanh'} (optional 'parent': regex), "
            f"got {spec!r}"
        )


def enable_block_groups(model: nn.Module, specs: list[dict[str, Any]] | None = None) -> int:
    """Group the shared-input projections of ``model`` (``specs`` None: detected, see the module docstring).

    Returns:
        The number of groups installed now (0 when the model is already grouped).
    """
    for spec in specs or ():
        _check_spec(spec)
    count = 0
    for path, module in model.named_modules():
        if getattr(module, _ATTR, None) is not None:
            continue
        found = _auto_specs(module) if specs is None else [s for s in specs if _matches(s, path, module)]
        groups = []
        for spec in found:
            if "down" in spec:
                groups.append(GatedMLPGroup(module, *spec["members"], spec["down"], spec["act"]))
            else:
                groups.append(SharedInputGroup(module, spec["members"]))
        if groups:
            object.__setattr__(module, _ATTR, groups)
            count += len(groups)
    return count


def disable_block_groups(model: nn.Module) -> int:
    """Remove every group of ``model`` (hooks and forward replacements); returns how many."""
    count = 0
    for module in model.modules():
        groups = module.__dict__.pop(_ATTR, None) or []
        for group in groups:
            group.remove()
        count += len(groups)
    return count


def block_groups(model: nn.Module) -> list[tuple[str, Any]]:
    """(parent path, group object) of every group installed in ``model``."""
    return [(path, g) for path, m in model.named_modules() for g in m.__dict__.get(_ATTR, None) or []]
