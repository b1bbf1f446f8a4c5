"""Prompt encoders: modules whose ``forward()`` gives the prompt, (n, out_dim) float32, and their initial values.

PromptEmbedding holds the values themselves; PromptEncoder (P-tuning) and PrefixEncoder (prefix tuning with
projection) compute them, with peft's parameter layout, until :meth:`PromptModel.fold` replaces them by
a PromptEmbedding of their output.
"""

from __future__ import annotations

import torch
from torch import nn

from fastlora.methods.prompt.config import PrefixTuningConfig, PromptConfig, PromptTuningConfig, PTuningConfig
from fastlora.methods.prompt.host import HostDims, cache_kwarg, host_dims


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

    def __init__(self, config: PrefixTuningConfig, dims: HostDims) -> None:
        super().__init__()
        h = config.encoder_hidden_size or dims.kv_dim
        self.embedding = nn.Embedding(config.num_virtual_tokens, dims.kv_dim)
        self.transform = nn.Sequential(
            nn.Linear(dims.kv_dim, h), nn.Tanh(), nn.Linear(h, dims.num_layers * 2 * dims.kv_dim)
        )

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


@torch.no_grad()
def inference_values(encoder: nn.Module) -> torch.Tensor:
    """The encoder's output in eval mode (no dropout), detached; the encoder's own mode is kept."""
    training = encoder.training
    try:
        return encoder.eval()().detach().clone()
    finally:
        encoder.train(training)


def initial_prompt(config: PromptTuningConfig, model: nn.Module, vocab: int) -> torch.Tensor:
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
    dims, kwarg = host_dims(model), cache_kwarg(model)
    if kwarg is None:
        raise TypeError(f"fastlora: {type(model).__name__} takes no KV cache")
    from transformers import DynamicCache

    cache, training = DynamicCache(), model.training
    try:
        model.eval()(input_ids=token_ids.reshape(1, -1), use_cache=True, **{kwarg: cache})
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


def build_encoder(config: PromptConfig, model: nn.Module, dims: HostDims, initialise: bool = True) -> nn.Module:
    """The encoder ``config`` describes for ``model``, on the host's device; ``initialise``: with its starting
    values (prompt tuning's init, prefix tuning's "vocab" init), else as constructed (a loader fills it)."""
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
                encoder.embedding.weight.copy_(initial_prompt(config, model, vocab))
    return encoder.to(model.get_input_embeddings().weight.device)
