"""The fine-tuning methods behind ``fastlora finetune --method``: build the trainable model, save it.

Each method takes a transformers model (sequence classification or causal LM) and returns the
module to train; every parameter that trains has ``requires_grad=True`` and nothing else does.

| method   | what trains                                   | artefact                                   |
|----------|-----------------------------------------------|--------------------------------------------|
| qlora    | LoRA on every linear, 4-bit NF4 frozen base   | peft adapter dir (+ head for classifiers)  |
| lora     | LoRA on every linear, frozen float base       | peft adapter dir (+ head for classifiers)  |
| adapter  | bottleneck adapters (Houlsby placement)       | adapter weights + config                   |
| prefix   | key/value prefixes at every layer             | prefix weights + config                    |
| prompt   | soft-prompt embeddings                        | prompt weights + config                    |
| ptuning  | prompt encoder (MLP) producing virtual tokens | prompt weights + config                    |
| full     | everything                                    | a whole model directory                    |
| head     | the task head only (feature extraction)       | head weights                               |
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

METHODS = ("qlora", "lora", "adapter", "prefix", "prompt", "ptuning", "full", "head")
# The rule of thumb taught for each: small rates for full fine-tuning, larger for few parameters.
DEFAULT_LR = {
    "full": 2e-5,
    "head": 1e-3,
    "lora": 2e-4,
    "qlora": 2e-4,
    "adapter": 1e-3,
    "prefix": 1e-2,
    "prompt": 3e-2,
    "ptuning": 1e-2,
}
HEAD_NAMES = ("classifier", "score")


def head_modules(model: nn.Module) -> list[str]:
    """Names of the task head of a sequence classifier (``classifier`` for BERT, ``score`` for Llama)."""
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]


def build(model: nn.Module, method: str, options: dict[str, Any], task: str) -> nn.Module:
    """The trainable model for ``method``; ``options`` holds the method's hyperparameters
    (lora_r, lora_alpha, lora_dropout, target_modules, adapter_r, adapter_placement,
    num_virtual_tokens, ptuning_encoder, layer_decay...)."""
    if method not in METHODS:
        raise ValueError(f"fastlora: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    heads = head_modules(model) if task == "classification" else []
    if method in ("qlora", "lora"):
        import fastlora

        return fastlora.inject(
            model,
            r=options["lora_r"],
            lora_alpha=options["lora_alpha"],
            lora_dropout=options["lora_dropout"],
            target_modules=options["target_modules"],
            quantize="nf4" if method == "qlora" else None,
            modules_to_save=heads or None,
            task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
        )
    if method == "full":
        from fastlora.strategies.full import full_finetune

        return full_finetune(model)
    if method == "head":
        from fastlora.strategies.full import feature_extraction

        if task != "classification":
            return feature_extraction(model, head=["lm_head"])
        return feature_extraction(model, head=heads or None)
    if method == "adapter":
        from fastlora.strategies.bottleneck import AdapterConfig, inject_adapters

        config = AdapterConfig(
            r=options["adapter_r"], placement=options["adapter_placement"], modules_to_save=heads or None
        )
        return inject_adapters(model, config)
    from fastlora.strategies import prompt as prompt_mod

    n = options["num_virtual_tokens"]
    if method == "prompt":
        config = prompt_mod.PromptTuningConfig(num_virtual_tokens=n)
    elif method == "ptuning":
        config = prompt_mod.PTuningConfig(num_virtual_tokens=n, encoder=options["ptuning_encoder"])
    else:
        config = prompt_mod.PrefixTuningConfig(num_virtual_tokens=n)
    return prompt_mod.inject_prompt(model, config)  # a classifier's head trains beside the prompt, as in peft


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name (what a checkpoint needs besides the optimiser)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str, local: bool = False) -> None:
    """Copy ``tensors`` into the trainable parameters, checking names and shapes first
    (``local``: the parameters are FSDP2 DTensors and ``tensors`` hold this rank's shards)."""
    own = dict(model.named_parameters())
    if local:
        own = {n: p.to_local() if hasattr(p, "to_local") else p for n, p in own.items()}
    wanted = {n for n, p in own.items() if p.requires_grad}
    if set(tensors) != wanted:
        missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
        raise ValueError(f"fastlora: {where} does not fit this run: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, value in tensors.items():
        if own[name].shape != value.shape:
            raise ValueError(f"fastlora: {where}: {name} has shape {tuple(value.shape)}, the model needs "
                             f"{tuple(own[name].shape)}")  # fmt: skip
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)


def _atomic_dir(final: str) -> str:
    """A fresh temporary directory beside ``final`` (renamed onto it by :func:`_publish`)."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)


def _publish(tmp: str, final: str) -> None:
    """Replace ``final`` by ``tmp``: the old directory stays whole until the new one is complete."""
    old = None
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: an FSDP2 shard (DTensor) is all-gathered (a collective: every rank must call it)."""
    t = t.detach()
    return t.full_tensor().clone() if hasattr(t, "full_tensor") else t  # own storage: no padding, no offset


def save_artifact(
    model: nn.Module, method: str, directory: str, manifest: dict[str, Any], *, write: bool = True
) -> None:
    """Write what ``method`` trained into ``directory`` (atomically, as a whole), with ``fastlora_run.json``
    describing the run (method, task, labels, base model) for ``fastlora merge/eval/generate``.

    Under FSDP2 every rank calls this (the shards are gathered), and only the one with ``write`` writes.
    """
    if method in ("qlora", "lora"):
        tensors = {k: full_tensor(v) for k, v in model.adapter_state_dict().items()}
    elif method == "full":
        inner = getattr(model, "module", model)
        tensors = {k: full_tensor(v) for k, v in inner.state_dict().items()}
    else:
        tensors = {n: full_tensor(t) for n, t in trainable_state(model).items()}
    if not write:
        return
    tmp = _atomic_dir(directory)
    try:
        if method in ("qlora", "lora"):
            from fastlora.adapters.io import save_adapter_files

            config = dataclasses.replace(model.peft_config[model.active_adapter], inference_mode=True)
            save_adapter_files(tmp, config, tensors)
        elif method == "full":
            inner.save_pretrained(tmp, state_dict=tensors, safe_serialization=True)
        elif method == "head":
            save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(tmp, "head.safetensors"))
        else:  # adapter, prefix, prompt, ptuning: their own format (with a classifier's head)
            model.save_adapter(tmp)
        with open(os.path.join(tmp, "fastlora_run.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        _publish(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_artifact(base: nn.Module, directory: str) -> nn.Module:
    """The trained model from ``directory`` (written by :func:`save_artifact`) on ``base``."""
    manifest = read_manifest(directory)
    method = manifest["method"]
    if method in ("qlora", "lora"):
        import fastlora

        return fastlora.load(base, directory)
    if method == "full":
        raise ValueError(f"fastlora: {directory} holds a whole model (method full): pass it as --model instead")
    if method == "head":
        tensors = load_file(os.path.join(directory, "head.safetensors"))
        own = dict(base.named_parameters())
        for name, value in tensors.items():
            if name not in own or own[name].shape != value.shape:
                raise ValueError(f"fastlora: {directory}: {name} does not fit the model")
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)
        return base
    if method == "adapter":
        from fastlora.strategies.bottleneck import load_adapters

        return load_adapters(base, directory)
    from fastlora.strategies.prompt import load_prompt

    return load_prompt(base, directory)


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "fastlora_run.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"fastlora: {directory} has no fastlora_run.json: not a directory written by fastlora finetune"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"fastlora: {path} is corrupt ({e})") from e
    if manifest.get("method") not in METHODS:
        raise ValueError(f"fastlora: {path}: unknown method {manifest.get('method')!r}")
    return manifest
