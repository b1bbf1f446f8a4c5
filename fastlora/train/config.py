"""The settings of one fine-tuning run: defaults, YAML files, command-line overrides."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from fastlora.train.methods import DEFAULT_LR, METHODS, RECIPES


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs. ``None`` fields take a default that depends on the method or data.

    Data: ``model`` (a local transformers model directory; None: the embedded all-MiniLM-L6-v2),
    ``data`` (JSONL/CSV; None: the embedded generated topic set), ``val_data`` or ``val_split``.
    Optimisation: AdamW with ``lr`` (default per method), ``weight_decay`` (not on biases and norms),
    ``warmup_ratio`` of the steps linearly up, then ``schedule`` ("cosine", "linear", "constant")
    down; ``grad_accum`` micro-batches per step; gradients clipped to ``max_grad_norm``;
    ``layer_decay`` (discriminative rates: the rate shrinks by this factor per layer towards the
    embeddings) and ``loraplus_ratio`` (LoRA+: B learns this many times faster than A).
    Precision: ``precision`` "fp32", "bf16" or "fp16" autocast ("auto": bf16 on a GPU that has it,
    else fp32). Evaluation every ``eval_every`` steps (default: each epoch), early stopping after
    ``patience`` evaluations without a better validation loss.
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
    target_modules: Any = "all-linear"
    adapter_r: int = 16
    adapter_placement: str = "houlsby"
    num_virtual_tokens: int = 16
    ptuning_encoder: str = "mlp"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    max_length: int = 256
    eval_every: int | None = None
    patience: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    on_bad_line: str = "error"
    resume: bool = False
    fsdp: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.schedule in ("cosine", "linear", "constant"), f"schedule {self.schedule!r} unknown"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), f"precision {self.precision!r} unknown"),
            (self.task in (None, "classification", "causal"), f"task {self.task!r} unknown"),
            (self.on_bad_line in ("error", "skip"), f"on_bad_line must be error or skip, got {self.on_bad_line!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]"),
            (self.loraplus_ratio is None or self.loraplus_ratio > 0, "loraplus_ratio must be > 0"),
            (self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}"),
            (self.patience is None or self.patience >= 1, "patience must be >= 1"),
            (self.eval_every is None or self.eval_every >= 1, "eval_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"fastlora: {message}")
        if self.loraplus_ratio is not None and not RECIPES[self.method].lora:
            raise ValueError(f"fastlora: loraplus_ratio applies to lora/qlora, not {self.method!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def method_options(self) -> dict[str, Any]:
        keys = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "adapter_r", "adapter_placement",
                "num_virtual_tokens", "ptuning_encoder")  # fmt: skip
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
                   "lora_r", "adapter_r", "num_virtual_tokens", "max_length", "val_split", "val_data")  # fmt: skip
