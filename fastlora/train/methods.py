"""The fine-tuning methods behind ``fastlora finetune --method``: one table row per method (how to build the
trainable model, its default rate, how its artefact is written and read), over the protocol every wrapped
method answers (:class:`fastlora.methods.base.Method`).

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
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fastlora.methods import bottleneck, full, lora, prompt
from fastlora.methods.targets import LM_HEAD, classifier_heads
from fastlora.methods.tensors import copy_checked
from fastlora.train.durable import replace_dir

HEAD_FILE = "head.safetensors"


def head_modules(model: nn.Module) -> list[str]:
    """Names of the task head of a sequence classifier (``classifier`` for BERT, ``score`` for Llama)."""
    return classifier_heads(model)


# -- how each method builds the model to train: (model, options, heads, task) -> module ------------------


# --init: the LoRA start, as peft's init_lora_weights (pissa/olora/loftq rewrite the base, methods/lora/init.py)
INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq")


def _lora(quantize: str | None) -> Callable[..., nn.Module]:
    def build(model: nn.Module, options: dict[str, Any], heads: list[str], task: str) -> nn.Module:
        init = options.get("init", "kaiming")
        loftq = {"loftq_bits": 4, "loftq_iter": options.get("loftq_iter", 1)} if init == "loftq" else {}
        return lora.inject(
            model,
            r=options["lora_r"],
            lora_alpha=options["lora_alpha"],
            lora_dropout=options["lora_dropout"],
            target_modules=options["target_modules"],
            quantize=quantize,
            modules_to_save=heads or None,
            task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
            use_dora=bool(options.get("dora", False)),
            init_lora_weights=True if init == "kaiming" else init,
            loftq_config=loftq,
        )

    return build


def _adapter(model: nn.Module, options: dict[str, Any], heads: list[str], task: str) -> nn.Module:
    config = bottleneck.AdapterConfig(
        r=options["adapter_r"], placement=options["adapter_placement"], modules_to_save=heads or None
    )
    return bottleneck.inject_adapters(model, config)


def _prompt(make: Callable[[dict[str, Any]], prompt.PromptConfig]) -> Callable[..., nn.Module]:
    def build(model: nn.Module, options: dict[str, Any], heads: list[str], task: str) -> nn.Module:
        return prompt.inject_prompt(model, make(options))  # a classifier's head trains beside the prompt, as in peft

    return build


def _prefix_config(options: dict[str, Any]) -> prompt.PromptConfig:
    return prompt.PrefixTuningConfig(num_virtual_tokens=options["num_virtual_tokens"])


def _prompt_config(options: dict[str, Any]) -> prompt.PromptConfig:
    return prompt.PromptTuningConfig(num_virtual_tokens=options["num_virtual_tokens"])


def _ptuning_config(options: dict[str, Any]) -> prompt.PromptConfig:
    return prompt.PTuningConfig(num_virtual_tokens=options["num_virtual_tokens"], encoder=options["ptuning_encoder"])


def _full(model: nn.Module, options: dict[str, Any], heads: list[str], task: str) -> nn.Module:
    return full.full_finetune(model)


def _head(model: nn.Module, options: dict[str, Any], heads: list[str], task: str) -> nn.Module:
    if task != "classification":
        return full.feature_extraction(model, head=[LM_HEAD])
    return full.feature_extraction(model, head=heads or None)


# -- artefacts: what a method writes and how it is read back ------------------------------------------


class _Wrapped:
    """A method whose model answers :class:`~fastlora.methods.base.Method`: its own files, its class's load."""

    def __init__(self, model_class: type) -> None:
        self.model_class = model_class

    def tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.adapter_state_dict()

    def write(self, model: nn.Module, directory: str, tensors: dict[str, torch.Tensor]) -> None:
        model.save(directory, tensors)

    def read(self, base: nn.Module, directory: str, allow_base_mismatch: bool = False) -> nn.Module:
        return self.model_class.load(base, directory, allow_base_mismatch=allow_base_mismatch)


class _WholeModel:
    """Full fine-tuning: the whole model, in transformers' own format."""

    def tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return getattr(model, "module", model).state_dict()

    def write(self, model: nn.Module, directory: str, tensors: dict[str, torch.Tensor]) -> None:
        getattr(model, "module", model).save_pretrained(directory, state_dict=tensors, safe_serialization=True)

    def read(self, base: nn.Module, directory: str, allow_base_mismatch: bool = False) -> nn.Module:
        raise ValueError(f"fastlora: {directory} holds a whole model (method full): pass it as --model instead")


class _Head:
    """Feature extraction: the trained head's parameters, by name, in ``head.safetensors``."""

    def tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def write(self, model: nn.Module, directory: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(directory, HEAD_FILE))

    def read(self, base: nn.Module, directory: str, allow_base_mismatch: bool = False) -> nn.Module:
        # the head's file names and shapes are checked on load; it carries no base fingerprint
        return full.load_trainable(base, os.path.join(directory, HEAD_FILE))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One ``--method``: ``build(model, options, heads, task)`` gives the module to train (``heads``: the
    classifier's head names, trained beside the method), ``lr`` the default rate, ``artifact`` writes and reads
    its result, ``lora``: it trains LoRA factors (LoRA+ applies), ``fsdp``: worth sharding with FSDP2 (the
    others train few enough parameters for plain DDP), ``virtual_tokens``: the prompt takes that many of the
    host's positions (the input must leave room)."""

    build: Callable[[nn.Module, dict[str, Any], list[str], str], nn.Module]
    lr: float
    artifact: Any
    lora: bool = False
    fsdp: bool = False
    virtual_tokens: bool = False


# The rule of thumb taught for each: small rates for full fine-tuning, larger for few parameters.
RECIPES: dict[str, Recipe] = {
    "qlora": Recipe(_lora("nf4"), 2e-4, _Wrapped(lora.LoraModel), lora=True, fsdp=True),
    "lora": Recipe(_lora(None), 2e-4, _Wrapped(lora.LoraModel), lora=True, fsdp=True),
    "adapter": Recipe(_adapter, 1e-3, _Wrapped(bottleneck.AdapterModel)),
    "prefix": Recipe(_prompt(_prefix_config), 1e-2, _Wrapped(prompt.PromptModel), virtual_tokens=True),
    "prompt": Recipe(_prompt(_prompt_config), 3e-2, _Wrapped(prompt.PromptModel), virtual_tokens=True),
    "ptuning": Recipe(_prompt(_ptuning_config), 1e-2, _Wrapped(prompt.PromptModel), virtual_tokens=True),
    "full": Recipe(_full, 2e-5, _WholeModel(), fsdp=True),
    "head": Recipe(_head, 1e-3, _Head(), fsdp=True),
}
METHODS = tuple(RECIPES)
DEFAULT_LR = {method: recipe.lr for method, recipe in RECIPES.items()}


def recipe(method: str) -> Recipe:
    """The table row of ``method`` (a ValueError naming the known ones otherwise)."""
    if method not in RECIPES:
        raise ValueError(f"fastlora: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return RECIPES[method]


def build(model: nn.Module, method: str, options: dict[str, Any], task: str) -> nn.Module:
    """The trainable model for ``method``; ``options`` holds the method's hyperparameters
    (lora_r, lora_alpha, lora_dropout, target_modules, adapter_r, adapter_placement,
    num_virtual_tokens, ptuning_encoder, layer_decay...)."""
    row = recipe(method)
    heads = head_modules(model) if task == "classification" else []
    return row.build(model, options, heads, task)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name (what a checkpoint needs besides the optimiser)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str, local: bool = False) -> None:
    """Copy ``tensors`` into the trainable parameters, checking names and shapes first
    (``local``: the parameters are FSDP2 DTensors and ``tensors`` hold this rank's shards)."""
    own = dict(model.named_parameters())
    if local:
        own = {n: p.to_local() if hasattr(p, "to_local") else p for n, p in own.items()}
    wanted = {n: p for n, p in own.items() if p.requires_grad}
    copy_checked(wanted, tensors, f"{where} does not fit this run", owner="this run")


def _atomic_dir(final: str) -> str:
    """A fresh temporary directory beside ``final`` (renamed onto it by :func:`_publish`)."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)


def _publish(tmp: str, final: str) -> None:
    """Replace ``final`` by ``tmp``, durably (fsynced before and after the rename): the old directory stays whole
    until the new one is complete (:func:`fastlora.train.durable.replace_dir`)."""
    replace_dir(tmp, final)


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
    artifact = recipe(method).artifact
    tensors = {k: full_tensor(v) for k, v in artifact.tensors(model).items()}
    if not write:
        return
    tmp = _atomic_dir(directory)
    try:
        artifact.write(model, tmp, tensors)
        with open(os.path.join(tmp, "fastlora_run.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        _publish(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_artifact(base: nn.Module, directory: str, *, allow_base_mismatch: bool = False) -> nn.Module:
    """The trained model from ``directory`` (written by :func:`save_artifact`) on ``base``; an adapter whose
    record names another base is refused unless ``allow_base_mismatch`` (then loaded with a warning)."""
    artifact = recipe(read_manifest(directory)["method"]).artifact
    return artifact.read(base, directory, allow_base_mismatch)


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
