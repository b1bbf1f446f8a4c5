"""Every output buffer fastlora allocates goes through :func:`empty`.

Tests switch on poisoning (:func:`set_poison`): float buffers start as NaN and integer buffers
as all-ones bits, so an output element that a kernel forgets to write fails the comparison
instead of passing by luck with whatever memory held.
"""

from __future__ import annotations

import torch

_poison = False


def set_poison(enabled: bool) -> bool:
    """Turn poisoning of new buffers on or off; returns the previous setting."""
    global _poison
    previous, _poison = _poison, enabled
    return previous


def empty(shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty``, poisoned (NaN / 0xFF bytes) while :func:`set_poison` is on."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        if t.is_floating_point():
            t.fill_(float("nan"))
        else:
            t.view(torch.uint8).fill_(0xFF)
    return t
