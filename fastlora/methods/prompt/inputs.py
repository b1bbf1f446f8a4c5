"""What a prompt model hands its host besides the prompt: the KV cache holding a prefix, the attention mask
and positions extended by the n virtual tokens, and the checks on them."""

from __future__ import annotations

import torch
from torch import nn

from fastlora.methods.prompt.host import HostDims


def fill_prefix_cache(flat: torch.Tensor, dims: HostDims, batch_size: int, host_config, cache=None):
    """A transformers ``DynamicCache`` holding the prefix ``flat`` (n, num_layers * 2 * kv_dim) in peft's layout
    (layer-major, key then value): per layer keys and values of shape (batch_size, num_kv_heads, n, head_dim) in
    ``flat``'s dtype; fills ``cache`` if given (empty)."""
    from transformers import DynamicCache

    n = flat.shape[0]
    per_layer = flat.view(n, dims.num_layers * 2, dims.kv_heads, dims.head_dim).permute(1, 2, 0, 3)
    per_layer = per_layer.unsqueeze(1).expand(-1, batch_size, -1, -1, -1).contiguous()
    if cache is None:
        try:
            cache = DynamicCache(config=host_config)
        except (TypeError, ValueError, AttributeError):  # older transformers / exotic configs
            cache = DynamicCache()
    for layer in range(dims.num_layers):
        cache.update(per_layer[2 * layer], per_layer[2 * layer + 1], layer)
    return cache


def check_length(host: nn.Module, n: int, total: int, limit: int | None) -> None:
    """n virtual tokens and the input must fit the host's max_position_embeddings ``limit``."""
    if limit is not None and total > limit:
        raise ValueError(
            f"fastlora: {n} virtual tokens + {total - n} input positions = {total} exceed "
            f"{type(host).__name__}'s max_position_embeddings={limit}"
        )


def extend_mask(mask: torch.Tensor | None, n: int, batch: int, length: int, *, prefix: bool,
                device: torch.device) -> torch.Tensor | None:  # fmt: skip
    """The (batch, length) 2-D mask over the real tokens with n leading ones; None stays None except for a
    prefix host, which gets an explicit mask of ones (BERT sizes its keys from it)."""
    if mask is None:
        return torch.ones(batch, n + length, dtype=torch.long, device=device) if prefix else None
    if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"fastlora: attention_mask must be 2-D (batch, seq) = {(batch, length)} over the real tokens, "
            f"got shape {tuple(mask.shape)}"
        )
    return torch.cat([mask.new_ones(batch, n), mask], 1)


def shift_positions(positions: torch.Tensor, n: int, *, prepend: bool) -> torch.Tensor:
    """Explicit position ids moved up by n; ``prepend``: with the virtual tokens' own 0..n-1 in front."""
    positions = positions + n
    if prepend:
        virtual = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
        positions = torch.cat([virtual, positions], 1)
    return positions


def refuse_checkpointing(host: nn.Module, training: bool) -> None:
    """Prefix tuning cannot train under gradient checkpointing (transformers drops the KV cache inside
    checkpointed layers): a ValueError when the host checkpoints and gradients flow."""
    if not (training and torch.is_grad_enabled()):
        return
    if any(getattr(m, "gradient_checkpointing", False) for m in host.modules()):
        raise ValueError(
            "fastlora: prefix tuning does not work with gradient checkpointing (transformers drops the KV "
            "cache inside checkpointed layers); turn activation checkpointing off"
        )
