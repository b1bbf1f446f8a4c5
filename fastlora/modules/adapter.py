"""FastAdapter: the bottleneck adapter (Houlsby et al. 2019) as a module over the fused op."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastlora.functional import ACTIVATIONS, check_activation
from fastlora.ops.adapter import adapter_forward


class FastAdapter(nn.Module):
    """``y = res + dropout(act(x W_downᵀ + b_down)) W_upᵀ + b_up`` with fused kernels.

    ``res`` is x itself (serial adapter: ``adapter(x)``) or a tensor passed as ``residual`` (parallel
    adapter: ``adapter(x, residual=module_output)``). Parameters: ``w_down`` (r, d_model), ``b_down``
    (r,), ``w_up`` (d_model, r), ``b_up`` (d_model,). The down projection starts Kaiming-uniform
    like ``nn.Linear``; the up projection and its bias start at zero, so a new adapter is exactly
    the identity (``y == res`` bit for bit) and training starts from the host model.

    Dropout acts on the r-wide bottleneck activation (M×r elements, outside the fused GEMMs).
    Compute dtype follows the input (or the autocast dtype); the parameters may be kept in
    another float dtype, e.g. fp32 for the optimiser, and are cast on the fly.

    Args:
        d_model: the width of x.
        r: bottleneck size, 1 <= r < d_model.
        activation: one of ``"relu"``, ``"gelu"`` (exact), ``"gelu_tanh"``, ``"silu"``.
        dropout: dropout probability on the bottleneck, in [0, 1).
        dtype, device: of the parameters.
    """

    def __init__(
        self,
        d_model: int,
        r: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_hparams(d_model, r, activation, dropout)
        self.d_model, self.r, self.activation, self.dropout = int(d_model), int(r), activation, float(dropout)
        self.backend: str | None = None  # None: by device / FASTLORA_BACKEND; "torch" or "triton" forces one
        kw = {"dtype": dtype, "device": device}
        self.w_down = nn.Parameter(torch.empty(self.r, self.d_model, **kw))
        self.b_down = nn.Parameter(torch.empty(self.r, **kw))
        self.w_up = nn.Parameter(torch.empty(self.d_model, self.r, **kw))
        self.b_up = nn.Parameter(torch.empty(self.d_model, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Down: ``nn.Linear``'s init (Kaiming-uniform weight, bias U(±1/√d)); up: zeros (the identity)."""
        nn.init.kaiming_uniform_(self.w_down, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.d_model)
        nn.init.uniform_(self.b_down, -bound, bound)
        nn.init.zeros_(self.w_up)
        nn.init.zeros_(self.b_up)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., d_model) float; residual: None or like x -> (..., d_model) in x's (or the autocast) dtype."""
        self._check_input(x, residual)
        if x.device.type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        dtype = x.dtype
        if residual is not None and residual.dtype != dtype:
            residual = residual.to(dtype)
        p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        return adapter_forward(
            x, self.w_down.to(dtype), self.b_down.to(dtype), self.w_up.to(dtype), self.b_up.to(dtype),
            self.activation, residual, self.backend, dropout_p=p, seed=seed,
        )  # fmt: skip

    def _check_input(self, x: torch.Tensor, residual: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FastAdapter: input must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"FastAdapter: input has shape {tuple(x.shape)}, expected (..., {self.d_model}) "
                f"(d_model={self.d_model})"
            )
        if not x.is_floating_point():
            raise TypeError(f"FastAdapter: input must be float32/float16/bfloat16, got {x.dtype}")
        if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != x.shape):
            shape = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"FastAdapter: residual must have the input's shape {tuple(x.shape)}, got {shape}")
        if x.device != self.w_down.device:
            raise ValueError(f"FastAdapter: input is on {x.device}, the adapter on {self.w_down.device}")

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, r={self.r}, activation={self.activation!r}, dropout={self.dropout}, "
            f"dtype={str(self.w_down.dtype)[6:]}"
        )


def _check_hparams(d_model, r, activation, dropout) -> None:
    if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model < 2:
        raise ValueError(f"FastAdapter: d_model must be an int >= 2, got {d_model!r}")
    if not isinstance(r, int) or isinstance(r, bool) or not 0 < r < d_model:
        raise ValueError(
            f"FastAdapter: r must be an int in [1, d_model - 1] = [1, {d_model - 1}] (a bottleneck narrower "
            f"than d_model={d_model}), got {r!r}"
        )
    check_activation(activation, where="FastAdapter")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"FastAdapter: dropout must be in [0, 1), got {dropout!r}")


__all__ = ["ACTIVATIONS", "FastAdapter"]
