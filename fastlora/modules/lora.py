"""FastLoRALinear: a drop-in LoRA/QLoRA replacement for ``nn.Linear`` and ``bnb.nn.Linear4bit``."""

from __future__ import annotations

import torch
from torch import nn

from fastlora.modules import lora_state
from fastlora.modules.dora import DoraAdapter, dora_factor, dora_forward, init_magnitude, is_dora
from fastlora.modules.lora_adapter import LoraAdapter
from fastlora.modules.requant import requantize_merged
from fastlora.ops.lora import lora_linear
from fastlora.ops.quant import merge_4bit
from fastlora.quant import QuantState, quantize_4bit


class FastLoRALinear(nn.Module):
    """``y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ`` with W frozen (dense or 4-bit NF4/FP4), fused kernels.

    Build one with :meth:`from_linear` or :meth:`from_bnb`. A layer holds named adapters
    (:meth:`add_adapter`, :meth:`set_adapter`, :meth:`delete_adapter`, ``disabled``); the active
    one's ``lora_A`` (r, in_features) and ``lora_B`` (out_features, r) train; the base ``weight`` and ``bias`` are
    frozen (``requires_grad=False``). A 4-bit base is stored as bitsandbytes stores it: ``weight``
    holds the packed bytes and ``quant_state`` the statistics; the state dict carries
    ``bnb.nn.Linear4bit``'s keys (``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``...).

    Compute dtype follows the input: x of fp32/fp16/bf16 (or the autocast dtype); the LoRA
    parameters may be kept in another float dtype (e.g. fp32 for the optimiser) and are cast on
    the fly. A dense base weight must already be in the input's dtype (no silent copies of W).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        *,
        quant_state: QuantState | None = None,
        use_rslora: bool = False,
        init: str = "kaiming",
        lora_dtype: torch.dtype | None = None,
        adapter_name: str = "default",
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if quant_state is not None and quant_state.device.type != "meta":
            # The fused kernels use the standard NF4/FP4 tables in registers (the op arguments do not carry
            # quant_map), while dequantize_4bit and merge() read quant_map: a custom table would make the
            # forward and the merged weight disagree silently. Refused here as the state-dict and bnb loaders do.
            quant_state.validate(weight, where="FastLoRALinear")
            quant_state.check_code_table(where="FastLoRALinear")
        out_features, in_features = quant_state.shape if quant_state is not None else weight.shape
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        self.quant_state = quant_state
        self.lora_dtype = lora_dtype or (quant_state.dtype if quant_state is not None else weight.dtype)
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False  # True: the base layer alone, exactly
        self.merged = False
        self._stash: tuple[torch.Tensor, QuantState | None] | None = None
        self._residual: tuple[torch.Tensor, torch.Tensor] | None = None  # (R (k, K), L (N, k)) of a refit
        self._dora_merged: torch.Tensor | None = None  # (N, 1) m / ‖W + s·B A‖ of a DoRA merge, for unmerge
        # Routes (plain callables (layer, x) -> y, never nn.Modules: no state-dict keys) that replace the forward
        # while set: a mixed-adapter batch (per-row adapters, set for one model forward) and a fused projection
        # group (one op for the layers that read the same input).
        self._mixed_route = None
        self._group_route = None
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora=use_rslora, init=init,
                         use_dora=use_dora)  # fmt: skip

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
    ) -> LoraAdapter:
        """Add a named adapter (it becomes active if none is); the base weight is shared, not copied.
        ``use_dora``: a DoRA slot (:class:`DoraAdapter`, magnitude initialised to ‖W + s·B A‖ per row)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"FastLoRALinear: adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"FastLoRALinear: adapter {name!r} already exists (have {list(self.adapters)})")
        cls = DoraAdapter if use_dora else LoraAdapter
        adapter = cls(self.in_features, self.out_features, r, lora_alpha, lora_dropout, use_rslora, init,
                      self.lora_dtype, self.weight.device)  # fmt: skip
        if use_dora:
            init_magnitude(self, adapter)
        adapter.train(self.training)
        self.adapters[name] = adapter
        if self.active_adapter is None:
            self.active_adapter = name
        return adapter

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the adapter the forward uses (the base is untouched: switching is free)."""
        self._require(name)
        if self.merged and name != self.active_adapter:
            raise RuntimeError(f"FastLoRALinear: unmerge {self.active_adapter!r} before switching to {name!r}")
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if self.merged and name == self.active_adapter:
            raise RuntimeError(f"FastLoRALinear: unmerge {name!r} before deleting it")
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    def _require(self, name: str) -> LoraAdapter:
        if name not in self.adapters:
            raise KeyError(f"FastLoRALinear: no adapter named {name!r} (have {list(self.adapters)})")
        return self.adapters[name]

    @property
    def adapter(self) -> LoraAdapter:
        """The active adapter."""
        if self.active_adapter is None:
            raise RuntimeError("FastLoRALinear: the layer has no adapter")
        return self.adapters[self.active_adapter]

    lora_A = property(lambda self: self.adapter.lora_A, doc="(r, in_features) of the active adapter")
    lora_B = property(lambda self: self.adapter.lora_B, doc="(out_features, r) of the active adapter")
    scaling = property(lambda self: self.adapter.scaling)
    r = property(lambda self: self.adapter.r)
    lora_alpha = property(lambda self: self.adapter.lora_alpha)
    lora_dropout = property(lambda self: self.adapter.lora_dropout)
    use_rslora = property(lambda self: self.adapter.use_rslora)
    use_dora = property(lambda self: is_dora(self.adapter))
    lora_magnitude_vector = property(lambda self: self.adapter.lora_magnitude_vector, doc="(out_features,) DoRA")

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        *,
        quant: str | None = None,
        blocksize: int = 64,
        double_quant: bool = True,
        use_rslora: bool = False,
        init: str = "kaiming",
        lora_dtype: torch.dtype | None = None,
        adapter_name: str = "default",
        use_dora: bool = False,
    ) -> FastLoRALinear:
        """Wrap an ``nn.Linear``; with ``quant="nf4"|"fp4"`` its weight is quantised to 4 bits (QLoRA)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FastLoRALinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        weight, state = linear.weight.detach(), None
        if quant is not None:
            weight, state = quantize_4bit(weight, quant, blocksize, double_quant)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(weight, bias, r, lora_alpha, lora_dropout, quant_state=state, use_rslora=use_rslora, init=init,
                   lora_dtype=lora_dtype or linear.weight.dtype, adapter_name=adapter_name,
                   use_dora=use_dora)  # fmt: skip

    @classmethod
    def from_bnb(
        cls,
        linear4bit: nn.Module,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        init: str = "kaiming",
        lora_dtype: torch.dtype | None = None,
        adapter_name: str = "default",
        use_dora: bool = False,
    ) -> FastLoRALinear:
        """Wrap a quantised ``bnb.nn.Linear4bit``, sharing its packed bytes (no copy, no re-quantisation)."""
        qs = getattr(linear4bit.weight, "quant_state", None)
        if qs is None:
            raise ValueError(
                "FastLoRALinear.from_bnb: the Linear4bit is not quantised yet (weight.quant_state is None); "
                "move it to its device first (e.g. .to('cuda'))"
            )
        state = QuantState.from_bnb(qs)
        bias = linear4bit.bias.detach() if linear4bit.bias is not None else None
        compute = getattr(linear4bit, "compute_dtype", None) or state.dtype
        return cls(linear4bit.weight.data, bias, r, lora_alpha, lora_dropout, quant_state=state,
                   use_rslora=use_rslora, init=init, lora_dtype=lora_dtype or compute,
                   adapter_name=adapter_name, use_dora=use_dora)  # fmt: skip

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """Re-initialise the active adapter (see :meth:`LoraAdapter.reset_parameters`)."""
        self.adapter.reset_parameters(init)
        if is_dora(self.adapter):
            init_magnitude(self, self.adapter)

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) float -> (..., out_features) in x's (or the autocast) dtype."""
        if self._mixed_route is not None:
            return self._mixed_route(self, x)
        if self._group_route is not None:
            return self._group_route(self, x)
        self._check_input(x)
        autocast = x.device.type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(x.device.type)
        if autocast:
            x = x.to(torch.get_autocast_dtype(x.device.type))
        dtype = x.dtype
        weight = self.weight
        if self.quant_state is None and weight.dtype != dtype:
            if not autocast:
                raise TypeError(
                    f"FastLoRALinear: input dtype {dtype} does not match the base weight's {weight.dtype}; "
                    "cast the input, the module (.to(dtype)), or run under torch.autocast"
                )
            weight = weight.to(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        if self.merged or self.disabled or self.active_adapter is None:
            if self.disabled and self.merged:
                raise RuntimeError("FastLoRALinear: unmerge before disabling the adapter (the base is merged)")
            if self.quant_state is None:
                return nn.functional.linear(x, weight, bias)
            if self.merged and self._residual is not None:  # a refit re-quantised merge: + x Rᵀ Lᵀ
                a, b = (t.to(dtype) for t in self._residual)
                return lora_linear(x, weight, bias, a, b, 1.0, quant_state=self.quant_state)
            a, b = x.new_zeros((0, self.in_features)), x.new_zeros((self.out_features, 0))
            return lora_linear(x, weight, bias, a, b, 0.0, quant_state=self.quant_state)
        adapter = self.adapter
        p = adapter.lora_dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        if is_dora(adapter):
            return dora_forward(self, adapter, x, weight, bias, p, seed)
        return lora_linear(
            x, weight, bias, adapter.lora_A.to(dtype), adapter.lora_B.to(dtype), adapter.scaling,
            quant_state=self.quant_state, dropout_p=p, seed=seed,
        )  # fmt: skip

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FastLoRALinear: input must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"FastLoRALinear: input has shape {tuple(x.shape)}, expected (..., {self.in_features}) "
                f"(in_features={self.in_features})"
            )
        if not x.is_floating_point() or x.dtype == torch.float64:
            raise TypeError(f"FastLoRALinear: input must be float32/float16/bfloat16, got {x.dtype}")
        if x.device != self.weight.device:
            raise ValueError(f"FastLoRALinear: input is on {x.device}, the layer on {self.weight.device}")

    # -- merge ------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """(out_features, in_features) fp32 ``s · B A`` of the active adapter."""
        return self.adapter.delta_weight()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """(out_features, in_features) fp32 ``W + s · B A`` of the active adapter, W dequantised if 4-bit;
        a DoRA adapter's ``m / ‖W + s · B A‖ ⊙ (W + s · B A)`` (peft's DoRA merge, norm of the unmerged base).

        A 4-bit W goes through the merge op (the native kernel where built: one pass over the
        packed weight, no dequantised copy of W beside the result).
        """
        a = self.adapter
        if self.quant_state is None:
            merged = self.weight.float() + self.delta_weight()
        else:
            merged = merge_4bit(self.weight, self.quant_state, a.lora_A.detach().float(), a.lora_B.detach().float(),
                                a.scaling, torch.float32)  # fmt: skip
        return merged.mul_(dora_factor(self, a)) if is_dora(a) else merged

    @torch.no_grad()
    def merge(self, *, requantize: bool = False, keep_original: bool = True, refit_rank: int = 0, refit_iters: int = 1,
              sample: torch.Tensor | None = None) -> dict[str, float]:  # fmt: skip
        """Fold ``s · B A`` into the base weight; the forward becomes the plain (4-bit) linear.

        A float base merges in its dtype. A 4-bit base merges into a dense weight of its original
        dtype, or with ``requantize=True`` is re-quantised to 4 bits with the same settings; the
        returned dict reports the error that re-quantisation adds. With ``keep_original`` (default)
        the original base is kept so :meth:`unmerge` restores it bit for bit. ``refit_rank``, ``refit_iters``,
        ``sample``: see :func:`~fastlora.modules.requant.requantize_merged` (a rank-k residual kept beside Q).

        Returns:
            {} for float merges; for requantize: the requantize_merged report.
        """
        if self.merged:
            raise RuntimeError("FastLoRALinear.merge: already merged")
        merged, report = self.merged_weight(), {}
        self._dora_merged = dora_factor(self, self.adapter) if is_dora(self.adapter) else None
        self._stash = (self.weight.data, self.quant_state) if keep_original else None
        if self.quant_state is None:
            self.weight.data = merged.to(self.weight.dtype)
        else:
            state = self.quant_state
            if requantize:
                packed, new_state, self._residual, report = requantize_merged(merged, state, refit_rank, refit_iters,
                                                                              sample)  # fmt: skip
                self.weight = nn.Parameter(packed, requires_grad=False)
                self.quant_state = new_state
            else:
                self.weight = nn.Parameter(merged.to(state.dtype), requires_grad=False)
                self.quant_state = None
        self.merged = True
        return report

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: exact when the original was kept, else subtracts ``s · B A`` (float bases)."""
        if not self.merged:
            raise RuntimeError("FastLoRALinear.unmerge: not merged")
        if self._stash is not None:
            weight, state = self._stash
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.quant_state = state
        elif self.quant_state is None:
            w = self.weight.float() if self._dora_merged is None else self.weight.float() / self._dora_merged
            self.weight.data = (w - self.delta_weight()).to(self.weight.dtype)
        else:
            raise RuntimeError("FastLoRALinear.unmerge: a re-quantised merge without keep_original cannot be undone")
        self._stash = self._dora_merged = self._dora_wsq = self._residual = None
        self.merged = False

    # -- state dict and device moves ----------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        lora_state.save_extra(self, destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        state_dict = lora_state.load_extra(self, state_dict, prefix, missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
        lora_state.finish_load(self, prefix, missing_keys)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.quant_state is not None and self.quant_state.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)  # statistics follow moves, never casts
        return self

    def extra_repr(self) -> str:
        base = f"{self.quant_state.quant_type}" if self.quant_state is not None else str(self.weight.dtype)[6:]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, base={base}, "
            f"active_adapter={self.active_adapter!r}, merged={self.merged}, disabled={self.disabled}"
        )
