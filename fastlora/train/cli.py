"""``fastlora finetune | merge | generate | eval | compare``: the parsers of fastlora.train's commands (their
bodies and error handling are in :mod:`fastlora.train.commands`)."""

from __future__ import annotations

import argparse
import dataclasses
import math

from fastlora.train.config import NUMERIC_FIELDS, TrainConfig
from fastlora.train.methods import METHODS

_BOOL = {"gradient_checkpointing", "resume", "fsdp", "overwrite"}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as --flag (default None: the YAML file or the built-in default decides)."""
    help_ = {
        "model": "local transformers model directory (default: the embedded all-MiniLM-L6-v2)",
        "data": "JSONL/CSV: {text,label} for classification, {instruction,input?,output} or {messages} for causal LM "
        "(default: an embedded generated 4-topic sentence set)",
        "val_data": "validation file (default: hold out --val-split of --data)",
        "method": "what to train",
        "lr": "peak learning rate (default per method: full 2e-5, lora/qlora 2e-4, adapter/head 1e-3, prompts 1e-2+)",
        "layer_decay": "discriminative learning rates: multiply the rate by this per layer below the top",
        "loraplus_ratio": "LoRA+: B's rate is this times A's (lora/qlora)",
        "patience": "early stopping: evaluations without a better validation loss before stopping",
        "eval_every": "evaluate every N optimiser steps (default: every epoch)",
        "precision": "autocast dtype (auto: bf16 on a GPU that has it, else fp32)",
        "on_bad_line": "a malformed data line stops the run (error) or is skipped with a warning (skip)",
        "fsdp": "shard with FSDP2 (fully_shard) across the processes of torchrun",
        "resume": "continue bit for bit from the last checkpoint in --output-dir",
        "overwrite": "start afresh in an --output-dir that holds another run (deletes that run's files)",
        "max_grad_norm": "clip the gradient norm to this (default 1.0); none: no clipping",
        "keep_checkpoints": "keep the newest N checkpoints (default 2)",
        "log_every": "log every N optimiser steps (default 10)",
        "save_every": "checkpoint every N optimiser steps (default: at each evaluation)",
    }
    ranges = {name: wanted for name, _, _, wanted in NUMERIC_FIELDS}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "progress":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in _BOOL:
            p.add_argument(flag, action="store_true", default=None, help=help_.get(f.name))
            continue
        kind = str
        if f.name in (
            "epochs",
            "batch_size",
            "grad_accum",
            "max_steps",
            "lora_r",
            "adapter_r",
            "num_virtual_tokens",
            "max_length",
            "eval_every",
            "patience",
            "save_every",
            "keep_checkpoints",
            "log_every",
            "seed",
        ):
            kind = int
        elif f.name in (
            "val_split",
            "lr",
            "warmup_ratio",
            "weight_decay",
            "max_grad_norm",
            "layer_decay",
            "loraplus_ratio",
            "lora_alpha",
            "lora_dropout",
        ):
            kind = float
        if f.name == "max_grad_norm":
            kind = _grad_norm
        choices = {"method": METHODS, "schedule": ("cosine", "linear", "constant"),
                   "task": ("classification", "causal"),
                   "precision": ("auto", "fp32", "bf16", "fp16"), "on_bad_line": ("error", "skip"),
                   "ptuning_encoder": ("mlp", "lstm"),
                   "adapter_placement": ("houlsby", "pfeiffer", "parallel")}.get(f.name)  # fmt: skip
        text = help_.get(f.name)
        if f.name in ranges:  # the range TrainConfig checks (before any model loads)
            text = f"{text} [{ranges[f.name]}]" if text else f"[{ranges[f.name]}]"
        p.add_argument(flag, type=kind, default=None, choices=choices, help=text)
    p.add_argument("--config", help="YAML file of settings (field names as keys); flags override it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--summary-json", help="also write the final summary to this file (checked before training; "
                   "an existing file is replaced only if it is empty or a summary fastlora wrote)")  # fmt: skip


def _grad_norm(text: str) -> float | str:
    """--max-grad-norm: a number (TrainConfig checks > 0) or none/off (no clipping)."""
    if text.strip().lower() in ("none", "off"):
        return "none"
    return float(text)


def count(low: int):
    """An argparse type: an integer >= ``low`` (argparse turns the ValueError into a usage error, exit 2)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _nonnegative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}  # fmt: skip
    if args.target_modules is not None and "," in args.target_modules:
        overrides["target_modules"] = args.target_modules.split(",")
    if args.no_progress:
        overrides["progress"] = False
    if args.config:
        return TrainConfig.from_yaml(args.config, **overrides)
    return TrainConfig(**overrides)


def add_parsers(sub) -> None:
    """Add finetune, merge, generate, eval and compare to the ``fastlora`` subcommands."""
    p = sub.add_parser("finetune", help="fine-tune a model (default: QLoRA on the embedded MiniLM topic task, CPU)")
    _add_train_options(p)

    p = sub.add_parser("merge", help="fold a trained LoRA adapter into its base and write a plain model directory")
    p.add_argument("--adapter", required=True, help="directory written by fastlora finetune (adapter/ or best/)")
    p.add_argument("--model", help="base model directory (default: the one recorded with the adapter)")
    p.add_argument("--out", required=True, help="output directory, written whole then renamed into place: new, "
                   "empty, or an earlier merge's output (anything else is refused, never replaced)")  # fmt: skip
    p.add_argument("--merge-into", choices=("dequantized", "original"), default=None,
                   help="a QLoRA run: fold the adapter into its dequantised 4-bit base, the weights it was "
                   "trained on (dequantized), or into the original full-precision weights (original); the "
                   "measured difference from the trained model's outputs is printed either way "
                   "(default: dequantized)")  # fmt: skip

    p = sub.add_parser("generate", help="generate text with a causal LM and optionally a trained artefact")
    p.add_argument("--model", help="base model directory (default: the one recorded with --adapter)")
    p.add_argument("--adapter", help="directory written by fastlora finetune")
    p.add_argument("--prompt", required=True, help="instruction (wrapped in the training template) or raw text")
    p.add_argument("--raw", action="store_true", help="do not wrap --prompt in the instruction template")
    p.add_argument("--max-new-tokens", type=count(1), default=64, help="[>= 1]")
    p.add_argument("--temperature", type=_nonnegative, default=0.0, help="0: greedy [>= 0]")
    p.add_argument("--seed", type=count(0), default=0, help="[>= 0]")

    p = sub.add_parser("eval", help="validation loss (and accuracy) of a trained artefact on a data file")
    p.add_argument("--adapter", required=True, help="directory written by fastlora finetune")
    p.add_argument("--model", help="base model directory (default: the one recorded with the adapter)")
    p.add_argument("--data", help="JSONL/CSV (default: the embedded validation set when it was trained on it)")
    p.add_argument("--batch-size", type=count(1), default=32, help="[>= 1]")

    p = sub.add_parser("compare", help="train several methods on one task and print the trade-off table")
    p.add_argument("--methods", default="full,head,adapter,lora,qlora,prefix,prompt",
                   help="comma-separated, from: " + ", ".join(METHODS))  # fmt: skip
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--max-steps", type=count(1), default=60, help="[>= 1]")
    p.add_argument("--batch-size", type=count(1), default=16, help="[>= 1]")
    p.add_argument("--output-dir", default="fastlora-compare",
                   help="one run directory per method in here (new, empty, or an earlier compare's)")  # fmt: skip
    p.add_argument("--out", help="also write the table as JSON here (replaces only a table fastlora wrote)")
