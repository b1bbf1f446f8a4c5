"""Full fine-tuning, feature extraction, and optimiser parameter groups (discriminative rates, LoRA+).

model = full_finetune(model)                     # every floating-point parameter trains
model = feature_extraction(model)                # frozen backbone; only the head (classifier / score / lm_head)
opt = torch.optim.AdamW(discriminative_param_groups(model, lr=2e-5, decay=0.9, weight_decay=0.01))
opt = torch.optim.AdamW(loraplus_param_groups(fastlora.inject(model, r=16), lr=1e-4, ratio=16))

The group builders return plain ``dict``s (``params``, ``param_names``, ``lr``, ``weight_decay``) that
any torch optimiser and LR scheduler accept; they hold only parameters with ``requires_grad``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence

from torch import nn

from fastlora.methods.files import atomic_write, read_safetensors, safetensors_bytes
from fastlora.methods.report import TrainableReport, trainable_report
from fastlora.methods.targets import HEAD_NAMES, select
from fastlora.methods.tensors import copy_checked
from fastlora.modules.lora import FastLoRALinear

# "model.layers.11.", "bert.encoder.layer.11.", "transformer.h.11.", "blocks.11." -> 11 (the first match)
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
# Input embeddings: BERT's embeddings.*, Llama's embed_tokens, GPT-2's wte / wpe, T5's shared, prompts.
_EMBEDDING = re.compile(r"(?:^|\.)(?:\w*embed\w*|wte|wpe|shared)(?:\.|$)")
_LORA_B = re.compile(r"(?:^|\.)lora_(?:embedding_)?B(?:\.|$)")


def full_finetune(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Make every floating-point parameter of ``model`` trainable (in place) and return it.

    Packed 4-bit weights (uint8) cannot take gradients: they stay frozen, with a warning. A model holding
    FastLoRALinear layers is refused (their base weight has no gradient path); merge_and_unload() first.
    """
    lora = [name for name, m in model.named_modules() if isinstance(m, FastLoRALinear)]
    if lora:
        raise TypeError(
            f"fastlora: full_finetune on a model with {len(lora)} FastLoRALinear layers (e.g. {lora[0]}); "
            "call merge_and_unload() first, or train the adapters instead"
        )
    frozen = []
    for name, p in model.named_parameters():
        if p.is_floating_point() or p.is_complex():
            p.requires_grad_(True)
        else:
            frozen.append(name)
    if frozen:
        warnings.warn(
            f"fastlora: {len(frozen)} non-floating-point parameters (packed 4-bit, e.g. {frozen[0]}) stay frozen; "
            "dequantise the model to train them",
            stacklevel=2,
        )
    if verbose:
        print(trainable_report(model))
    return model


def _module_paths(model: nn.Module, wanted: Sequence[str]) -> list[str]:
    named = [(p, m) for p, m in model.named_modules() if p]
    note = f" (children: {[n for n, _ in model.named_children()]})"
    found: list[str] = []
    for name in wanted:
        hits = select(named, [name], model, subject=f"head {name!r}", note=note)
        found += [p for p, _ in hits if p not in found]
    return found


def _find_head(model: nn.Module) -> list[str]:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return [name]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for path, module in model.named_modules():
        if out is not None and module is out and path:
            return [path]
    children = [n for n, _ in model.named_children()]
    raise ValueError(
        f"fastlora: no task head found on {type(model).__name__} (looked for {', '.join(HEAD_NAMES)} and "
        f"get_output_embeddings()); attach one and pass head=[its name] (children: {children})"
    )


def feature_extraction(
    model: nn.Module, head: str | Sequence[str] | None = None, *, verbose: bool = False
) -> nn.Module:
    """Freeze the backbone of ``model`` and leave only its task head trainable (in place); return it.

    head: module names (full paths or name suffixes, e.g. "classifier"); None finds ``classifier``,
    ``score`` or ``lm_head`` on the model, else ``get_output_embeddings()``. A head attached by the user
    (``model.classifier = nn.Linear(...)``) is found the same way. A head tied to the input embeddings
    trains them too (a warning says so). ``verbose`` prints :func:`trainable_report`.
    """
    paths = _find_head(model) if head is None else _module_paths(model, [head] if isinstance(head, str) else head)
    model.requires_grad_(False)
    head_params: dict[int, str] = {}
    for path in paths:
        for name, p in model.get_submodule(path).named_parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
                head_params[id(p)] = f"{path}.{name}"
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in head_params and not any(name.startswith(q + ".") for q in paths):
            warnings.warn(
                f"fastlora: head parameter {head_params[id(p)]} is tied to {name}; training the head changes it too",
                stacklevel=2,
            )
    if verbose:
        print(trainable_report(model))
    return model


def save_trainable(model: nn.Module, path: str) -> list[str]:
    """Write the parameters of ``model`` that require grad (names as in ``named_parameters``) to one
    safetensors file, atomically; returns the names. For full fine-tuning that is the whole model, for
    feature extraction the head only."""
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError(f"fastlora: {type(model).__name__} has no trainable parameters to save")
    atomic_write(path, safetensors_bytes(tensors))
    return sorted(tensors)


def load_trainable(model: nn.Module, path: str) -> nn.Module:
    """Copy the tensors :func:`save_trainable` wrote into ``model`` (every key must be a parameter of the
    same shape; checked before anything is copied, so on error the model is unchanged); returns it."""
    unknown = "{key!r} is not a parameter of " + type(model).__name__
    copy_checked(dict(model.named_parameters()), read_safetensors(path), path, partial=True, unknown=unknown)
    return model


def _check_rates(lr: float, weight_decay: float) -> None:
    if not lr > 0:
        raise ValueError(f"fastlora: lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"fastlora: weight_decay must be >= 0, got {weight_decay!r}")


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"fastlora: {type(model).__name__} has no trainable parameters")
    return params


def _groups(entries: Iterable[tuple[str, nn.Parameter, float, float]]) -> list[dict]:
    """One optimiser group per (lr, weight_decay), highest rate first."""
    groups: dict[tuple[float, float], dict] = {}
    for name, p, lr, wd in entries:
        group = groups.setdefault((lr, wd), {"params": [], "param_names": [], "lr": lr, "weight_decay": wd})
        group["params"].append(p)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], -k[1]))]


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Depth below the top of every parameter name: 0 for the top layer, heads and final norms, N-1-i for
    layer i of N (index parsed from ``layers.i.`` / ``layer.i.`` / ``h.i.`` / ``blocks.i.``), N for the
    input embeddings (names with ``embed``, ``wte``, ``wpe``, ``shared``) and anything else below layer 0."""
    names = [n for n, _ in model.named_parameters()]
    indices = {n: int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    if not indices:
        raise ValueError(
            f"fastlora: no numbered layers found in {type(model).__name__}'s parameter names "
            "(expected names like 'layers.3.' or 'layer.3.')"
        )
    top = max(indices.values())
    return {n: top - indices[n] if n in indices else (top + 1 if _EMBEDDING.search(n) else 0) for n in names}


def discriminative_param_groups(
    model: nn.Module,
    lr: float,
    decay: float = 0.9,
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = ("bias", "LayerNorm.weight", "norm.weight"),
) -> list[dict]:
    """Layer-wise decayed learning rates (ULMFiT / "How to fine-tune BERT"): parameter at depth k (see
    :func:`layer_depths`) gets ``lr * decay**k``: heads, final norm and the top layer ``lr``, layer i of N
    ``lr * decay**(N-1-i)``, embeddings ``lr * decay**N``. Names ending with an entry of ``no_decay`` get
    weight decay 0, the others ``weight_decay``. Only trainable parameters; one group per (lr, decay).
    """
    _check_rates(lr, weight_decay)
    if not 0 < decay <= 1:
        raise ValueError(f"fastlora: decay must be in (0, 1], got {decay!r}")
    depths = layer_depths(model)
    entries = []
    for name, p in _trainable(model):
        wd = 0.0 if any(name.endswith(s) for s in no_decay) else float(weight_decay)
        entries.append((name, p, lr * decay ** depths[name], wd))
    return _groups(entries)


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): LoRA ``B`` factors (``...lora_B`` in fastlora's FastLoRALinear, peft's
    ``lora_B`` / ``lora_embedding_B``) at ``lr * ratio``, ``A`` factors and every other trainable
    parameter (heads, modules_to_save) at ``lr``; ``weight_decay`` on all."""
    _check_rates(lr, weight_decay)
    if not ratio > 0:
        raise ValueError(f"fastlora: ratio must be > 0, got {ratio!r}")
    params = _trainable(model)
    if not any(_LORA_B.search(n) for n, _ in params):
        raise ValueError(
            f"fastlora: no trainable LoRA B factors (parameters named lora_B) in {type(model).__name__}; "
            "inject LoRA first (fastlora.inject)"
        )
    entries = [(n, p, lr * ratio if _LORA_B.search(n) else lr, float(weight_decay)) for n, p in params]
    return _groups(entries)


__all__ = [
    "TrainableReport",
    "discriminative_param_groups",
    "feature_extraction",
    "full_finetune",
    "layer_depths",
    "load_trainable",
    "loraplus_param_groups",
    "save_trainable",
    "trainable_report",
]
