"""What every wrapped model shares (LoRA, bottleneck adapters, prompts): the host kept as ``.model`` with
unknown attributes forwarded to it, modules trained in full beside the adapters, parameter reports."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of ``module``; a packed 4-bit (uint8) tensor counts its 2 values per byte."""
    trainable = total = 0
    for p in module.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``, in the train/eval mode of the module it replaces."""
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    module.train(getattr(owner, name).training)
    setattr(owner, name, module)


class ModulesToSave(nn.Module):
    """A module trained in full beside the adapters: the frozen original plus one trainable copy per adapter."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original.requires_grad_(False)
        self.trained = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        self.trained[name] = copy.deepcopy(self.original).requires_grad_(True)

    @property
    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.trained:
            return self.original
        return self.trained[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current, name)  # e.g. `classifier.weight` read by the host model


class WrappedModel(nn.Module):
    """Base of the models that wrap a host (``self.model``): calls and unknown attributes (``config``,
    ``generate``, ``gradient_checkpointing_enable``...) go to the host; peft's parameter report."""

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self._modules["model"], name)

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        """(path in the host, module) of every module trained in full beside the adapters."""
        for path, module in self.model.named_modules():
            if isinstance(module, ModulesToSave):
                yield path, module

    @contextlib.contextmanager
    def _disabled(self, layers: Iterable[nn.Module]) -> Iterator[None]:
        """Within the block ``layers`` and every modules_to_save are ``disabled`` (the host's own
        behaviour); each one's previous state comes back afterwards, also on an exception."""
        layers = [*layers, *(m for _, m in self.saved_modules())]
        previous = [m.disabled for m in layers]
        try:
            for m in layers:
                m.disabled = True
            yield
        finally:
            for m, state in zip(layers, previous, strict=True):
                m.disabled = state

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; a packed 4-bit tensor counts its 2 values per byte."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.parameter_counts()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )
