"""AdapterModel: a frozen host with bottleneck adapters placed by module name; inject, save, load, disable."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fastlora.methods.bottleneck.config import ADAPTER_TYPE, AUTO_TARGETS, AdapterConfig
from fastlora.methods.bottleneck.layer import AdapterLayer
from fastlora.methods.files import CONFIG_NAME, read_saved, write_files
from fastlora.methods.fingerprint import base_fingerprint, check_integrity, host_weights
from fastlora.methods.lora.model import LoraModel
from fastlora.methods.targets import close_names, outermost, select
from fastlora.methods.tensors import check_tensors, copy_checked
from fastlora.methods.wrapper import ModulesToSave, WrappedModel, set_module
from fastlora.modules.adapter import FastAdapter

_COPY_NAME = "default"  # the one ModulesToSave copy this model trains

Plan = list[tuple[str, nn.Module, str, int]]


def _hidden_size(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    return size if isinstance(size, int) else None


def _auto_targets(model: nn.Module, modules: list[tuple[str, nn.Module]], config: AdapterConfig) -> list:
    """(path, module, mode) of the placement's modules for the host's architecture."""
    host = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in AUTO_TARGETS:
        raise ValueError(
            f"fastlora: no automatic adapter targets for {host} (model_type {model_type!r}; known: "
            f"{', '.join(AUTO_TARGETS)}); pass AdapterConfig(target_modules=[...]) with module names"
        )
    found = []
    for pattern, mode in AUTO_TARGETS[model_type][config.placement]:
        hits = [(p, m, mode) for p, m in modules if re.fullmatch(pattern, p)]
        if not hits:
            leaf = pattern.rsplit("\\.", 1)[-1]
            close = close_names([leaf], [p for p, _ in modules])
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ValueError(
                f"fastlora: placement {config.placement!r} for model_type {model_type!r} expects modules "
                f"matching {pattern!r} and {host} has none{hint}"
            )
        found += hits
    return found


def _width(path: str, module: nn.Module, mode: str, model: nn.Module, r: int) -> int:
    """d_model of the adapter at ``path``, checked against ``mode`` and ``r``."""
    if isinstance(module, nn.Linear):
        if mode == "parallel" and module.in_features != module.out_features:
            raise ValueError(
                f"fastlora: a parallel adapter adds Δ(input) to the output, so {path} needs in_features == "
                f"out_features, got {module.in_features} -> {module.out_features}"
            )
        d_model = module.out_features
    else:
        d_model = _hidden_size(model)
        if d_model is None:
            raise ValueError(
                f"fastlora: cannot tell the width of {path} ({type(module).__name__}); target nn.Linear layers "
                f"or a model whose config has hidden_size"
            )
    if not 0 < r < d_model:
        raise ValueError(
            f"fastlora: r={r} must be in [1, d_model - 1] = [1, {d_model - 1}] for {path} (d_model={d_model})"
        )
    return d_model


def _plan(model: nn.Module, config: AdapterConfig) -> tuple[Plan, list[tuple[str, nn.Module]]]:
    """(path, module, mode, d_model) of every adapter and (path, module) of every modules_to_save
    entry, without touching the model; every selection problem is a ValueError."""
    modules = [(p, m) for p, m in model.named_modules() if p]
    if config.target_modules is None:
        found = _auto_targets(model, modules, config)
    else:
        mode = "parallel" if config.placement == "parallel" else "output"
        found = [(p, m, mode) for p, m in outermost(select(modules, config.target_modules, model))]
    plan = [(path, module, mode, _width(path, module, mode, model, config.r)) for path, module, mode in found]
    saved = []
    for name in config.modules_to_save or []:
        saved += outermost(select(modules, [name], model, subject=f"modules_to_save {name!r}"))
    targets = {p for p, *_ in plan}
    clash = [p for p, _ in saved if any(p == t or p.startswith(t + ".") or t.startswith(p + ".") for t in targets)]
    if clash:
        raise ValueError(f"fastlora: {clash[0]} is both adapted and in modules_to_save (or contains / is inside one)")
    return plan, saved


def _param_like(module: nn.Module, model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device for an adapter beside ``module``: its first float parameter's, else the host's."""
    for source in (module, model):
        for t in [*source.parameters(), *source.buffers()]:
            if t.is_floating_point():
                return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _expected_shapes(plan: Plan, saved: list[tuple[str, nn.Module]], r: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor :meth:`AdapterModel.adapter_state_dict` holds for this plan."""
    expected: dict[str, tuple[int, ...]] = {}
    for path, _, _, d in plan:
        expected.update({f"{path}.adapter.w_down": (r, d), f"{path}.adapter.b_down": (r,)})
        expected.update({f"{path}.adapter.w_up": (d, r), f"{path}.adapter.b_up": (d,)})
    for path, module in saved:
        expected.update({f"{path}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    return expected


class AdapterModel(WrappedModel):
    """A frozen host model with bottleneck adapters (and optional modules_to_save copies) that train.

    The host is modified in place and stays reachable as ``.model``; unknown attributes
    (``config``, ``generate``, ``activation_checkpointing_enable``...) are forwarded to it.
    Build it with :func:`inject_adapters` or :func:`load_adapters`; implements
    :class:`~fastlora.methods.base.Method` (``adapter_config`` is its ``method_config``).
    """

    def __init__(self, model: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        if isinstance(model, (AdapterModel, LoraModel)):
            raise TypeError(f"fastlora: the model is already a {type(model).__name__}; pass the host model itself")
        if any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in model.modules()):
            raise ValueError("fastlora: the model already holds adapters or modules_to_save copies")
        plan, saved = _plan(model, config)
        adapters = {}
        for path, module, _, d_model in plan:  # build everything before touching the host
            dtype, device = _param_like(module, model)
            adapters[path] = FastAdapter(d_model, config.r, config.activation, config.dropout, dtype=dtype,
                                         device=device)  # fmt: skip
        model.requires_grad_(False)
        for path, module, mode, _ in plan:
            set_module(model, path, AdapterLayer(module, adapters[path], mode))
        for path, module in saved:
            wrapper = ModulesToSave(module)
            wrapper.add(_COPY_NAME)
            wrapper.active_adapter = _COPY_NAME
            set_module(model, path, wrapper)
        self.model = model
        self.training = model.training  # an eval-mode host stays in eval mode (adapter dropout off)
        self.adapter_config = config

    @property
    def method_config(self) -> AdapterConfig:
        return self.adapter_config

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """(path in the host, layer) of every adapted module."""
        for path, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield path, module

    def disable(self) -> contextlib.AbstractContextManager[None]:
        """Within the block the model is exactly the host: no adapters, original modules_to_save."""
        return self._disabled(m for _, m in self.adapter_layers())

    def disable_adapters(self) -> contextlib.AbstractContextManager[None]:
        """The earlier name of :meth:`disable`."""
        return self.disable()

    def unload(self) -> nn.Module:
        """The host with every adapter removed and the original modules_to_save back (still frozen)."""
        for path, layer in list(self.adapter_layers()):
            set_module(self.model, path, layer.base_layer)
        for path, module in list(self.saved_modules()):
            set_module(self.model, path, module.original)
        return self.model

    def merge_and_unload(self) -> nn.Module:
        """Not possible: the activation between the two projections makes an adapter nonlinear, so it has no
        weight-space equivalent in the host. Use :meth:`unload` to drop the adapters."""
        raise NotImplementedError(
            "fastlora: bottleneck adapters cannot be merged into the host's weights (act() between the down and up "
            "projections makes them nonlinear); keep the AdapterModel, or unload() to drop them"
        )

    # -- save / load ----------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors only: ``<path>.adapter.{w_down,b_down,w_up,b_up}`` per adapted module and
        ``<path>.<key>`` of each modules_to_save copy (paths in the host model)."""
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.adapter_layers():
            for key, value in layer.adapter.state_dict().items():
                out[f"{path}.adapter.{key}"] = value
        for path, module in self.saved_modules():
            for key, value in module.trained[_COPY_NAME].state_dict().items():
                out[f"{path}.{key}"] = value
        return out

    def save(self, directory: str, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write ``adapter_model.safetensors`` (the trained tensors only, or ``tensors``) and
        ``adapter_config.json``, each atomically (temporary file + rename), weights first; beside them the
        weights' sha256 and a fingerprint of the host's own weights (``fastlora_integrity.json``)."""
        config = {**self.adapter_config.to_dict(), "base_model_class": type(self.model).__name__}
        config["model_type"] = getattr(getattr(self.model, "config", None), "model_type", None)
        tensors = self.adapter_state_dict() if tensors is None else tensors
        added = [layer.adapter for _, layer in self.adapter_layers()] + [m for _, m in self.saved_modules()]
        write_files(directory, config, tensors, metadata={"fastlora_adapter": ADAPTER_TYPE},
                    base_fingerprint=base_fingerprint(host_weights(self.model, added)))  # fmt: skip

    def save_adapter(self, directory: str) -> None:
        """peft's name for :meth:`save`."""
        self.save(directory)

    @classmethod
    def load(
        cls, model: nn.Module, directory: str, *, is_trainable: bool = False, allow_base_mismatch: bool = False
    ) -> AdapterModel:
        """``model`` with the adapters saved in ``directory`` by :meth:`save`.

        Every key and shape is checked against ``model`` before it is touched: on any error (missing or
        corrupt files, another architecture, other widths or r) a ``ValueError``/``FileNotFoundError``
        names the problem and the model is left unchanged. A tensor file whose sha256 differs from the
        recorded one is such an error, and so is a host whose weights do not match the recorded base
        fingerprint, unless ``allow_base_mismatch=True`` (then a warning). ``is_trainable=False`` loads for
        inference (nothing requires grad).
        """
        config, raw, tensors, record = _read(directory)
        source = raw.get("base_model_class") or "an unknown model"
        here = type(model).__name__
        where = f"{directory}: adapters saved from {source} do not fit {here}"
        try:
            plan, saved = _plan(model, config)
        except ValueError as e:
            raise ValueError(f"fastlora: {where}: {str(e).removeprefix('fastlora: ')}") from e
        check_tensors(_expected_shapes(plan, saved, config.r), tensors, where, owner=here)
        check_integrity(directory, record, host_weights(model, [m for _, m in saved]),
                        allow_base_mismatch=allow_base_mismatch)  # fmt: skip
        adapted = cls(model, config)
        copy_checked(adapted.adapter_state_dict(), tensors, where, owner=here)
        if not is_trainable:
            adapted.requires_grad_(False)
        return adapted

    # -- reporting ------------------------------------------------------------------------------

    def trainable_share(self) -> float:
        """Trainable parameters as a fraction of all parameters (typically 0.005 - 0.05)."""
        trainable, total = self.parameter_counts()
        return trainable / total if total else 0.0


def inject_adapters(model: nn.Module, config: AdapterConfig | None = None, **overrides) -> AdapterModel:
    """Freeze ``model`` and place bottleneck adapters in it per ``config`` (``overrides`` replace fields).

    Raises ValueError when a placement or target matches nothing (naming close module names), when
    r is not in [1, d_model - 1], or on an unknown activation or placement; the model is then untouched.
    """
    config = dataclasses.replace(config, **overrides) if config is not None else AdapterConfig(**overrides)
    return AdapterModel(model, config)


def _read(directory: str) -> tuple[AdapterConfig, dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    raw, tensors, record = read_saved(directory)
    return AdapterConfig.from_dict(raw, where=os.path.join(directory, CONFIG_NAME)), raw, tensors, record


def load_adapters(
    model: nn.Module, directory: str, *, is_trainable: bool = False, allow_base_mismatch: bool = False
) -> AdapterModel:
    """``model`` with the adapters saved in ``directory``: :meth:`AdapterModel.load`."""
    return AdapterModel.load(model, directory, is_trainable=is_trainable, allow_base_mismatch=allow_base_mismatch)
