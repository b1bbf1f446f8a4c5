"""PromptModel: a frozen host plus a trained prompt: the forward and generate that feed it to the host (virtual
embeddings or a KV-cache prefix), folding, save and load."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastlora.methods.files import CONFIG_NAME, WEIGHTS_NAME, write_files
from fastlora.methods.fingerprint import base_fingerprint, check_integrity, host_weights
from fastlora.methods.prompt.config import PrefixTuningConfig, PromptConfig, PromptTuningConfig, PTuningConfig
from fastlora.methods.prompt.encoders import PromptEmbedding, build_encoder, inference_values
from fastlora.methods.prompt.files import (
    ENCODER_PREFIX,
    PROMPT_KEY,
    check_dims,
    head_entries,
    head_targets,
    load_encoder,
    peft_dict,
    read_prompt,
)
from fastlora.methods.prompt.host import cache_kwarg, head_modules, host_dims, task_type_of
from fastlora.methods.prompt.inputs import (
    check_length,
    extend_mask,
    fill_prefix_cache,
    refuse_checkpointing,
    shift_positions,
)
from fastlora.methods.tensors import check_tensors, copy_checked
from fastlora.methods.wrapper import WrappedModel


class PromptModel(WrappedModel):
    """A frozen host plus a trained prompt (``prompt_encoder``); see :mod:`fastlora.methods.prompt` for the
    mechanics.

    The host stays reachable as ``.model``; unknown attributes (``config``, ``device``...) are forwarded
    to it. Only the prompt encoder and the ``modules_to_save`` heads (trained in place) require grad.
    Implements :class:`~fastlora.methods.base.Method`; ``peft_config`` (one config) is its ``method_config``.
    """

    def __init__(self, model: nn.Module, config: PromptConfig, *, _encoder: nn.Module | None = None) -> None:
        super().__init__()
        if isinstance(model, PromptModel):
            raise TypeError("fastlora: the model already carries a prompt (PromptModel); use a fresh host")
        if not isinstance(config, (PromptTuningConfig, PTuningConfig, PrefixTuningConfig)):
            raise TypeError(
                f"fastlora: config must be a PromptTuningConfig, PTuningConfig or PrefixTuningConfig, "
                f"got {type(config).__name__}"
            )
        dims = host_dims(model)
        kwarg = cache_kwarg(model)
        if isinstance(config, PrefixTuningConfig) and kwarg is None:
            raise TypeError(
                f"fastlora: prefix tuning needs a host that takes a KV cache; {type(model).__name__} doesn't"
            )
        if dims.max_positions is not None and config.num_virtual_tokens >= dims.max_positions:
            raise ValueError(
                f"fastlora: num_virtual_tokens={config.num_virtual_tokens} leaves no room for input in "
                f"{type(model).__name__}'s max_position_embeddings={dims.max_positions}"
            )
        heads = head_modules(model, config.modules_to_save)
        encoder = _encoder if _encoder is not None else build_encoder(config, model, dims)
        self.model = model
        self.prompt_encoder = encoder.train(model.training)  # the host's train/eval mode (encoder dropout)
        self.training = model.training
        self.peft_config = config
        self.dims = dims
        self.cache_kwarg = kwarg
        self.disabled = False  # True: the host alone (see disable())
        self.head_paths = [p for p, _ in heads]
        self.task_type = config.task_type or task_type_of(model)
        model.requires_grad_(False)
        for _, head in heads:
            head.requires_grad_(True)

    @property
    def num_virtual_tokens(self) -> int:
        return self.peft_config.num_virtual_tokens

    @property
    def is_prefix(self) -> bool:
        return isinstance(self.peft_config, PrefixTuningConfig)

    @property
    def folded(self) -> bool:
        return isinstance(self.prompt_encoder, PromptEmbedding)

    @property
    def method_config(self) -> PromptConfig:
        return self.peft_config

    @property
    def modules_to_save(self) -> list[str]:
        """Paths of the heads trained in place beside the prompt."""
        return list(self.head_paths)

    def disable(self) -> contextlib.AbstractContextManager[None]:
        """Within the block forward and generate are the host's own (no prompt, no prefix). Heads trained
        in place stay as trained: a prompt model keeps no original copy of them."""
        return self._disabled([self])

    def fold(self) -> PromptModel:
        """Replace a P-tuning / projected-prefix encoder by the plain values it produces (computed once,
        in eval mode); outputs are unchanged and the encoder's parameters are gone. No-op if already plain."""
        if not self.folded:
            trainable = any(p.requires_grad for p in self.prompt_encoder.parameters())
            plain = PromptEmbedding.from_values(inference_values(self.prompt_encoder))
            self.prompt_encoder = plain.requires_grad_(trainable).train(self.training)
        return self

    # -- what the host sees --------------------------------------------------------------------------

    def prompt_values(self) -> torch.Tensor:
        """(n, hidden) virtual-token embeddings, or (n, num_layers * 2 * kv_dim) flat prefix, float32."""
        return self.prompt_encoder()

    def prefix_cache(self, batch_size: int, cache=None):
        """A transformers ``DynamicCache`` holding the prefix: per layer keys and values of shape
        (batch_size, num_kv_heads, n, head_dim) in the host's dtype; fills ``cache`` if given (empty)."""
        flat = self.prompt_values().to(self.model.get_input_embeddings().weight.dtype)
        return fill_prefix_cache(flat, self.dims, batch_size, self.model.config, cache)

    def _check_length(self, total: int) -> None:
        check_length(self.model, self.num_virtual_tokens, total, self.dims.max_positions)

    def _extend_mask(self, mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
        return extend_mask(mask, self.num_virtual_tokens, batch, length, prefix=self.is_prefix, device=self.device)

    def forward(
        self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, token_type_ids=None, **kwargs
    ):
        """The host's forward with the prompt added; arguments and outputs are the host's.

        input_ids (batch, seq) int64 or inputs_embeds (batch, seq, hidden); attention_mask (batch, seq)
        2-D; labels: token-level (batch, seq) get n leading -100 (prompt / P-tuning), sequence-level
        ones (task SEQ_CLS) pass unchanged. A KV cache (``cache`` / ``past_key_values``) already
        holding the prompt continues a decode: the mask then covers the real tokens only (past + new)
        and gets n leading ones.
        Sequence outputs of prompt / P-tuning hosts include the n virtual positions first.
        """
        if self.disabled:
            host = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                    "inputs_embeds": inputs_embeds, "token_type_ids": token_type_ids}  # fmt: skip
            return self.model(**{k: v for k, v in host.items() if v is not None}, **kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("fastlora: pass exactly one of input_ids or inputs_embeds")
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        cache = kwargs.pop("cache", None)
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        past = cache.get_seq_length() if cache is not None else 0
        n = self.num_virtual_tokens
        if past and past < n:
            raise ValueError(f"fastlora: the cache holds {past} positions, fewer than the {n} virtual tokens")
        self._check_length(max(past, n) + length)
        real = past - n if past else 0  # real tokens already in the cache
        attention_mask = self._extend_mask(attention_mask, batch, real + length)
        if kwargs.get("position_ids") is not None:
            prepend = not past and not self.is_prefix  # the virtual tokens themselves sit at 0..n-1
            kwargs["position_ids"] = shift_positions(kwargs["position_ids"], n, prepend=prepend)
        host = {"attention_mask": attention_mask, "labels": labels, "token_type_ids": token_type_ids}
        if self.is_prefix:
            if not past:
                refuse_checkpointing(self.model, self.training)
                cache = self.prefix_cache(batch, cache)
            host.update(input_ids=input_ids, inputs_embeds=inputs_embeds)
        elif past:
            host.update(input_ids=input_ids, inputs_embeds=inputs_embeds)
        else:
            if inputs_embeds is None:
                inputs_embeds = self.model.get_input_embeddings()(input_ids)
            prompts = self.prompt_values().to(inputs_embeds.dtype)
            host["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), inputs_embeds], 1)
            if labels is not None and labels.dim() >= 2 and labels.shape[1] == length and self.task_type != "SEQ_CLS":
                host["labels"] = torch.cat([labels.new_full((batch, n, *labels.shape[2:]), -100), labels], 1)
            if token_type_ids is not None:
                host["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch, n), token_type_ids], 1)
        if cache is not None:
            host[self.cache_kwarg] = cache
        return self.model(**{k: v for k, v in host.items() if v is not None}, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        """The host's ``generate`` with the prompt: virtual embeddings (given to the first step as
        ``inputs_embeds``) or the prefix cache. Returns what the host returns: with input_ids, the input
        followed by the new tokens. Prefix tuning takes input_ids only."""
        if not hasattr(self.model, "generate"):
            raise TypeError(f"fastlora: {type(self.model).__name__} has no generate()")
        if self.disabled:
            host = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds}
            return self.model.generate(**{k: v for k, v in host.items() if v is not None}, **kwargs)
        if input_ids is None and inputs_embeds is None:
            raise ValueError("fastlora: generate needs input_ids or inputs_embeds")
        if self.is_prefix and inputs_embeds is not None:
            raise ValueError("fastlora: generate with prefix tuning takes input_ids, not inputs_embeds")
        batch, length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[:2]
        self._check_length(self.num_virtual_tokens + length)
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=self.device)
        mask = self._extend_mask(attention_mask, batch, length)
        if any(kwargs.get(k) is not None for k in ("cache", "past_key_values")):
            raise ValueError("fastlora: generate builds its own cache for the prompt; don't pass one")
        if self.is_prefix:
            config = kwargs.get("generation_config") or self.model.generation_config
            beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
            sequences = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
            cache = self.prefix_cache(batch * max(beams, sequences))  # generate expands inputs, not caches
            return self.model.generate(input_ids=input_ids, attention_mask=mask, **{self.cache_kwarg: cache}, **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.model.get_input_embeddings()(input_ids)
        prompts = self.prompt_values().to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        embeds = torch.cat([prompts, inputs_embeds], 1)
        return self.model.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask, **kwargs)

    # -- save / load ----------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What :meth:`save` writes: ``prompt_embeddings`` (n, dim, the encoder's output in eval
        mode), the encoder's parameters as
        ``prompt_encoder.<name>`` while not folded, and ``base_model.<head path>.<name>`` for heads."""
        out = {PROMPT_KEY: inference_values(self.prompt_encoder)}
        if not self.folded:
            out.update({ENCODER_PREFIX + k: v for k, v in self.prompt_encoder.state_dict().items()})
        out.update(head_targets([(p, self.model.get_submodule(p)) for p in self.head_paths]))
        return out

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json content (peft's fields for this method)."""
        name = getattr(self.model.config, "_name_or_path", None)
        return peft_dict(self.peft_config, self.dims, task_type=self.task_type, head_paths=self.head_paths,
                         name_or_path=name)  # fmt: skip

    def save(self, directory: str, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the trained prompt (:meth:`adapter_state_dict`, or ``tensors``) and adapter_config.json,
        each file atomically; peft loads the result (it reads ``prompt_embeddings``). Beside them the
        weights' sha256 and a fingerprint of the host's weights outside the heads (fastlora_integrity.json)."""
        heads = [self.model.get_submodule(p) for p in self.head_paths]
        write_files(directory, self.to_peft_dict(), self.adapter_state_dict() if tensors is None else tensors,
                    base_fingerprint=base_fingerprint(host_weights(self.model, heads)))  # fmt: skip

    def save_adapter(self, directory: str) -> None:
        """peft's name for :meth:`save`."""
        self.save(directory)

    @classmethod
    def load(
        cls, model: nn.Module, directory: str, *, is_trainable: bool = False, allow_base_mismatch: bool = False
    ) -> PromptModel:
        """A host plus the prompt saved in ``directory`` (by :meth:`save` or by peft: PROMPT_TUNING,
        P_TUNING, PREFIX_TUNING). A file holding only ``prompt_embeddings`` (peft's, or a folded one) gives a
        folded model. Every check runs before the host is touched: on any error the host is unchanged.
        ``is_trainable=False`` freezes the prompt and heads (inference). A tensor file whose sha256 differs
        from the recorded one is an error, and so is a host whose weights do not match the recorded base
        fingerprint unless ``allow_base_mismatch=True`` (then a warning)."""
        raw, config, tensors, record = read_prompt(directory, model)
        dims = host_dims(model)
        check_dims(raw, config, model, dims, os.path.join(directory, CONFIG_NAME))
        weights = os.path.join(directory, WEIGHTS_NAME)
        encoder = load_encoder(config, model, dims, tensors, weights)
        heads = head_modules(model, config.modules_to_save)
        targets, saved = head_targets(heads), head_entries(tensors)
        unknown = f"key {{key!r}} has no place in {type(model).__name__} (modules_to_save {config.modules_to_save})"
        check_tensors(targets, saved, weights, unknown=unknown)
        check_integrity(directory, record, host_weights(model, [m for _, m in heads]),
                        allow_base_mismatch=allow_base_mismatch)  # fmt: skip
        prompt = cls(model, config, _encoder=encoder)
        copy_checked(targets, saved, weights, unknown=unknown)
        if not is_trainable:
            prompt.prompt_encoder.requires_grad_(False)
            for path in prompt.head_paths:
                model.get_submodule(path).requires_grad_(False)
        return prompt


def inject_prompt(model: nn.Module, config: PromptConfig) -> PromptModel:
    """Freeze ``model`` and give it a trainable prompt of the kind ``config`` describes."""
    return PromptModel(model, config)


def load_prompt(
    model: nn.Module, directory: str, is_trainable: bool = False, *, allow_base_mismatch: bool = False
) -> PromptModel:
    """A host plus the prompt saved in ``directory`` (by fastlora or peft): :meth:`PromptModel.load`."""
    return PromptModel.load(model, directory, is_trainable=is_trainable, allow_base_mismatch=allow_base_mismatch)
