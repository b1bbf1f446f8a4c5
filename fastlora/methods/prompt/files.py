"""A saved prompt in peft's layout: the names in ``adapter_model.safetensors``, the fields of
``adapter_config.json`` both ways, and reading a directory back (checked against the host before it is touched).

Files hold ``prompt_embeddings`` (the prompt as the host sees it, peft's key), plus the encoder's own
parameters as ``prompt_encoder.<name>`` while a P-tuning / projected-prefix encoder is not folded, plus
trained heads as ``base_model.<head path>.<name>``. peft reads ``prompt_embeddings``; fastlora reads both.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from fastlora.methods.files import CONFIG_NAME, read_saved
from fastlora.methods.prompt.config import PrefixTuningConfig, PromptConfig, PromptTuningConfig, PTuningConfig
from fastlora.methods.prompt.encoders import PromptEmbedding, build_encoder
from fastlora.methods.prompt.host import HostDims
from fastlora.methods.targets import present
from fastlora.methods.tensors import copy_checked

PROMPT_KEY = "prompt_embeddings"
ENCODER_PREFIX = "prompt_encoder."
HEAD_PREFIX = "base_model."  # peft's prefix for modules_to_save of prompt-learning models


def peft_dict(config: PromptConfig, dims: HostDims, *, task_type: str, head_paths: list[str],
              name_or_path: str | None) -> dict[str, Any]:  # fmt: skip
    """The adapter_config.json content of a prompt (peft's fields for its method)."""
    prefix = isinstance(config, PrefixTuningConfig)
    token_dim, heads = (dims.kv_dim, dims.kv_heads) if prefix else (dims.hidden, dims.heads)
    out: dict[str, Any] = {
        "peft_type": config.peft_type,
        "task_type": task_type,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": dims.num_layers,
        "modules_to_save": [p.rpartition(".")[2] for p in head_paths] or None,
        "inference_mode": True,
        "base_model_name_or_path": name_or_path or None,
        "revision": None,
    }
    if isinstance(config, PromptTuningConfig):
        init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[config.init]
        out.update(
            prompt_tuning_init=init,
            prompt_tuning_init_text=config.init_text,
            tokenizer_name_or_path=config.tokenizer_path,
            tokenizer_kwargs=None,
        )
    elif isinstance(config, PTuningConfig):
        out.update(
            encoder_reparameterization_type=config.encoder.upper(),
            encoder_hidden_size=config.encoder_hidden_size or dims.hidden,
            encoder_num_layers=config.encoder_num_layers,
            encoder_dropout=config.encoder_dropout,
        )
    else:
        out.update(
            prefix_projection=config.prefix_projection, encoder_hidden_size=config.encoder_hidden_size or dims.kv_dim
        )
    return out


def config_from_peft(raw: Any, where: str) -> PromptConfig:
    """The config of a peft PROMPT_TUNING / P_TUNING / PREFIX_TUNING adapter_config.json (a ValueError
    naming ``where`` otherwise)."""
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


def read_prompt(
    directory: str, model: nn.Module
) -> tuple[dict[str, Any], PromptConfig, dict[str, torch.Tensor], dict[str, Any] | None]:
    """The raw adapter_config.json, the config, the tensors of a saved prompt and the integrity record
    beside them (None: none, e.g. peft's; not verified yet, see :func:`fastlora.methods.files.read_saved`).
    ``modules_to_save`` keeps the heads ``model`` has (peft lists both ``classifier`` and ``score`` for
    SEQ_CLS), [] if none: a loaded prompt never trains heads implicitly."""
    raw, tensors, record = read_saved(directory, what="prompt")
    config = config_from_peft(raw, os.path.join(directory, CONFIG_NAME))
    heads = sorted(set(present(model, config.modules_to_save))) if config.modules_to_save else []
    return raw, dataclasses.replace(config, modules_to_save=heads), tensors, record


def check_dims(raw: dict[str, Any], config: PromptConfig, model: nn.Module, dims: HostDims, where: str) -> None:
    """The saved token_dim / num_layers / num_attention_heads against the host's (a ValueError naming both)."""
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


def load_encoder(config: PromptConfig, model: nn.Module, dims: HostDims, tensors: dict, where: str) -> nn.Module:
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
    own = {k: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)}
    if own:
        encoder = build_encoder(config, model, dims, initialise=False)
        if isinstance(encoder, PromptEmbedding):
            raise ValueError(
                f"fastlora: {where}: {config.peft_type} without projection has no encoder weights, "
                f"found {next(iter(own))}"
            )
    else:  # peft's file, or a folded one: the values are the prompt
        encoder, own = PromptEmbedding(n, width), {ENCODER_PREFIX + "embedding.weight": values}
    targets = {ENCODER_PREFIX + k: v for k, v in encoder.state_dict().items()}
    copy_checked(targets, own, f"{where}: encoder weights differ from the config's encoder",
                 owner="the config's encoder")  # fmt: skip
    return encoder.to(model.get_input_embeddings().weight.device)


def head_targets(heads: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """File name -> tensor (a state-dict view) of every head trained beside the prompt."""
    return {f"{HEAD_PREFIX}{p}.{k}": v for p, m in heads for k, v in m.state_dict().items()}


def head_entries(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a saved prompt file that are neither the prompt nor its encoder (heads, or strays)."""
    return {k: v for k, v in tensors.items() if k != PROMPT_KEY and not k.startswith(ENCODER_PREFIX)}
