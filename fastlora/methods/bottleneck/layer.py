"""AdapterLayer: a host module with a bottleneck adapter placed on its output, beside it, or on its residual input."""

from __future__ import annotations

import torch
from torch import nn

from fastlora.modules.adapter import FastAdapter


class AdapterLayer(nn.Module):
    """A host module (``base_layer``) with a :class:`FastAdapter` (``adapter``) placed by ``mode``:

    - "output":     ``base(...) -> out``, returns ``adapter(out)`` = out + Δ(out);
    - "parallel":   returns ``adapter(x, residual=base(x, ...))`` = base(x) + Δ(x);
    - "skip_input": ``base(h, x, ...)`` is called as ``base(h, adapter(x), ...)`` (BERT's BertOutput).

    A tuple/list output has its element 0 adapted. Unknown attributes are read from ``base_layer``.
    """

    MODES = ("output", "parallel", "skip_input")

    def __init__(self, base_layer: nn.Module, adapter: FastAdapter, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"AdapterLayer: mode must be one of {self.MODES}, got {mode!r}")
        self.base_layer = base_layer
        self.adapter = adapter
        self.mode = mode
        self.disabled = False  # True: exactly the base layer

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.base_layer(*args, **kwargs)
        if self.mode == "skip_input":
            if len(args) >= 2:
                args = (args[0], self.adapter(args[1]), *args[2:])
            elif "input_tensor" in kwargs:
                kwargs = {**kwargs, "input_tensor": self.adapter(kwargs["input_tensor"])}
            else:
                raise TypeError(
                    f"AdapterLayer(skip_input): {type(self.base_layer).__name__} was called without its residual "
                    "input (second positional argument or input_tensor=)"
                )
            return self.base_layer(*args, **kwargs)
        out = self.base_layer(*args, **kwargs)
        if self.mode == "output":
            return _map_first(out, self.adapter, self.base_layer)
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"AdapterLayer(parallel): cannot find the input of {type(self.base_layer).__name__} "
                "(first positional argument or hidden_states=)"
            )
        return _map_first(out, lambda y: self.adapter(x, residual=y), self.base_layer)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapter"):
                raise
            return getattr(self._modules["base_layer"], name)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, disabled={self.disabled}"


def _map_first(out, fn, module: nn.Module):
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return type(out)((fn(out[0]), *out[1:]))
    raise TypeError(
        f"AdapterLayer: {type(module).__name__} returned {type(out).__name__}; an adapter needs a tensor or a "
        "tuple whose first element is a tensor"
    )
