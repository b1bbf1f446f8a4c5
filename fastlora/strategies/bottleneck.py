"""Bottleneck adapters placed in a host model by module name: Houlsby, Pfeiffer and parallel.

    model = inject_adapters(model, AdapterConfig(r=16, placement="houlsby"))
    ...train (only the adapters, and any modules_to_save, have requires_grad)...
    model.save_adapter("out/")                    # adapter_config.json + adapter_model.safetensors
    model = load_adapters(fresh_host, "out/")

Placements (the modules wrapped are chosen per architecture unless ``target_modules`` is given):

- ``houlsby`` (Houlsby et al. 2019): "Attention → Adapter → FFN → Adapter". Llama: on the outputs
  of ``self_attn`` and ``mlp``, before the residual add. BERT: on the outputs of the attention
  output ``dense`` and the FFN output ``dense``, before the residual LayerNorm, as in the paper.
- ``pfeiffer`` (Pfeiffer et al. 2021): one adapter, after the FFN only (same modules as above).
- ``parallel`` (He et al. 2022): the adapter of the FFN's INPUT added to the FFN's output.
  Llama: ``mlp(x) + Δ(x)``. BERT has no module whose input is the FFN input and whose output is
  the FFN output before the LayerNorm; its ``BertOutput(h, x)`` computes ``LN(dense(h) + x)`` with x
  the FFN input, so passing it ``x + Δ(x)`` gives exactly ``LN(FFN(x) + x + Δ(x))``.

Each target is replaced by an :class:`AdapterLayer` holding the original as ``base_layer`` and a
:class:`~fastlora.modules.adapter.FastAdapter` as ``adapter`` (a tuple output, e.g. attention's
``(out, weights)``, has its element 0 adapted). The host is frozen; adapters start as the identity.

Adapters cannot be merged into the host's weights (``act`` sits between the two projections), so
there is no ``merge_and_unload``; :meth:`AdapterModel.unload` gives the host back without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fastlora.adapters.io import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_files
from fastlora.adapters.model import LoraModel
from fastlora.adapters.wrapper import ModulesToSave, WrappedModel, set_module
from fastlora.kernels.adapter_ref import check_activation
from fastlora.modules.adapter import FastAdapter

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ADAPTER_TYPE = "BOTTLENECK"  # adapter_config.json's peft_type: peft and fastlora.load reject it clearly
_ADAPTER_NAME = "default"  # the ModulesToSave copy this model trains

# Per architecture and placement: (regex over the full module path, wrapper mode).
# Modes: "output" adapts the module's output; "parallel" adds the adapter of the module's first
# input to its output; "skip_input" passes the module's residual input (2nd argument) through a
# serial adapter, i.e. a parallel adapter to the sublayer the module adds to that residual.
_LLAMA = {
    "houlsby": ((r"(.*\.)?layers\.\d+\.self_attn", "output"), (r"(.*\.)?layers\.\d+\.mlp", "output")),
    "pfeiffer": ((r"(.*\.)?layers\.\d+\.mlp", "output"),),
    "parallel": ((r"(.*\.)?layers\.\d+\.mlp", "parallel"),),
}
_BERT = {
    "houlsby": (
        (r"(.*\.)?layer\.\d+\.attention\.output\.dense", "output"),
        (r"(.*\.)?layer\.\d+\.output\.dense", "output"),
    ),
    "pfeiffer": ((r"(.*\.)?layer\.\d+\.output\.dense", "output"),),
    "parallel": ((r"(.*\.)?layer\.\d+\.output", "skip_input"),),
}
AUTO_TARGETS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "bert": _BERT,
    "roberta": _BERT,
}


@dataclasses.dataclass
class AdapterConfig:
    """Bottleneck-adapter hyperparameters and placement.

    Attributes:
        r: bottleneck size, 1 <= r < d_model of every adapted module.
        activation: "relu", "gelu" (exact), "gelu_tanh" or "silu".
        dropout: dropout on the bottleneck activation while training, in [0, 1).
        placement: "houlsby", "pfeiffer" or "parallel" (see the module docstring).
        target_modules: None to choose by architecture (model_type llama, mistral, qwen2, bert,
            roberta); else module names or name suffixes ("mlp" matches "model.layers.0.mlp"), or one
            regex matched against the full name. Houlsby/Pfeiffer adapt the targets' outputs;
            "parallel" adds the adapter of a target's first input to its output.
        modules_to_save: modules trained in full beside the adapters (e.g. "classifier").
    """

    r: int = 16
    activation: str = "gelu"
    dropout: float = 0.0
    placement: str = "houlsby"
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"AdapterConfig: r must be an int >= 1, got {self.r!r}")
        check_activation(self.activation, where="AdapterConfig")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig: unknown placement {self.placement!r}; known: {', '.join(PLACEMENTS)}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        t = self.target_modules
        if not (t is None or isinstance(t, str) or (isinstance(t, list) and t and all(isinstance(n, str) for n in t))):
            raise ValueError(f"AdapterConfig: target_modules must be None, a regex or a list of names, got {t!r}")
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        m = self.modules_to_save
        if not (m is None or (isinstance(m, list) and all(isinstance(n, str) and n for n in m))):
            raise ValueError(f"AdapterConfig: modules_to_save must be None or a list of names, got {m!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": ADAPTER_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Any, *, where: str = CONFIG_NAME) -> AdapterConfig:
        """Read :meth:`to_dict`'s output; anything else is a ``ValueError`` naming ``where``."""
        if not isinstance(d, dict):
            raise ValueError(f"fastlora: {where}: expected a JSON object, found {type(d).__name__}")
        kind = d.get("peft_type")
        if kind != ADAPTER_TYPE:
            hint = " (a LoRA adapter: load it with fastlora.load)" if kind == "LORA" else ""
            raise ValueError(f"fastlora: {where}: peft_type must be {ADAPTER_TYPE!r}, found {kind!r}{hint}")
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in fields})
        except (TypeError, ValueError) as e:
            raise ValueError(f"fastlora: {where}: {e}") from e


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


def _outermost(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in found if not any(p.startswith(q + ".") for q, _ in found if q != p)]


def _close_names(wanted: list[str], modules: list[str]) -> str:
    names = sorted({p.rpartition(".")[2] for p in modules} | set(modules))
    close = sorted({c for w in wanted for c in difflib.get_close_matches(w, names, n=4, cutoff=0.5)})
    return f"; close names: {', '.join(close)}" if close else ""


def _hidden_size(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    return size if isinstance(size, int) else None


def _plan(model: nn.Module, config: AdapterConfig) -> tuple[list[tuple[str, nn.Module, str, int]], list]:
    """(path, module, mode, d_model) of every adapter and (path, module) of every modules_to_save
    entry, without touching the model; every selection problem is a ValueError."""
    host = type(model).__name__
    modules = [(p, m) for p, m in model.named_modules() if p]
    paths = [p for p, _ in modules]
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in AUTO_TARGETS:
            raise ValueError(
                f"fastlora: no automatic adapter targets for {host} (model_type {model_type!r}; known: "
                f"{', '.join(AUTO_TARGETS)}); pass AdapterConfig(target_modules=[...]) with module names"
            )
        rules = AUTO_TARGETS[model_type][config.placement]
        found = []
        for pattern, mode in rules:
            hits = [(p, m, mode) for p, m in modules if re.fullmatch(pattern, p)]
            if not hits:
                leaf = pattern.rsplit("\\.", 1)[-1]
                raise ValueError(
                    f"fastlora: placement {config.placement!r} for model_type {model_type!r} expects modules "
                    f"matching {pattern!r} and {host} has none{_close_names([leaf], paths)}"
                )
            found += hits
    else:
        target = config.target_modules
        if isinstance(target, str):
            hits = [(p, m) for p, m in modules if re.fullmatch(target, p)]
        else:
            hits = [(p, m) for p, m in modules if any(p == t or p.endswith("." + t) for t in target)]
        if not hits:
            wanted = [target] if isinstance(target, str) else target
            raise ValueError(
                f"fastlora: target_modules {target!r} matched no module of {host}{_close_names(wanted, paths)}"
            )
        mode = "parallel" if config.placement == "parallel" else "output"
        found = [(p, m, mode) for p, m in _outermost(hits)]

    plan = []
    for path, module, mode in found:
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
        if not 0 < config.r < d_model:
            raise ValueError(
                f"fastlora: r={config.r} must be in [1, d_model - 1] = [1, {d_model - 1}] for {path} "
                f"(d_model={d_model})"
            )
        plan.append((path, module, mode, d_model))

    saved = []
    for name in config.modules_to_save or []:
        hits = [(p, m) for p, m in modules if p == name or p.endswith("." + name)]
        if not hits:
            raise ValueError(
                f"fastlora: modules_to_save {name!r} matched no module of {host}{_close_names([name], paths)}"
            )
        saved += _outermost(hits)
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


class AdapterModel(WrappedModel):
    """A frozen host model with bottleneck adapters (and optional modules_to_save copies) that train.

    The host is modified in place and stays reachable as ``.model``; unknown attributes
    (``config``, ``generate``, ``activation_checkpointing_enable``...) are forwarded to it.
    Build it with :func:`inject_adapters` or :func:`load_adapters`.
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
            wrapper.add(_ADAPTER_NAME)
            wrapper.active_adapter = _ADAPTER_NAME
            set_module(model, path, wrapper)
        self.model = model
        self.training = model.training  # an eval-mode host stays in eval mode (adapter dropout off)
        self.adapter_config = config

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """(path in the host, layer) of every adapted module."""
        for path, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield path, module

    def disable_adapters(self) -> contextlib.AbstractContextManager[None]:
        """Within the block the model is exactly the host: no adapters, original modules_to_save."""
        return self._disabled(m for _, m in self.adapter_layers())

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
            for key, value in module.trained[_ADAPTER_NAME].state_dict().items():
                out[f"{path}.{key}"] = value
        return out

    def save_adapter(self, directory: str) -> None:
        """Write ``adapter_model.safetensors`` (the trained tensors only) and ``adapter_config.json``,
        each atomically (temporary file + rename), weights first."""
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        meta = {"format": "pt", "fastlora_adapter": ADAPTER_TYPE}
        atomic_write(os.path.join(directory, WEIGHTS_NAME), save(tensors, metadata=meta))
        config = {**self.adapter_config.to_dict(), "base_model_class": type(self.model).__name__}
        config["model_type"] = getattr(getattr(self.model, "config", None), "model_type", None)
        atomic_write(os.path.join(directory, CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True).encode())

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


def _read(directory: str) -> tuple[AdapterConfig, dict[str, Any], dict[str, torch.Tensor]]:
    raw, tensors = read_files(directory)
    return AdapterConfig.from_dict(raw, where=os.path.join(directory, CONFIG_NAME)), raw, tensors


def load_adapters(model: nn.Module, directory: str, *, is_trainable: bool = False) -> AdapterModel:
    """``model`` with the adapters saved in ``directory`` by :meth:`AdapterModel.save_adapter`.

    Every key and shape is checked against ``model`` before it is touched: on any error (missing or
    corrupt files, another architecture, other widths or r) a ``ValueError``/``FileNotFoundError``
    names the problem and the model is left unchanged. ``is_trainable=False`` loads for inference
    (nothing requires grad).
    """
    config, raw, tensors = _read(directory)
    source = raw.get("base_model_class") or "an unknown model"
    here = type(model).__name__
    try:
        plan, saved = _plan(model, config)
    except ValueError as e:
        reason = str(e).removeprefix("fastlora: ")
        raise ValueError(f"fastlora: {directory}: adapters saved from {source} do not fit {here}: {reason}") from e
    expected: dict[str, tuple[int, ...]] = {}
    for path, _, _, d in plan:
        r = config.r
        expected.update({f"{path}.adapter.w_down": (r, d), f"{path}.adapter.b_down": (r,)})
        expected.update({f"{path}.adapter.w_up": (d, r), f"{path}.adapter.b_up": (d,)})
    for path, module in saved:
        expected.update({f"{path}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        what = f"key {unknown[0]!r} has no place in {here}" if unknown else f"{here} needs {missing[0]!r}"
        raise ValueError(
            f"fastlora: {directory}: adapters saved from {source} do not fit {here}: {what} "
            f"({len(unknown)} unexpected, {len(missing)} missing keys)"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"fastlora: {directory}: {key} has shape {tuple(tensors[key].shape)}, {here} needs {shape}"
            )
    adapted = AdapterModel(model, config)
    own = adapted.adapter_state_dict()
    with torch.no_grad():
        for key, tensor in tensors.items():
            own[key].copy_(tensor)
    if not is_trainable:
        adapted.requires_grad_(False)
    return adapted


__all__ = [
    "ADAPTER_TYPE",
    "AUTO_TARGETS",
    "PLACEMENTS",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterModel",
    "inject_adapters",
    "load_adapters",
]
