"""The settings of one fine-tuning run: defaults, YAML files, command-line overrides."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

from fastlora.train.jobs import normalize_jobs
from fastlora.train.methods import DEFAULT_LR, INITS, METHODS, RECIPES

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")  # torch's AdamW, then bitsandbytes'


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs. ``None`` fields take a default that depends on the method or data.

    Data: ``model`` (a local transformers model directory; None: the embedded all-MiniLM-L6-v2),
    ``data`` (JSONL/CSV; None: the embedded generated topic set), ``val_data`` or ``val_split``.
    Optimisation: AdamW with ``lr`` (default per method), ``weight_decay`` (not on biases and norms),
    ``warmup_ratio`` of the steps linearly up, then ``schedule`` ("cosine", "linear", "constant")
    down; ``grad_accum`` micro-batches per step; gradients clipped to ``max_grad_norm``
    (None, or "none" on the command line: no clipping);
    ``layer_decay`` (discriminative rates: the rate shrinks by this factor per layer towards the
    embeddings) and ``loraplus_ratio`` (LoRA+: B learns this many times faster than A).
    Precision: ``precision`` "fp32", "bf16" or "fp16" autocast ("auto": bf16 on a GPU that has it,
    else fp32). Evaluation every ``eval_every`` steps (default: each epoch), early stopping after
    ``patience`` evaluations without a better validation loss.

    Every numeric field is range-checked here (``ValueError`` naming the field and its flag), so a bad value
    stops a run before any model loads; see ``NUMERIC_FIELDS`` for the ranges.
    """

    model: str | None = None
    data: str | None = None
    val_data: str | None = None
    val_split: float = 0.1
    task: str | None = None  # "classification" | "causal"; None: from the data
    method: str = "qlora"
    output_dir: str = "fastlora-run"
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None
    schedule: str = "cosine"
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    layer_decay: float | None = None
    loraplus_ratio: float | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    dora: bool = False
    init: str = "kaiming"
    loftq_iter: int = 1
    target_modules: Any = "all-linear"
    adapter_r: int = 16
    adapter_placement: str = "houlsby"
    num_virtual_tokens: int = 16
    ptuning_encoder: str = "mlp"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # keep the tensors saved for backward in CPU memory (pinned on a GPU)
    optim: str = "adamw"  # adamw (torch) | adamw8bit | paged_adamw | paged_adamw8bit (bitsandbytes)
    chunked_ce: str = "on"  # causal LM: the loss without [tokens, vocab] logits (train/chunked_ce.py)
    ce_chunk_tokens: int | None = None  # tokens per chunk; None: 256 MiB of fp32 logits per chunk
    packing: str = "on"  # causal LM: a micro-batch's examples packed into rows without padding (train/packing.py)
    max_length: int = 256
    eval_every: int | None = None
    patience: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    on_bad_line: str = "error"
    resume: bool = False
    overwrite: bool = False  # start afresh in an output_dir that holds another run (its files are deleted)
    fsdp: bool = False
    progress: bool = True
    jobs: Any = None  # several LoRA jobs on one base: a list of job mappings (train/jobs.py, train/multijob.py)

    def __post_init__(self) -> None:
        self._check_numbers()
        self.jobs = normalize_jobs(self.jobs)
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.schedule in ("cosine", "linear", "constant"), f"schedule {self.schedule!r} unknown"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), f"precision {self.precision!r} unknown"),
            (self.task in (None, "classification", "causal"), f"task {self.task!r} unknown"),
            (self.optim in OPTIMIZERS, f"optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}"),
            (self.chunked_ce in ("on", "off"), f"chunked_ce must be on or off, got {self.chunked_ce!r}"),
            (self.packing in ("on", "off"), f"packing must be on or off, got {self.packing!r}"),
            (self.on_bad_line in ("error", "skip"), f"on_bad_line must be error or skip, got {self.on_bad_line!r}"),
            (self.adapter_placement in ("houlsby", "pfeiffer", "parallel"),
             f"adapter_placement {self.adapter_placement!r} unknown (houlsby, pfeiffer or parallel)"),
            (self.init in INITS, f"init {self.init!r} unknown ({', '.join(INITS)})"),
            (self.ptuning_encoder in ("mlp", "lstm"),
             f"ptuning_encoder {self.ptuning_encoder!r} unknown (mlp or lstm)"),
            (isinstance(self.output_dir, str) and self.output_dir.strip() != "", "output_dir must be a non-empty path"),
            (_names(self.target_modules),
             f"target_modules must be a name or a list of names, got {self.target_modules!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"fastlora: {message}")
        if self.loraplus_ratio is not None and not RECIPES[self.method].lora:
            raise ValueError(f"fastlora: loraplus_ratio applies to lora/qlora, not {self.method!r}")

    def _check_numbers(self) -> None:
        """Every numeric field converted to its type (a YAML file may hold ``lr: 1e-4``, which YAML reads as a
        string) and checked against its range, so a bad value stops the run before any model loads."""
        for name, kind, ok, wanted in NUMERIC_FIELDS:
            value = getattr(self, name)
            if name == "max_grad_norm" and isinstance(value, str) and value.strip().lower() in ("none", "off"):
                value = None
            if value is None and name in _OPTIONAL:
                setattr(self, name, None)
                continue
            value = _number(name, value, kind)
            if not ok(value):
                hint = _HINTS.get(name, "")
                raise ValueError(f"fastlora: {name} ({_flag(name)}) must be {wanted}, got {value!r}{hint}")
            setattr(self, name, value)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def method_options(self) -> dict[str, Any]:
        keys = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "adapter_r", "adapter_placement",
                "num_virtual_tokens", "ptuning_encoder", "dora", "init", "loftq_iter")  # fmt: skip
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> TrainConfig:
        """Settings from a YAML file (keys are the field names; '-' may replace '_'), then ``overrides``."""
        import yaml

        if not os.path.isfile(path):
            raise ValueError(f"fastlora: config file {path} does not exist")
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"fastlora: {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"fastlora: {path} must hold a mapping of settings")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k.replace("-", "_"): v for k, v in raw.items()}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"fastlora: {path}: unknown setting(s) {unknown}")
        values.update(overrides)
        return cls(**values)

    # which settings must match for --resume to continue a run
    RESUME_KEYS = ("model", "data", "method", "task", "batch_size", "grad_accum", "seed", "epochs", "max_steps",
                   "lora_r", "adapter_r", "num_virtual_tokens", "max_length", "val_split", "val_data", "dora", "init",
                   "loftq_iter", "optim", "chunked_ce", "packing")  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _names(value: Any) -> bool:
    """A module name pattern (str) or a non-empty list of them."""
    if isinstance(value, str):
        return value.strip() != ""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) and v for v in value)


def _number(name: str, value: Any, kind: type) -> int | float:
    """``value`` as ``kind`` (int or float); a string holding a number is read (YAML gives "1e-4" as a string),
    a bool, a non-integral float for an int field or a non-finite float is a ValueError naming the field."""
    what = "an integer" if kind is int else "a finite number"
    original = value
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            raise ValueError(f"fastlora: {name} ({_flag(name)}) must be {what}, got {original!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"fastlora: {name} ({_flag(name)}) must be {what}, got {original!r}")
    if not math.isfinite(value):
        raise ValueError(f"fastlora: {name} ({_flag(name)}) must be finite, got {original!r}")
    if kind is int:
        if value != int(value):
            raise ValueError(f"fastlora: {name} ({_flag(name)}) must be {what}, got {original!r}")
        return int(value)
    return float(value)


# (field, type, test, what the test wants): every numeric TrainConfig field. None is allowed for _OPTIONAL ones
# (their default depends on the method or the data, or None switches the feature off).
NUMERIC_FIELDS: tuple[tuple[str, type, Callable[[Any], bool], str], ...] = (
    ("val_split", float, lambda v: 0 < v < 1, "in (0, 1)"),
    ("epochs", int, lambda v: v >= 1, ">= 1"),
    ("max_steps", int, lambda v: v >= 1, ">= 1"),
    ("batch_size", int, lambda v: v >= 1, ">= 1"),
    ("grad_accum", int, lambda v: v >= 1, ">= 1"),
    ("lr", float, lambda v: v > 0, "> 0"),
    ("warmup_ratio", float, lambda v: 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", float, lambda v: v >= 0, ">= 0"),
    ("max_grad_norm", float, lambda v: v > 0, "> 0"),
    ("layer_decay", float, lambda v: 0 < v <= 1, "in (0, 1]"),
    ("loraplus_ratio", float, lambda v: v > 0, "> 0"),
    ("lora_r", int, lambda v: v >= 1, ">= 1"),
    ("lora_alpha", float, lambda v: v > 0, "> 0"),
    ("lora_dropout", float, lambda v: 0 <= v < 1, "in [0, 1)"),
    ("loftq_iter", int, lambda v: v >= 1, ">= 1"),
    ("adapter_r", int, lambda v: v >= 1, ">= 1"),
    ("num_virtual_tokens", int, lambda v: v >= 1, ">= 1"),
    ("max_length", int, lambda v: v >= 8, ">= 8"),
    ("eval_every", int, lambda v: v >= 1, ">= 1"),
    ("patience", int, lambda v: v >= 1, ">= 1"),
    ("save_every", int, lambda v: v >= 1, ">= 1"),
    ("keep_checkpoints", int, lambda v: v >= 1, ">= 1"),
    ("log_every", int, lambda v: v >= 1, ">= 1"),
    ("seed", int, lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("ce_chunk_tokens", int, lambda v: v >= 1, ">= 1"),
)
_OPTIONAL = {"max_steps", "lr", "max_grad_norm", "layer_decay", "loraplus_ratio", "eval_every", "patience",
             "save_every", "ce_chunk_tokens"}  # fmt: skip
_HINTS = {
    "max_grad_norm": " (pass none to train without clipping; 0 would zero every gradient, < 0 trains uphill)",
    "keep_checkpoints": " (the newest checkpoints kept; 1 keeps only the last)",
}
