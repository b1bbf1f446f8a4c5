"""Prompt tuning, P-tuning and prefix tuning (P-tuning v2) on a frozen Hugging Face model.

model = inject_prompt(host, PromptTuningConfig(20, init="text", init_text="Classify:", tokenizer_path=path))
...train: only the prompt (and the head of a *ForSequenceClassification host, as peft does) trains...
model.save_adapter("out/")          # peft's layout: adapter_config.json + adapter_model.safetensors
model = load_prompt(host, "out/")   # or peft.PeftModel.from_pretrained(host, "out/")

How each method reaches the host (which is never modified, only frozen):
- Prompt tuning and P-tuning prepend n virtual-token embeddings (batch, n, hidden) to the input
  embeddings. The attention mask gets n leading ones, token-level labels n leading -100, token_type_ids
  n leading zeros; the virtual tokens sit at positions 0..n-1 and explicit position_ids move up by n.
- Prefix tuning hands per-layer key/value prefixes (batch, num_kv_heads, n, head_dim) to the host as
  an already filled transformers ``DynamicCache`` and extends the attention mask by n ones. The host's
  positions continue after the cache, so the real tokens sit at positions n.. (Llama's rotary
  positions; BERT's learned positions, as in P-tuning v2 and peft). BERT (transformers 5.24) takes the
  cache through ``BertModel.forward(cache=...)`` and writes its own keys after the prefix; a KV cache is
  the one interface every transformers attention layer shares, so no attention module is patched.

Prompt values are kept in float32 and cast to the host's dtype where they enter it. The saved file
always holds ``prompt_embeddings`` (the prompt as the host sees it, peft's key), plus the encoder's
own parameters while a P-tuning / projected-prefix encoder is not folded, plus trained heads.
Saving and loading (files, peft's adapter_config.json fields, validation of saved directories) live in
:mod:`fastlora.strategies.prompt_io`; ``load_prompt`` stays importable from here.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import torch
from torch import nn

from fastlora.adapters.wrapper import WrappedModel

PROMPT_KEY = "prompt_embeddings"
ENCODER_PREFIX = "prompt_encoder."
HEAD_PREFIX = "base_model."  # peft's prefix for modules_to_save of prompt-learning models
_HEAD_NAMES = ("classifier", "score")  # trained beside the prompt by default, like peft's SEQ_CLS
_TASKS = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}
_TASK_TYPES = (*_TASKS.values(), "FEATURE_EXTRACTION")


# -- configs -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _PromptConfig:
    """Fields shared by the three methods. ``modules_to_save``: host modules trained in full beside the
    prompt (names or name suffixes); None means the host's ``classifier`` / ``score`` if it has one
    (peft's rule for sequence classification), [] means none. ``task_type``: peft's task name written
    to adapter_config.json; None infers it from the host's class."""

    num_virtual_tokens: int
    _: dataclasses.KW_ONLY
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    peft_type = ""

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"fastlora: {type(self).__name__}: num_virtual_tokens must be a positive int, got {n!r}")
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, (list, tuple)):
            raise ValueError(f"fastlora: {type(self).__name__}: modules_to_save must be a list of names or None")
        if self.task_type is not None and self.task_type not in _TASK_TYPES:
            raise ValueError(
                f"fastlora: {type(self).__name__}: task_type must be one of {_TASK_TYPES}, got {self.task_type!r}"
            )


@dataclasses.dataclass
class PromptTuningConfig(_PromptConfig):
    """Prompt tuning (Lester et al. 2021): n trainable input embeddings.

    init: "random" (normal, with the standard deviation of the host's word embeddings), "vocab"
    (embeddings of n random vocabulary tokens) or "text" (embeddings of ``init_text`` tokenised by the
    tokenizer at ``tokenizer_path``, special tokens included as peft does, repeated / truncated to n).
    """

    init: str = "random"
    init_text: str | None = None
    tokenizer_path: str | None = None

    peft_type = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tokenizer_path, os.PathLike):
            self.tokenizer_path = os.fspath(self.tokenizer_path)  # it is written to adapter_config.json
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(
                f"fastlora: PromptTuningConfig: init must be 'random', 'vocab' or 'text', got {self.init!r}"
            )
        if self.init == "text" and not (self.init_text and self.tokenizer_path):
            raise ValueError(
                "fastlora: PromptTuningConfig: init='text' needs a non-empty init_text and a tokenizer_path"
            )


@dataclasses.dataclass
class PTuningConfig(_PromptConfig):
    """P-tuning (Liu et al. 2021): the n virtual-token embeddings come out of a trained prompt encoder,
    ``encoder="mlp"`` (3 linear layers) or ``"lstm"`` (bidirectional LSTM + 2-layer MLP), peft's
    PromptEncoder layout. ``encoder_hidden_size`` defaults to the host's hidden size; ``encoder_num_layers``
    and ``encoder_dropout`` apply to the LSTM. :meth:`PromptModel.fold` drops the encoder after training.
    """

    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    peft_type = "P_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder not in ("mlp", "lstm"):
            raise ValueError(f"fastlora: PTuningConfig: encoder must be 'mlp' or 'lstm', got {self.encoder!r}")
        _check_positive("PTuningConfig", "encoder_hidden_size", self.encoder_hidden_size, optional=True)
        _check_positive("PTuningConfig", "encoder_num_layers", self.encoder_num_layers)
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(
                f"fastlora: PTuningConfig: encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}"
            )


@dataclasses.dataclass
class PrefixTuningConfig(_PromptConfig):
    """Prefix tuning (Li & Liang 2021) / P-tuning v2: trainable keys and values prepended at every
    attention layer. With ``prefix_projection`` they come out of an MLP (embedding of size kv_dim ->
    ``encoder_hidden_size`` -> tanh -> num_layers * 2 * kv_dim) that :meth:`PromptModel.fold` drops.

    init: "vocab" (default without projection): the keys and values the host itself computes for n
    random vocabulary tokens (real-word activations, which Li & Liang found train better); "random":
    peft's init (standard normal values, or the MLP's default init with projection).
    Not usable with gradient checkpointing (transformers drops the cache inside checkpointed layers).
    """

    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init: str | None = None

    peft_type = "PREFIX_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size, optional=True)
        if self.init is None:
            self.init = "random" if self.prefix_projection else "vocab"
        if self.init not in ("vocab", "random"):
            raise ValueError(f"fastlora: PrefixTuningConfig: init must be 'vocab' or 'random', got {self.init!r}")
        if self.init == "vocab" and self.prefix_projection:
            raise ValueError(
                "fastlora: PrefixTuningConfig: init='vocab' sets the prefix itself; with prefix_projection use 'random'"
            )


def _check_positive(owner: str, name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"fastlora: {owner}: {name} must be a positive int, got {value!r}")


PromptConfig = PromptTuningConfig | PTuningConfig | PrefixTuningConfig


# -- the host's shape ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Dims:
    hidden: int
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int | None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _host_dims(model: nn.Module) -> _Dims:
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
    return _Dims(hidden, layers, heads, kv_heads, head_dim, getattr(text, "max_position_embeddings", None))


def _cache_kwarg(model: nn.Module) -> str | None:
    """The name under which ``model`` (or its backbone) takes a KV cache: ``cache`` in transformers 5.24,
    ``past_key_values`` before; None if it takes none."""
    for module in (model, getattr(model, "base_model", model)):
        params = inspect.signature(module.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    return None


def _head_modules(model: nn.Module, names: list[str] | None) -> list[tuple[str, nn.Module]]:
    if names is None:
        return [(n, m) for n, m in model.named_children() if n in _HEAD_NAMES]
    found = [(p, m) for p, m in model.named_modules() if p and any(p == t or p.endswith("." + t) for t in names)]
    found = [(p, m) for p, m in found if not any(p.startswith(q + ".") for q, _ in found)]
    missing = [t for t in names if not any(p == t or p.endswith("." + t) for p, _ in found)]
    if missing:
        children = [n for n, _ in model.named_children()]
        raise ValueError(
            f"fastlora: modules_to_save {missing} matched no module of {type(model).__name__} (children: {children})"
        )
    return found


def _task_type(model: nn.Module) -> str:
    name = type(model).__name__
    return next((task for suffix, task in _TASKS.items() if name.endswith(suffix)), "FEATURE_EXTRACTION")


# -- prompt encoders: forward() -> (n, out_dim) float32 ------------------------------------------


class PromptEmbedding(nn.Module):
    """Plain virtual-token values: ``embedding.weight`` (n, dim) is the prompt (or the flat prefix)."""

    def __init__(self, num_virtual_tokens: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, dim)

    @classmethod
    def from_values(cls, values: torch.Tensor) -> PromptEmbedding:
        module = cls(*values.shape).to(values.device)
        with torch.no_grad():
            module.embedding.weight.copy_(values)
        return module

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning's encoder, parameter for parameter peft's PromptEncoder: ``embedding`` (n, hidden) ->
    MLP (hidden -> h -> h -> hidden, ReLU) or bi-LSTM (h per direction) -> MLP (2h -> 2h -> hidden)."""

    def __init__(self, config: PTuningConfig, hidden: int) -> None:
        super().__init__()
        h = config.encoder_hidden_size or hidden
        self.kind = config.encoder
        self.embedding = nn.Embedding(config.num_virtual_tokens, hidden)
        if self.kind == "lstm":
            self.lstm_head = nn.LSTM(
                hidden,
                h,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, hidden))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(hidden, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, hidden)
            )

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # (1, n, hidden), as peft runs it
        if self.kind == "lstm":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


class PrefixEncoder(nn.Module):
    """Prefix tuning with projection, peft's PrefixEncoder layout: ``embedding`` (n, kv_dim) ->
    ``transform`` (kv_dim -> h -> tanh -> num_layers * 2 * kv_dim)."""

    def __init__(self, config: PrefixTuningConfig, dims: _Dims) -> None:
        super().__init__()
        h = config.encoder_hidden_size or dims.kv_dim
        self.embedding = nn.Embedding(config.num_virtual_tokens, dims.kv_dim)
        self.transform = nn.Sequential(
            nn.Linear(dims.kv_dim, h), nn.Tanh(), nn.Linear(h, dims.num_layers * 2 * dims.kv_dim)
        )

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


@torch.no_grad()
def _inference_values(encoder: nn.Module) -> torch.Tensor:
    """The encoder's output in eval mode (no dropout), detached; the encoder's own mode is kept."""
    training = encoder.training
    try:
        return encoder.eval()().detach().clone()
    finally:
        encoder.train(training)


def _initial_prompt(config: PromptTuningConfig, model: nn.Module, vocab: int) -> torch.Tensor:
    """(n, hidden) float32 starting values of prompt tuning."""
    weight = model.get_input_embeddings().weight.detach()
    n = config.num_virtual_tokens
    if config.init == "random":
        return torch.randn(n, weight.shape[1], device=weight.device) * weight.float().std()
    if config.init == "vocab":
        ids = torch.randint(0, vocab, (n,), device=weight.device)
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path)
        except Exception as e:
            raise ValueError(f"fastlora: cannot load a tokenizer from {config.tokenizer_path!r} ({e})") from e
        ids = list(tokenizer(config.init_text)["input_ids"])
        if not ids:
            raise ValueError(f"fastlora: init_text {config.init_text!r} tokenises to no tokens")
        if max(ids) >= vocab:
            raise ValueError(
                f"fastlora: the tokenizer at {config.tokenizer_path} gives id {max(ids)}, vocab is {vocab}"
            )
        ids = torch.tensor((ids * -(-n // len(ids)))[:n], device=weight.device)
    return weight[ids].float().clone()


@torch.no_grad()
def prefix_from_tokens(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """The keys and values ``model`` computes for ``token_ids`` (n,) int64 at positions 0..n-1, in
    eval mode, flattened to a prefix: (n, num_layers * 2 * kv_dim) float32, peft's layout (layer-major,
    key then value, heads then head_dim). A prefix made of it acts exactly like those tokens in front
    of the input of a causal model."""
    dims, cache_kwarg = _host_dims(model), _cache_kwarg(model)
    if cache_kwarg is None:
        raise TypeError(f"fastlora: {type(model).__name__} takes no KV cache")
    from transformers import DynamicCache

    cache, training = DynamicCache(), model.training
    try:
        model.eval()(input_ids=token_ids.reshape(1, -1), use_cache=True, **{cache_kwarg: cache})
    finally:
        model.train(training)
    layers = getattr(cache, "layers", None) or []
    n = token_ids.numel()
    want = (1, dims.kv_heads, n, dims.head_dim)
    if len(layers) != dims.num_layers or any(tuple(layer.keys.shape) != want for layer in layers):
        raise ValueError(
            f"fastlora: {type(model).__name__} did not fill the KV cache with {dims.num_layers} layers of shape "
            f"{want}; use PrefixTuningConfig(init='random')"
        )
    kv = torch.stack([t[0] for layer in layers for t in (layer.keys, layer.values)])  # (2L, kv_heads, n, head_dim)
    return kv.permute(2, 0, 1, 3).reshape(n, -1).float()


def _build_encoder(config: PromptConfig, model: nn.Module, dims: _Dims, initialise: bool = True) -> nn.Module:
    if isinstance(config, PTuningConfig):
        encoder = PromptEncoder(config, dims.hidden)
    elif isinstance(config, PrefixTuningConfig):
        flat = dims.num_layers * 2 * dims.kv_dim
        if config.prefix_projection:
            encoder = PrefixEncoder(config, dims)
        else:
            encoder = PromptEmbedding(config.num_virtual_tokens, flat)
            if initialise and config.init == "vocab":
                vocab = model.get_input_embeddings().num_embeddings
                ids = torch.randint(
                    0, vocab, (config.num_virtual_tokens,), device=model.get_input_embeddings().weight.device
                )
                with torch.no_grad():
                    encoder.embedding.weight.copy_(prefix_from_tokens(model, ids))
    else:
        encoder = PromptEmbedding(config.num_virtual_tokens, dims.hidden)
        if initialise:
            vocab = model.get_input_embeddings().num_embeddings
            with torch.no_grad():
                encoder.embedding.weight.copy_(_initial_prompt(config, model, vocab))
    return encoder.to(model.get_input_embeddings().weight.device)


# -- the model -----------------------------------------------------------------------------------


class PromptModel(WrappedModel):
    """A frozen host plus a trained prompt (``prompt_encoder``); see the module docstring for the mechanics.

    The host stays reachable as ``.model``; unknown attributes (``config``, ``device``...) are forwarded
    to it. Only the prompt encoder and the ``modules_to_save`` heads (trained in place) require grad.
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
        dims = _host_dims(model)
        cache_kwarg = _cache_kwarg(model)
        if isinstance(config, PrefixTuningConfig) and cache_kwarg is None:
            raise TypeError(
                f"fastlora: prefix tuning needs a host that takes a KV cache; {type(model).__name__} doesn't"
            )
        if dims.max_positions is not None and config.num_virtual_tokens >= dims.max_positions:
            raise ValueError(
                f"fastlora: num_virtual_tokens={config.num_virtual_tokens} leaves no room for input in "
                f"{type(model).__name__}'s max_position_embeddings={dims.max_positions}"
            )
        heads = _head_modules(model, config.modules_to_save)
        encoder = _encoder if _encoder is not None else _build_encoder(config, model, dims)
        self.model = model
        self.prompt_encoder = encoder.train(model.training)  # the host's train/eval mode (encoder dropout)
        self.training = model.training
        self.peft_config = config
        self.dims = dims
        self.cache_kwarg = cache_kwarg
        self.head_paths = [p for p, _ in heads]
        self.task_type = config.task_type or _task_type(model)
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

    def fold(self) -> PromptModel:
        """Replace a P-tuning / projected-prefix encoder by the plain values it produces (computed once,
        in eval mode); outputs are unchanged and the encoder's parameters are gone. No-op if already plain."""
        if not self.folded:
            trainable = any(p.requires_grad for p in self.prompt_encoder.parameters())
            plain = PromptEmbedding.from_values(_inference_values(self.prompt_encoder))
            self.prompt_encoder = plain.requires_grad_(trainable).train(self.training)
        return self

    # -- what the host sees --------------------------------------------------------------------------

    def prompt_values(self) -> torch.Tensor:
        """(n, hidden) virtual-token embeddings, or (n, num_layers * 2 * kv_dim) flat prefix, float32."""
        return self.prompt_encoder()

    def _host_dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def prefix_cache(self, batch_size: int, cache=None):
        """A transformers ``DynamicCache`` holding the prefix: per layer keys and values of shape
        (batch_size, num_kv_heads, n, head_dim) in the host's dtype; fills ``cache`` if given (empty)."""
        from transformers import DynamicCache

        d, n = self.dims, self.num_virtual_tokens
        flat = self.prompt_values().to(self._host_dtype())  # peft's layout: layer-major, key then value
        per_layer = flat.view(n, d.num_layers * 2, d.kv_heads, d.head_dim).permute(1, 2, 0, 3)
        per_layer = per_layer.unsqueeze(1).expand(-1, batch_size, -1, -1, -1).contiguous()
        if cache is None:
            try:
                cache = DynamicCache(config=self.model.config)
            except (TypeError, ValueError, AttributeError):  # older transformers / exotic configs
                cache = DynamicCache()
        for layer in range(d.num_layers):
            cache.update(per_layer[2 * layer], per_layer[2 * layer + 1], layer)
        return cache

    def _check_length(self, total: int) -> None:
        limit = self.dims.max_positions
        if limit is not None and total > limit:
            raise ValueError(
                f"fastlora: {self.num_virtual_tokens} virtual tokens + {total - self.num_virtual_tokens} input "
                f"positions = {total} exceed {type(self.model).__name__}'s max_position_embeddings={limit}"
            )

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
            kwargs["position_ids"] = self._shift_positions(kwargs["position_ids"], batch, prepend=not past)
        host = {"attention_mask": attention_mask, "labels": labels, "token_type_ids": token_type_ids}
        if self.is_prefix:
            if not past:
                self._refuse_checkpointing()
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

    def _extend_mask(self, mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
        n = self.num_virtual_tokens
        if mask is None:  # prefix hosts get an explicit mask: BERT sizes its keys from it
            return torch.ones(batch, n + length, dtype=torch.long, device=self.device) if self.is_prefix else None
        if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
            raise ValueError(
                f"fastlora: attention_mask must be 2-D (batch, seq) = {(batch, length)} over the real tokens, "
                f"got shape {tuple(mask.shape)}"
            )
        return torch.cat([mask.new_ones(batch, n), mask], 1)

    def _shift_positions(self, positions: torch.Tensor, batch: int, prepend: bool) -> torch.Tensor:
        n = self.num_virtual_tokens
        positions = positions + n
        if prepend and not self.is_prefix:  # the virtual tokens themselves sit at 0..n-1
            virtual = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
            positions = torch.cat([virtual, positions], 1)
        return positions

    def _refuse_checkpointing(self) -> None:
        if (
            self.training
            and torch.is_grad_enabled()
            and any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules())
        ):
            raise ValueError(
                "fastlora: prefix tuning does not work with gradient checkpointing (transformers drops the KV "
                "cache inside checkpointed layers); turn activation checkpointing off"
            )

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        """The host's ``generate`` with the prompt: virtual embeddings (given to the first step as
        ``inputs_embeds``) or the prefix cache. Returns what the host returns: with input_ids, the input
        followed by the new tokens. Prefix tuning takes input_ids only."""
        if not hasattr(self.model, "generate"):
            raise TypeError(f"fastlora: {type(self.model).__name__} has no generate()")
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

    # -- save ---------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What :meth:`save_adapter` writes: ``prompt_embeddings`` (n, dim, the encoder's output in eval
        mode), the encoder's parameters as
        ``prompt_encoder.<name>`` while not folded, and ``base_model.<head path>.<name>`` for heads."""
        out = {PROMPT_KEY: _inference_values(self.prompt_encoder)}
        if not self.folded:
            out.update({ENCODER_PREFIX + k: v for k, v in self.prompt_encoder.state_dict().items()})
        for path in self.head_paths:
            for key, value in self.model.get_submodule(path).state_dict().items():
                out[f"{HEAD_PREFIX}{path}.{key}"] = value
        return out

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json content (peft's fields for this method)."""
        from fastlora.strategies.prompt_io import peft_config_dict

        return peft_config_dict(self)

    def save_adapter(self, directory: str) -> None:
        """Write the trained prompt (see :meth:`adapter_state_dict`) and adapter_config.json, each file
        atomically; peft loads the result (it reads ``prompt_embeddings``)."""
        from fastlora.strategies.prompt_io import save_prompt

        save_prompt(self, directory)


def inject_prompt(model: nn.Module, config: PromptConfig) -> PromptModel:
    """Freeze ``model`` and give it a trainable prompt of the kind ``config`` describes."""
    return PromptModel(model, config)


def load_prompt(model: nn.Module, directory: str, is_trainable: bool = False) -> PromptModel:
    """A host plus the prompt saved in ``directory`` (by fastlora or peft); see
    :func:`fastlora.strategies.prompt_io.load_prompt` (kept there: it imports this module)."""
    from fastlora.strategies.prompt_io import load_prompt as _load

    return _load(model, directory, is_trainable=is_trainable)


__all__ = [
    "PTuningConfig",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptModel",
    "PromptTuningConfig",
    "inject_prompt",
    "load_prompt",
    "prefix_from_tokens",
]
