"""What the prompt methods read off the host: its dimensions, how it takes a KV cache, its task and heads."""

from __future__ import annotations

import dataclasses
import inspect

from torch import nn

from fastlora.methods.prompt.config import TASKS
from fastlora.methods.targets import classifier_heads, select_each


@dataclasses.dataclass(frozen=True)
class HostDims:
    """What the prompt methods need to know of a host: widths, layers, heads, the position limit."""

    hidden: int
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int | None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def host_dims(model: nn.Module) -> HostDims:
    """The :class:`HostDims` of a Hugging Face model (its text config for a multimodal one); a TypeError
    if it lacks the fields or an ``nn.Embedding`` input embedding."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        hidden, layers, heads = text.hidden_size, text.num_hidden_layers, text.num_attention_heads
    except AttributeError as e:
        raise TypeError(
            f"fastlora: prompt methods need a Hugging Face model whose .config has hidden_size, num_hidden_layers "
            f"and num_attention_heads; {type(model).__name__} has config {type(config).__name__}"
        ) from e
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding) or embeddings.embedding_dim != hidden:
        raise TypeError(
            f"fastlora: {type(model).__name__}.get_input_embeddings() must be an nn.Embedding of width {hidden}"
        )
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return HostDims(hidden, layers, heads, kv_heads, head_dim, getattr(text, "max_position_embeddings", None))


def cache_kwarg(model: nn.Module) -> str | None:
    """The name under which ``model`` (or its backbone) takes a KV cache: ``cache`` in transformers 5.24,
    ``past_key_values`` before; None if it takes none."""
    for module in (model, getattr(model, "base_model", model)):
        params = inspect.signature(module.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    return None


def head_modules(model: nn.Module, names: list[str] | None) -> list[tuple[str, nn.Module]]:
    """(path, module) of the heads trained in place beside the prompt: ``names`` (names or dotted suffixes,
    outermost matches), or with None the host's ``classifier`` / ``score`` child (peft's SEQ_CLS rule)."""
    if names is None:
        return [(n, getattr(model, n)) for n in classifier_heads(model)]
    named = [(p, m) for p, m in model.named_modules() if p]
    found = select_each(named, names, model, note=f" (children: {[n for n, _ in model.named_children()]})")
    return [(p, m) for p, m in found if not any(p.startswith(q + ".") for q, _ in found)]


def task_type_of(model: nn.Module) -> str:
    """peft's task name for the host's class (``FEATURE_EXTRACTION`` for a bare encoder)."""
    name = type(model).__name__
    return next((task for suffix, task in TASKS.items() if name.endswith(suffix)), "FEATURE_EXTRACTION")
