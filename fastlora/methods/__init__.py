"""Fine-tuning methods over a host model, each answering one protocol (:class:`~fastlora.methods.base.Method`).

Base: base.py (the protocol), wrapper.py (the wrapped host, modules trained in full beside a method),
files.py (atomic writes, the two files of a saved method), targets.py (choosing modules by name, with close
names on a miss; the task-head names), tensors.py (checked copies of saved tensors into a model),
report.py (parameter counts).
Methods: lora/ (LoRA/QLoRA, peft-compatible), bottleneck/ (bottleneck adapters: Houlsby, Pfeiffer,
parallel), prompt/ (prompt tuning, P-tuning, prefix tuning), full.py (full fine-tuning, feature extraction,
discriminative / LoRA+ parameter groups: the host itself trains, no wrapper).
"""

from fastlora.methods.base import Method
from fastlora.methods.bottleneck import AdapterConfig, AdapterLayer, AdapterModel, inject_adapters, load_adapters
from fastlora.methods.full import (
    discriminative_param_groups,
    feature_extraction,
    full_finetune,
    layer_depths,
    load_trainable,
    loraplus_param_groups,
    save_trainable,
)
from fastlora.methods.lora import LoraConfig, LoraModel, inject, load
from fastlora.methods.prompt import (
    PrefixTuningConfig,
    PromptModel,
    PromptTuningConfig,
    PTuningConfig,
    inject_prompt,
    load_prompt,
    prefix_from_tokens,
)
from fastlora.methods.report import TrainableReport, count_parameters, trainable_report
from fastlora.methods.wrapper import ModulesToSave, WrappedModel

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "AdapterModel",
    "LoraConfig",
    "LoraModel",
    "Method",
    "ModulesToSave",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptModel",
    "PromptTuningConfig",
    "TrainableReport",
    "WrappedModel",
    "count_parameters",
    "discriminative_param_groups",
    "feature_extraction",
    "full_finetune",
    "inject",
    "inject_adapters",
    "inject_prompt",
    "layer_depths",
    "load",
    "load_adapters",
    "load_prompt",
    "load_trainable",
    "loraplus_param_groups",
    "prefix_from_tokens",
    "save_trainable",
    "trainable_report",
]
