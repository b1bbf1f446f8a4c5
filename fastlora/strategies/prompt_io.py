"""Saving and loading prompts: peft's adapter_config.json fields and the files of a saved prompt.

PromptModel.save_adapter(dir) -> :func:`save_prompt`: ``adapter_model.safetensors`` (see
:meth:`PromptModel.adapter_state_dict`) and ``adapter_config.json`` (:func:`peft_config_dict`), each written
atomically, in peft's layout, so ``peft.PeftModel.from_pretrained`` loads them.
:func:`load_prompt` reads a directory saved by fastlora or by peft (PROMPT_TUNING, P_TUNING, PREFIX_TUNING),
checks the config, every tensor's name and shape against the host before touching it, and rebuilds the
PromptModel. The model side (configs, encoders, PromptModel) is :mod:`fastlora.strategies.prompt`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from torch import nn

from fastlora.adapters.io import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_files
from fastlora.strategies.prompt import (
    ENCODER_PREFIX,
    HEAD_PREFIX,
    PROMPT_KEY,
    PrefixTuningConfig,
    PromptConfig,
    PromptEmbedding,
    PromptModel,
    PromptTuningConfig,
    PTuningConfig,
    _build_encoder,
    _Dims,
    _head_modules,
    _host_dims,
)

# -- save ----------------------------------------------------------------------------------------


def peft_config_dict(model: PromptModel) -> dict[str, Any]:
    """The adapter_config.json content of ``model`` (peft's fields for its method)."""
    c, d = model.peft_config, model.dims
    token_dim, heads = (d.kv_dim, d.kv_heads) if model.is_prefix else (d.hidden, d.heads)
    out: dict[str, Any] = {
        "peft_type": c.peft_type,
        "task_type": model.task_type,
        "num_virtual_tokens": c.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": d.num_layers,
        "modules_to_save": [p.rpartition(".")[2] for p in model.head_paths] or None,
        "inference_mode": True,
        "base_model_name_or_path": getattr(model.model.config, "_name_or_path", None) or None,
        "revision": None,
    }
    if isinstance(c, PromptTuningConfig):
        init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[c.init]
        out.update(
            prompt_tuning_init=init,
            prompt_tuning_init_text=c.init_text,
            tokenizer_name_or_path=c.tokenizer_path,
            tokenizer_kwargs=None,
        )
    elif isinstance(c, PTuningConfig):
        out.update(
            encoder_reparameterization_type=c.encoder.upper(),
            encoder_hidden_size=c.encoder_hidden_size or d.hidden,
            encoder_num_layers=c.encoder_num_layers,
            encoder_dropout=c.encoder_dropout,
        )
    else:
        out.update(prefix_projection=c.prefix_projection, encoder_hidden_size=c.encoder_hidden_size or d.kv_dim)
    return out


def save_prompt(model: PromptModel, directory: str) -> None:
    """Write ``model.adapter_state_dict()`` to adapter_model.safetensors and :func:`peft_config_dict` to
    adapter_config.json in ``directory``, each file atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.adapter_state_dict().items()}
    atomic_write(os.path.join(directory, WEIGHTS_NAME), save(tensors, metadata={"format": "pt"}))
    config = json.dumps(peft_config_dict(model), indent=2, sort_keys=True).encode()
    atomic_write(os.path.join(directory, CONFIG_NAME), config)


# -- load ----------------------------------------------------------------------------------------


def _config_from_peft(raw: Any, where: str) -> PromptConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"fastlora: {where}: expected a JSON object, found {type(raw).__name__}")
    kind = raw.get("peft_type")
    if raw.get("num_transformer_submodules", 1) not in (1, None):
        raise ValueError(
            f"fastlora: {where}: num_transformer_submodules must be 1 (encoder-decoder prompts unsupported)"
        )
    common = {
        "num_virtual_tokens": raw.get("num_virtual_tokens"),
        "modules_to_save": raw.get("modules_to_save"),
        "task_type": raw.get("task_type"),
    }
    try:
        if kind == "PROMPT_TUNING":
            return PromptTuningConfig(**common)  # the init is irrelevant: the values are loaded
        if kind == "P_TUNING":
            encoder = str(raw.get("encoder_reparameterization_type", "MLP")).lower()
            return PTuningConfig(
                **common,
                encoder=encoder,
                encoder_hidden_size=raw.get("encoder_hidden_size"),
                encoder_num_layers=raw.get("encoder_num_layers", 2),
                encoder_dropout=raw.get("encoder_dropout", 0.0),
            )
        if kind == "PREFIX_TUNING":
            return PrefixTuningConfig(
                **common,
                prefix_projection=bool(raw.get("prefix_projection", False)),
                encoder_hidden_size=raw.get("encoder_hidden_size"),
            )
    except (TypeError, ValueError) as e:
        raise ValueError(f"fastlora: {where}: {e}") from e
    raise ValueError(f"fastlora: {where}: peft_type must be PROMPT_TUNING, P_TUNING or PREFIX_TUNING, found {kind!r}")


def _read_prompt_files(directory: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return read_files(directory, what="prompt")


def _check_dims(raw: dict[str, Any], config: PromptConfig, model: nn.Module, dims: _Dims, where: str) -> None:
    prefix = isinstance(config, PrefixTuningConfig)
    expected = {
        "token_dim": dims.kv_dim if prefix else dims.hidden,
        "num_layers": dims.num_layers,
        "num_attention_heads": dims.kv_heads if prefix else dims.heads,
    }
    for field, value in expected.items():
        if raw.get(field) is not None and raw[field] != value:
            what = {"token_dim": "kv width (heads x head_dim)" if prefix else "hidden size"}.get(field, field)
            raise ValueError(f"fastlora: {where}: {field}={raw[field]} but {type(model).__name__} has {what} {value}")


def _load_encoder(config: PromptConfig, model: nn.Module, dims: _Dims, tensors: dict, where: str) -> nn.Module:
    """The prompt encoder the file describes (unfolded if it holds encoder weights), validated and filled."""
    n = config.num_virtual_tokens
    width = dims.num_layers * 2 * dims.kv_dim if isinstance(config, PrefixTuningConfig) else dims.hidden
    values = tensors.get(PROMPT_KEY)
    if values is None:
        raise ValueError(f"fastlora: {where}: missing {PROMPT_KEY!r} (found {sorted(tensors)[:4]})")
    if tuple(values.shape) != (n, width):
        raise ValueError(
            f"fastlora: {where}: {PROMPT_KEY} has shape {tuple(values.shape)}, {config.peft_type} with "
            f"{n} virtual tokens on {type(model).__name__} needs {(n, width)}"
        )
    own = {k.removeprefix(ENCODER_PREFIX): v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)}
    if own:
        encoder = _build_encoder(config, model, dims, initialise=False)
        if isinstance(encoder, PromptEmbedding):
            raise ValueError(
                f"fastlora: {where}: {config.peft_type} without projection has no encoder weights, "
                f"found {ENCODER_PREFIX}{next(iter(own))}"
            )
    else:  # peft's file, or a folded one: the values are the prompt
        encoder, own = PromptEmbedding(n, width), {"embedding.weight": values}
    state = encoder.state_dict()
    if own.keys() != state.keys():
        extra, missing = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        raise ValueError(
            f"fastlora: {where}: encoder weights differ from the config's encoder: unexpected "
            f"{extra}, missing {missing}"
        )
    for key, value in own.items():
        if value.shape != state[key].shape:
            raise ValueError(
                f"fastlora: {where}: {ENCODER_PREFIX}{key} has shape {tuple(value.shape)}, the "
                f"config's encoder needs {tuple(state[key].shape)}"
            )
    encoder.load_state_dict(own)
    return encoder.to(model.get_input_embeddings().weight.device)


def load_prompt(model: nn.Module, directory: str, is_trainable: bool = False) -> PromptModel:
    """A host plus the prompt saved in ``directory`` (by :meth:`PromptModel.save_adapter` or by peft:
    PROMPT_TUNING, P_TUNING, PREFIX_TUNING). A file holding only ``prompt_embeddings`` (peft's, or a
    folded one) gives a folded model. Every check runs before the host is touched: on any error the
    host is unchanged. ``is_trainable=False`` freezes the prompt and heads (inference)."""
    raw, tensors = _read_prompt_files(directory)
    where = os.path.join(directory, CONFIG_NAME)
    config = _config_from_peft(raw, where)
    if config.modules_to_save:  # peft lists both "classifier" and "score" for SEQ_CLS: keep those present
        present = [
            n for n in config.modules_to_save if any(p == n or p.endswith("." + n) for p, _ in model.named_modules())
        ]
        config = dataclasses.replace(config, modules_to_save=sorted(set(present)))
    config = dataclasses.replace(config, modules_to_save=config.modules_to_save or [])  # no implicit heads
    dims = _host_dims(model)
    _check_dims(raw, config, model, dims, where)
    weights = os.path.join(directory, WEIGHTS_NAME)
    encoder = _load_encoder(config, model, dims, tensors, weights)
    heads = {p: m for p, m in _head_modules(model, config.modules_to_save)}
    expected = {f"{HEAD_PREFIX}{p}.{k}": v for p, m in heads.items() for k, v in m.state_dict().items()}
    for key, value in tensors.items():
        if key == PROMPT_KEY or key.startswith(ENCODER_PREFIX):
            continue
        if key not in expected:
            raise ValueError(
                f"fastlora: {weights}: key {key!r} has no place in {type(model).__name__} "
                f"(modules_to_save {config.modules_to_save})"
            )
        if value.shape != expected[key].shape:
            raise ValueError(
                f"fastlora: {weights}: {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"fastlora: {weights}: missing {missing[0]!r} (and {len(missing) - 1} more)")
    prompt = PromptModel(model, config, _encoder=encoder)
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(tensors[key])
    if not is_trainable:
        prompt.prompt_encoder.requires_grad_(False)
        for path in prompt.head_paths:
            model.get_submodule(path).requires_grad_(False)
    return prompt


__all__ = ["load_prompt", "peft_config_dict", "save_prompt"]
