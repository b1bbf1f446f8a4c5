"""Which modules of a host a LoRA config adapts: linear layers by peft's target rules, modules_to_save by
peft's suffix rule, and the tensor shapes an adapter file must have for them."""

from __future__ import annotations

import sys

from torch import nn

from fastlora.methods.fingerprint import BaseWeight
from fastlora.methods.lora.config import LoraConfig
from fastlora.methods.lora.files import PREFIX
from fastlora.methods.targets import CLASSIFIER_HEADS, LM_HEAD, matches, no_match, select, select_each
from fastlora.methods.wrapper import ModulesToSave
from fastlora.modules.lora import FastLoRALinear
from fastlora.quant import QuantState


def bnb_linear4bit() -> type | None:
    """``bitsandbytes.nn.Linear4bit`` where bitsandbytes is already imported, else None.

    A model can hold a bnb layer only once bitsandbytes is imported, so fastlora never imports it here:
    its import prints notes about optional backends (e.g. "Failed to load CPU gemm_4bit_forward") into
    every float-model ``inject``.
    """
    bnb = sys.modules.get("bitsandbytes")
    nn_module = getattr(bnb, "nn", None)
    return getattr(nn_module, "Linear4bit", None)


def is_linear(module: nn.Module) -> bool:
    """Whether LoRA can adapt ``module``: an ``nn.Linear``, a FastLoRALinear or a bnb ``Linear4bit``."""
    bnb4 = bnb_linear4bit()
    return isinstance(module, (nn.Linear, FastLoRALinear)) or (bnb4 is not None and isinstance(module, bnb4))


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer; a bnb Linear4bit reads them from its quant state."""
    state = getattr(module.weight, "quant_state", None)
    if state is not None and not isinstance(module, FastLoRALinear):
        out_features, in_features = state.shape
        return int(in_features), int(out_features)
    return module.in_features, module.out_features


def outside_copies(path: str) -> bool:
    """Whether ``path`` is a module of the host itself, not inside a modules_to_save copy."""
    return ".trained." not in f".{path}."


def lora_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """Linear layers selected by ``config.target_modules`` (peft's matching rules)."""
    target = config.target_modules
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(p, m) for p, m in model.named_modules() if is_linear(m) and outside_copies(p)]
    linears = [(p, m) for p, m in linears if not any(p.startswith(q + ".") for q, _ in linears)]
    wrapped = [p for p, m in model.named_modules() if isinstance(m, ModulesToSave)]
    linears = [(p, m) for p, m in linears if not any(p.startswith(q + ".") for q in wrapped)]
    note = f" ({len(linears)} linear layers)"
    if target == "all-linear":  # not the output head, a sequence classifier's head, or modules_to_save
        skip = [LM_HEAD, *(config.modules_to_save or [])]
        if config.task_type == "SEQ_CLS":
            skip += CLASSIFIER_HEADS
        found = [(p, m) for p, m in linears if m is not head and not matches(p, skip)]
        if not found:
            subject = f"target_modules {target!r}"
            raise no_match(subject, model, [target], [p for p, _ in linears], kind="linear layer", note=note)
        return found
    if isinstance(target, str) or (isinstance(target, list) and target):
        return select(linears, target, model, kind="linear layer", note=note)
    raise ValueError(f"fastlora: target_modules must be a list of names, a regex or 'all-linear', got {target!r}")


def saved_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """Modules of ``config.modules_to_save``, matched by any suffix as peft does."""
    named = [(p, m) for p, m in model.named_modules() if p and outside_copies(p)]
    named = [(p, m) for p, m in named if not p.endswith(".original")]
    return select_each(named, config.modules_to_save or [], model, any_suffix=True)


def expected_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """peft file name -> shape of every tensor adapter ``config`` gives ``model`` (LoRA factors, modules_to_save)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, module in lora_targets(model, config):
        r, _ = config.r_and_alpha(path)
        in_features, out_features = features(module)
        shapes[f"{PREFIX}{path}.lora_A.weight"] = (r, in_features)
        shapes[f"{PREFIX}{path}.lora_B.weight"] = (out_features, r)
        if config.use_dora:
            shapes[f"{PREFIX}{path}.lora_magnitude_vector"] = (out_features,)
    for path, module in saved_targets(model, config):
        base = module.original if isinstance(module, ModulesToSave) else module
        for key, value in base.state_dict().items():
            shapes[f"{PREFIX}{path}.{key}"] = tuple(value.shape)
    return shapes


def base_weights(layers: list[tuple[str, nn.Module]]) -> list[BaseWeight] | None:
    """The base weights of LoRA target layers for :func:`~fastlora.methods.fingerprint.base_fingerprint`: a
    FastLoRALinear's frozen weight and 4-bit state (its original while merged; None when a merge without
    ``keep_original`` lost it), a Linear4bit's packed weight and state, an nn.Linear's weight."""
    out: list[BaseWeight] = []
    for path, module in layers:
        if isinstance(module, FastLoRALinear):
            weight, state = module.weight, module.quant_state
            if module.merged:
                if module._stash is None:
                    return None
                weight, state = module._stash
        else:
            weight = module.weight
            bnb_state = getattr(weight, "quant_state", None)
            state = QuantState.from_bnb(bnb_state) if bnb_state is not None else None
        out.append((path, weight, state))
    return out
