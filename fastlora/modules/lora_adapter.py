"""One LoRA slot of a layer (:class:`LoraAdapter`: A, B and the hyperparameters) and the checks every way of
making one runs (:func:`check_lora_hparams`): the module, ``LoraModel.add_adapter`` and ``LoraConfig``."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

INITS = ("kaiming", "gaussian", "none")


class LoraAdapter(nn.Module):
    """One named adapter of a layer: ``lora_A`` (r, in_features), ``lora_B`` (out_features, r), hyperparameters."""

    def __init__(self, in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, init, dtype, device):
        super().__init__()
        check_lora_hparams(in_features, out_features, r, lora_alpha, lora_dropout, init)
        self.r, self.lora_alpha, self.lora_dropout = int(r), float(lora_alpha), float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, dtype=dtype, device=device))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        """PEFT's initialisation: A Kaiming-uniform (or Gaussian, std 1/r), B zero so the layer starts as the base.

        ``init="none"`` draws B like A (a non-identity start, for tests and experiments).
        """
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "none":
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """(out_features, in_features) fp32 ``s · B A``."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())


def check_lora_hparams(in_features, out_features, r, alpha, dropout, init="kaiming", *,
                       where: str = "FastLoRALinear") -> None:  # fmt: skip
    """Raise a ValueError naming the argument unless ``r`` is an int in [1, min(in_features, out_features)],
    ``alpha`` a finite number > 0 (an infinite alpha made every output NaN), ``dropout`` a number in [0, 1)
    and ``init`` one of :data:`INITS`. ``in_features``/``out_features`` None: r is only checked >= 1."""
    limit = None if in_features is None or out_features is None else min(in_features, out_features)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or (limit is not None and r > limit):
        span = ">= 1" if limit is None else f"in [1, min(in_features, out_features)] = [1, {limit}]"
        raise ValueError(f"{where}: r must be an int {span}, got {r!r}")
    if not _is_real(alpha):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"{where}: lora_alpha must be finite, got {alpha!r} (the scale alpha / r would make "
                         "every output NaN)")  # fmt: skip
    if not alpha > 0:
        raise ValueError(f"{where}: lora_alpha must be > 0, got {alpha!r}")
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: lora_dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"{where}: init must be one of {INITS}, got {init!r}")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
