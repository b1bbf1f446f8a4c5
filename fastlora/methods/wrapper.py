"""What every wrapped model shares (LoRA, bottleneck adapters, prompts): the host kept as ``.model`` with
unknown attributes forwarded to it, modules trained in full beside the method, disabling, parameter reports."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

from torch import nn

from fastlora.methods.report import TrainableReport, count_parameters, summary, trainable_report


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``, in the train/eval mode of the module it replaces."""
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    module.train(getattr(owner, name).training)
    setattr(owner, name, module)


class ModulesToSave(nn.Module):
    """A module trained in full beside a method: the frozen original plus one trainable copy per name
    (per LoRA adapter; a bottleneck model keeps one)."""

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
    ``generate``, ``gradient_checkpointing_enable``...) go to the host; the parts of the
    :class:`~fastlora.methods.base.Method` protocol every method answers the same way."""

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
        """(path in the host, module) of every module trained in full beside the method."""
        for path, module in self.model.named_modules():
            if isinstance(module, ModulesToSave):
                yield path, module

    @property
    def modules_to_save(self) -> list[str]:
        """Paths in the host of the modules trained in full beside the method."""
        return [path for path, _ in self.saved_modules()]

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

    def trainable_report(self) -> TrainableReport:
        """Name and size of every parameter that trains, with peft's totals."""
        return trainable_report(self)

    def print_trainable_parameters(self) -> None:
        print(summary(*self.parameter_counts()))
