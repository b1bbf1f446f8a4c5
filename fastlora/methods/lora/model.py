"""LoraModel: LoRA/QLoRA on a whole model: inject by name, several adapters, merge, peft-format save/load.

model = fastlora.inject(model, fastlora.LoraConfig(r=16, target_modules="all-linear", quantize="nf4"))
...train...
model.save_adapter("out/")                       # peft's adapter_config.json + adapter_model.safetensors
model = fastlora.load(base_model, "out/")        # or peft.PeftModel.from_pretrained(base_model, "out/")

"Adapter" here is peft's word for one named set of LoRA factors (``add_adapter``, ``active_adapter``...);
each layer keeps its share of it as a LoRA slot (:class:`~fastlora.modules.lora.LoraAdapter`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from fastlora.methods.fingerprint import base_fingerprint, check_integrity
from fastlora.methods.lora import multi
from fastlora.methods.lora.config import LoraConfig
from fastlora.methods.lora.files import PREFIX, read_lora_dir, save_lora_files
from fastlora.methods.lora.groups import disable_block_groups, enable_block_groups
from fastlora.methods.lora.init import changes_base, convert_to_plain_lora, init_layer
from fastlora.methods.lora.targets import (
    base_weights,
    bnb_linear4bit,
    expected_shapes,
    features,
    lora_targets,
    outside_copies,
    saved_targets,
)
from fastlora.methods.targets import present
from fastlora.methods.tensors import check_tensors, copy_checked
from fastlora.methods.wrapper import ModulesToSave, WrappedModel, set_module
from fastlora.modules.lora import FastLoRALinear
from fastlora.modules.lora_adapter import check_lora_hparams
from fastlora.quant import dequantize_4bit


class LoraModel(WrappedModel):
    """A host model whose selected linear layers are :class:`FastLoRALinear`, with named adapters.

    The host is modified in place and stays reachable as ``.model``; unknown attributes (``config``,
    ``generate``, ``gradient_checkpointing_enable``...) are forwarded to it. All base parameters
    are frozen; the active adapter's LoRA factors and its ``modules_to_save`` copies train.
    Implements :class:`~fastlora.methods.base.Method`; ``peft_config`` holds every adapter's config by name.
    """

    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, LoraModel):
            raise TypeError("fastlora: the model is already a LoraModel; use add_adapter / load_adapter on it")
        self.model = model
        self.training = model.training
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str | None = None
        model.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)

    @property
    def method_config(self) -> LoraConfig | None:
        """The active adapter's config (None without adapters)."""
        return self.peft_config.get(self.active_adapter) if self.active_adapter is not None else None

    # -- layers -------------------------------------------------------------------------------

    def lora_layers(self) -> Iterator[tuple[str, FastLoRALinear]]:
        """(path in the host model, layer) of every FastLoRALinear outside modules_to_save copies."""
        for path, module in self.model.named_modules():
            if isinstance(module, FastLoRALinear) and outside_copies(path):
                yield path, module

    # -- adapters -------------------------------------------------------------------------------

    def add_adapter(self, name: str, config: LoraConfig, *, init_base: bool = True) -> None:
        """Add adapter ``name`` to the layers ``config`` selects (wrapping new ones); the base is shared.

        PiSSA, OLoRA and LoftQ starts (``config.init_lora_weights``) rewrite each target's float base
        (``init_base=False``, as loading does: A and B from Kaiming, to be overwritten, the base untouched)."""
        base_init = init_base and changes_base(config.init_lora_weights)
        if name in self.peft_config:
            raise ValueError(f"fastlora: adapter {name!r} already exists (have {list(self.peft_config)})")
        targets, saved = lora_targets(self.model, config), saved_targets(self.model, config)
        for path, module in targets:  # validate everything before touching the model
            r, alpha = config.r_and_alpha(path)
            check_lora_hparams(*features(module), r, alpha, config.lora_dropout, config.init)
        try:
            for path, module in targets:
                r, alpha = config.r_and_alpha(path)
                hp = {"use_rslora": config.use_rslora, "init": config.init, "use_dora": config.use_dora}
                bnb4 = bnb_linear4bit()
                if base_init:  # PiSSA / OLoRA / LoftQ: a float nn.Linear only (checked there)
                    set_module(self.model, path, init_layer(module, config, r, alpha, name))
                elif isinstance(module, FastLoRALinear):
                    module.add_adapter(name, r, alpha, config.lora_dropout, **hp)
                elif not (bnb4 is not None and isinstance(module, bnb4)):  # nn.Linear (Linear4bit subclasses it)
                    new = FastLoRALinear.from_linear(module, r, alpha, config.lora_dropout, quant=config.quantize,
                                                     blocksize=config.blocksize, double_quant=config.double_quant,
                                                     adapter_name=name, **hp)  # fmt: skip
                    set_module(self.model, path, new)
                else:  # bnb.nn.Linear4bit, e.g. from transformers' BitsAndBytesConfig: shared as is
                    set_module(self.model, path, FastLoRALinear.from_bnb(module, r, alpha, config.lora_dropout,
                                                                          adapter_name=name, **hp))  # fmt: skip
            for path, module in saved:
                if not isinstance(module, ModulesToSave):
                    module = ModulesToSave(module)
                    set_module(self.model, path, module)
                module.add(name)
        except Exception:
            self.peft_config[name] = config
            self.delete_adapter(name)  # roll back what was added
            raise
        self.peft_config[name] = config
        self.set_adapter(self.active_adapter or name)
        fuse = config.fuse_blocks  # one op per shared-input block (methods/lora/groups.py); False removes them
        if fuse is False:
            disable_block_groups(self.model)
        else:
            enable_block_groups(self.model, None if fuse is True else fuse)

    def set_adapter(self, name: str) -> None:
        """Use adapter ``name`` in every layer (layers without it act as the base); only it trains."""
        self._require(name)
        for _, layer in self.lora_layers():
            if name in layer.adapters:
                layer.set_adapter(name)
            else:
                layer.active_adapter = None
            for slot_name, slot in layer.adapters.items():
                slot.requires_grad_(slot_name == name)
        for _, module in self.saved_modules():
            module.active_adapter = name
            for copy_name, copy_ in module.trained.items():
                copy_.requires_grad_(copy_name == name)
        self.active_adapter = name

    def disable(self) -> contextlib.AbstractContextManager[None]:
        """Within the block the model is exactly its base: no LoRA term, original modules_to_save."""
        return self._disabled(m for _, m in self.lora_layers())

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """peft's name for :meth:`disable`."""
        return self.disable()

    # many adapters on one base: methods/lora/multi.py
    forward, generate, mixed_batch = multi.forward, multi.generate, multi.mixed_batch
    train_adapters, hot_swap, unload_slot = multi.train_adapters, multi.hot_swap, multi.unload_slot
    adapter_slot, adapter_slots = multi.adapter_slot, multi.adapter_slots

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        for _, layer in self.lora_layers():
            if name in layer.adapters:
                layer.delete_adapter(name)
        for _, module in self.saved_modules():
            if name in module.trained:
                del module.trained[name]
        del self.peft_config[name]
        if self.active_adapter == name:
            self.active_adapter = None
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    def _require(self, name: str) -> LoraConfig:
        if name not in self.peft_config:
            raise KeyError(f"fastlora: no adapter named {name!r} (have {list(self.peft_config)})")
        return self.peft_config[name]

    @torch.no_grad()
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """New adapter with ``ΔW = Σ wᵢ ΔWᵢ`` exactly, per layer, by concatenating ranks (peft's "cat")."""
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"fastlora: {len(adapters)} adapters but {len(weights)} weights")
        configs = [self._require(a) for a in adapters]
        if any(c.use_dora for c in configs):
            raise ValueError("fastlora: DoRA adapters cannot be combined (the magnitudes do not add)")
        if any(c.modules_to_save for c in configs):
            raise ValueError("fastlora: adapters with modules_to_save cannot be combined")
        if adapter_name in self.peft_config:
            raise ValueError(f"fastlora: adapter {adapter_name!r} already exists")
        ranks: dict[str, int] = {}
        for path, layer in self.lora_layers():
            present_here = [a for a in adapters if a in layer.adapters]
            if present_here:
                ranks[path] = sum(layer.adapters[a].r for a in present_here)
        r = max(ranks.values())
        config = LoraConfig(
            r=r,
            lora_alpha=float(r),
            target_modules=sorted(ranks),
            rank_pattern={re.escape(p): k for p, k in ranks.items() if k != r},
            alpha_pattern={re.escape(p): float(k) for p, k in ranks.items() if k != r},
            lora_dropout=configs[0].lora_dropout,
            init_lora_weights=False,
        )
        self.add_adapter(adapter_name, config)
        for path, layer in self.lora_layers():
            if path not in ranks:
                continue
            slots = [(layer.adapters[a], w) for a, w in zip(adapters, weights, strict=True) if a in layer.adapters]
            new = layer.adapters[adapter_name]  # scaling 1: alpha = r
            new.lora_A.copy_(torch.cat([s.lora_A.float() for s, _ in slots], 0))
            new.lora_B.copy_(torch.cat([w * s.scaling * s.lora_B.float() for s, w in slots], 1))

    # -- merge ----------------------------------------------------------------------------------

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """The host model with every LoRA layer folded into a plain ``nn.Linear`` (4-bit bases dequantised
        to their original dtype) and modules_to_save replaced by their trained copies."""
        for path, layer in list(self.lora_layers()):
            state = layer.quant_state
            dtype = layer.weight.dtype if state is None else state.dtype
            if layer.active_adapter is not None and not layer.disabled and not layer.merged:
                weight = layer.merged_weight()  # fp32 W + s·B A (a 4-bit W: the native merge kernel where built)
            else:
                weight = layer.weight if state is None else dequantize_4bit(layer.weight, state, torch.float32)
            weight = weight.to(dtype)  # one rounding to the model dtype
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=weight.device, dtype=weight.dtype)  # fmt: skip
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
            linear.requires_grad_(False)
            set_module(self.model, path, linear)
        disable_block_groups(self.model)
        for path, module in list(self.saved_modules()):
            set_module(self.model, path, module.current)
        return self.model

    # -- save / load ----------------------------------------------------------------------------

    def adapter_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """peft-named tensors of adapter ``name`` (default: the active one)."""
        name = name or self.active_adapter
        self._require(name)
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.lora_layers():
            if name in layer.adapters:
                out[f"{PREFIX}{path}.lora_A.weight"] = layer.adapters[name].lora_A
                out[f"{PREFIX}{path}.lora_B.weight"] = layer.adapters[name].lora_B
                if hasattr(layer.adapters[name], "lora_magnitude_vector"):  # DoRA, peft's key
                    out[f"{PREFIX}{path}.lora_magnitude_vector"] = layer.adapters[name].lora_magnitude_vector
        for path, module in self.saved_modules():
            if name in module.trained:
                for key, value in module.trained[name].state_dict().items():
                    out[f"{PREFIX}{path}.{key}"] = value
        return out

    def save(
        self,
        directory: str,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        adapter_name: str | None = None,
        path_initial_model_for_weight_conversion: str | None = None,
    ) -> None:
        """Write adapter ``adapter_name`` (default: the active one) in peft's layout (safetensors +
        adapter_config.json), each file atomically; ``tensors`` replaces its :meth:`adapter_state_dict`.
        The config records the weights' sha256 and a fingerprint of the adapted base weights as loaded.

        ``path_initial_model_for_weight_conversion`` (peft's name): the directory of this PiSSA/OLoRA adapter saved
        right after its start; the adapter is written as a plain rank-2r LoRA of the original base instead
        (:func:`~fastlora.methods.lora.init.convert_to_plain_lora`), with no base fingerprint (not this base)."""
        name = adapter_name or self.active_adapter
        config = dataclasses.replace(self._require(name), inference_mode=True)
        layers = [(path, layer) for path, layer in self.lora_layers() if name in layer.adapters]
        tensors = self.adapter_state_dict(name) if tensors is None else tensors
        fingerprint = base_fingerprint(base_weights(layers))
        if path_initial_model_for_weight_conversion is not None:
            initial_dir = path_initial_model_for_weight_conversion
            config, tensors = convert_to_plain_lora(config, tensors, read_lora_dir(initial_dir)[1], initial_dir)
            fingerprint = None
        save_lora_files(directory, config, tensors, base_fingerprint=fingerprint)

    def save_adapter(self, directory: str, adapter_name: str | None = None) -> None:
        """Write only the adapter (peft layout, safetensors + adapter_config.json), each file atomically."""
        self.save(directory, adapter_name=adapter_name)

    @classmethod
    def load(
        cls,
        model: nn.Module,
        directory: str,
        adapter_name: str = "default",
        is_trainable: bool = False,
        *,
        allow_base_mismatch: bool = False,
    ) -> LoraModel:
        """A base model plus the adapter saved in ``directory`` (by fastlora or peft); see :meth:`load_adapter`."""
        lora = model if isinstance(model, LoraModel) else cls(model)
        lora.load_adapter(directory, adapter_name, is_trainable=is_trainable, allow_base_mismatch=allow_base_mismatch)
        return lora

    def load_adapter(
        self,
        directory: str,
        adapter_name: str = "default",
        is_trainable: bool = True,
        *,
        allow_base_mismatch: bool = False,
    ) -> None:
        """Load an adapter saved by fastlora or by ``peft``; on any error the model is left unchanged.

        A tensor file whose sha256 differs from the one its config records is an error naming it. An
        adapter whose recorded base fingerprint does not match this model's adapted weights (another base
        of the same shapes) is an error too, or with ``allow_base_mismatch=True`` a warning and a load.
        peft's files record neither and load unchecked.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"fastlora: adapter {adapter_name!r} is already loaded (have {list(self.peft_config)})")
        config, tensors, record = read_lora_dir(directory)
        if config.modules_to_save:  # peft lists both "classifier" and "score" for SEQ_CLS: keep those present
            kept = present(self.model, config.modules_to_save, any_suffix=True)
            config = dataclasses.replace(config, modules_to_save=kept or None)
        expected = expected_shapes(self.model, config)
        host = type(self.model).__name__
        options = {
            "unknown": f"key {{key!r}} has no place in {host} under this adapter's config",
            "note": f"; expected keys like {next(iter(expected), None)!r}",
        }
        check_tensors(expected, tensors, directory, **options)
        # after the names and shapes, which say more precisely what does not fit
        check_integrity(directory, record, base_weights(lora_targets(self.model, config)),
                        allow_base_mismatch=allow_base_mismatch)  # fmt: skip
        self.add_adapter(adapter_name, config, init_base=False)
        copy_checked(self.adapter_state_dict(adapter_name), tensors, directory, **options)
        if not is_trainable:
            self._freeze(adapter_name)

    def _freeze(self, name: str) -> None:
        for _, layer in self.lora_layers():
            if name in layer.adapters:
                layer.adapters[name].requires_grad_(False)
        for _, module in self.saved_modules():
            if name in module.trained:
                module.trained[name].requires_grad_(False)


def inject(
    model: nn.Module, config: LoraConfig | None = None, *, adapter_name: str = "default", **overrides
) -> LoraModel:
    """Turn ``model`` into a LoRA/QLoRA model: the layers ``config.target_modules`` selects become
    FastLoRALinear (4-bit with ``quantize="nf4"``); ``overrides`` replace config fields.

    A model already holding ``bnb.nn.Linear4bit`` layers (transformers' BitsAndBytesConfig) is used
    as is. On a :class:`LoraModel`, adds another adapter.
    """
    config = dataclasses.replace(config or LoraConfig(), **overrides)
    if isinstance(model, LoraModel):
        model.add_adapter(adapter_name, config)
        return model
    return LoraModel(model, config, adapter_name)


def load(
    model: nn.Module,
    directory: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    *,
    allow_base_mismatch: bool = False,
) -> LoraModel:
    """A base model plus the adapter saved in ``directory`` (by fastlora or peft): :meth:`LoraModel.load`
    (``allow_base_mismatch=True``: load on another base than the recorded one, with a warning)."""
    return LoraModel.load(model, directory, adapter_name, is_trainable, allow_base_mismatch=allow_base_mismatch)
