"""The one protocol every fine-tuning method's model answers, so callers (the trainer, the CLI) treat LoRA,
bottleneck adapters and prompts alike: a table over this, not if-ladders.

=====================  ==========================  ==========================  ==========================
protocol               LoraModel                   AdapterModel (bottleneck)   PromptModel
=====================  ==========================  ==========================  ==========================
``method_config``      the active adapter's        ``adapter_config``          ``peft_config`` (one config)
                       LoraConfig (``peft_config``
                       holds all, by name)
``modules_to_save``    paths of the per-adapter    paths of the one trained    paths of the heads trained
                       ModulesToSave copies        ModulesToSave copy          in place
``save(dir)``          ``save_adapter``            ``save_adapter``            ``save_adapter``
``Cls.load(m, dir)``   ``fastlora.load``           ``load_adapters``           ``load_prompt``
``disable()``          ``disable_adapter()``       ``disable_adapters()``      prompt off (heads stay)
reports                ``parameter_counts()``, ``trainable_report()``, ``print_trainable_parameters()``
=====================  ==========================  ==========================  ==========================

The config is ``method_config``, not ``config``: a wrapped model forwards ``config`` to its host (the
transformers config), as peft does. Full fine-tuning and feature extraction train the host itself (no wrapper);
:mod:`fastlora.methods.full` gives them ``save_trainable`` / ``load_trainable`` instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fastlora.methods.report import TrainableReport


@runtime_checkable
class Method(Protocol):
    """A host model wrapped by one fine-tuning method (see the module docstring for each method's names)."""

    @property
    def method_config(self) -> Any:
        """The method's config (a dataclass with the method's hyperparameters)."""

    @property
    def modules_to_save(self) -> list[str]:
        """Paths in the host of the modules trained in full beside the method (task heads...)."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors :meth:`save` writes by default, under the names of the saved file."""

    def save(self, directory: str, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the method's files into ``directory`` (each atomically); ``tensors`` replaces
        :meth:`adapter_state_dict` (e.g. FSDP shards gathered by the caller)."""

    @classmethod
    def load(
        cls, model: nn.Module, directory: str, *, is_trainable: bool = False, allow_base_mismatch: bool = False
    ) -> Method:
        """``model`` (a fresh host) wrapped with the method saved in ``directory``; on any error the host is
        unchanged. ``is_trainable=False`` loads for inference (nothing requires grad). A tensor file that does
        not match its recorded sha256 is an error; so is a host that does not match the recorded base
        fingerprint, unless ``allow_base_mismatch=True`` (a warning then). See
        :mod:`fastlora.methods.fingerprint`."""

    def disable(self) -> contextlib.AbstractContextManager[None]:
        """Within the block the model computes what its host computes alone."""

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters, peft's counts (a packed 4-bit byte holds 2 values)."""

    def trainable_report(self) -> TrainableReport:
        """Name and size of every parameter that trains."""

    def print_trainable_parameters(self) -> None:
        """peft's one-line report."""
