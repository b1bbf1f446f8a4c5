"""``fastlora finetune | merge | generate | eval | compare``: the parsers of fastlora.train's commands (their
bodies and error handling are in :mod:`fastlora.train.commands`)."""

from __future__ import annotations

import argparse
import dataclasses
import math

from fastlora.train.config import NUMERIC_FIELDS, OPTIMIZERS, TrainConfig
from fastlora.train.methods import INITS, METHODS

_BOOL = {"gradient_checkpointing", "resume", "fsdp", "overwrite", "dora", "offload_activations"}


# Each TrainConfig field's help line. A "(default: ...)" in the text is kept; otherwise the field's built-in
# default is appended (tests/test_train.py checks that every flag of every train command has help and a default).
TRAIN_HELP = {
    "model": "local transformers model directory, never downloaded (default: the embedded all-MiniLM-L6-v2 encoder, "
    "for classification data)",
    "data": "JSONL/CSV: {text,label} for classification, {instruction,input?,output} or {messages} for causal LM, "
    "which needs a decoder --model (default: an embedded generated 4-topic sentence set)",
    "val_data": "validation file (default: hold out --val-split of --data)",
    "val_split": "share of --data held out for validation when --val-data is not given",
    "task": "classification or causal (default: from the data's keys)",
    "method": "what to train: LoRA on a 4-bit (qlora) or float (lora) base, bottleneck adapters, prefix/prompt/"
    "p-tuning, every weight (full), or the task head only (head)",
    "output_dir": "the run directory: checkpoints, metrics.jsonl, adapter/ and best/ (one run at a time; see "
    "--resume and --overwrite)",
    "epochs": "passes over the training data (ignored when --max-steps is given)",
    "max_steps": "optimiser steps to train (default: --epochs worth)",
    "batch_size": "examples per micro-batch on each process",
    "grad_accum": "micro-batches accumulated per optimiser step",
    "lr": "peak learning rate (default per method: full 2e-5, lora/qlora 2e-4, adapter/head 1e-3, prompts 1e-2+)",
    "schedule": "learning-rate decay after the warm-up",
    "warmup_ratio": "share of the steps the rate rises linearly from 0",
    "weight_decay": "AdamW weight decay (not on biases and norms)",
    "max_grad_norm": "clip the gradient norm to this; none: no clipping",
    "layer_decay": "discriminative learning rates: multiply the rate by this per layer below the top (default: off)",
    "loraplus_ratio": "LoRA+: B's rate is this times A's, lora/qlora only (default: off)",
    "lora_r": "LoRA rank (lora/qlora)",
    "lora_alpha": "LoRA scaling numerator: s = alpha / r (lora/qlora)",
    "lora_dropout": "dropout on the LoRA path (lora/qlora)",
    "dora": "DoRA: a trained magnitude per output row beside the LoRA factors, peft's use_dora (lora/qlora) "
    "(default: off)",
    "init": "the LoRA start (lora/qlora): kaiming (A random, B zero), gaussian, or one that rewrites the base: pissa "
    "(principal singular vectors), olora (QR), loftq (fitted to the 4-bit quantisation error)",
    "loftq_iter": "LoftQ alternations of quantisation and rank-r fit (--init loftq)",
    "target_modules": "layers LoRA adapts: a comma-separated list of module names or suffixes (e.g. query,value or "
    "q_proj,v_proj), a regex over full module names, or all-linear (every linear layer but the output head)",
    "adapter_r": "bottleneck width of the adapters (adapter)",
    "adapter_placement": "where the adapters go: after attention and MLP (houlsby), after the MLP (pfeiffer), "
    "or beside it (parallel)",
    "num_virtual_tokens": "virtual tokens of the prompt or prefix (prefix, prompt, ptuning)",
    "ptuning_encoder": "the prompt encoder of p-tuning",
    "precision": "autocast dtype (auto: bf16 on a GPU that has it, else fp32)",
    "gradient_checkpointing": "recompute activations in the backward pass: less memory, more time (default: off)",
    "offload_activations": "keep the activations saved for the backward pass in CPU memory (pinned on a GPU): "
    "less GPU memory, more transfer time; with --gradient-checkpointing only the layers' inputs move (default: off)",
    "optim": "optimiser: torch AdamW (adamw), or bitsandbytes' 8-bit state (adamw8bit: 2 bytes per parameter "
    "instead of 8, tensors of 4,096 values or more), paged (paged_adamw) or both (paged_adamw8bit): paging needs "
    "CUDA, on a CPU they run unpaged",
    "chunked_ce": "causal LM: compute the loss chunk by chunk from the hidden states, never the [tokens, vocab] "
    "logits (saves 8 bytes x vocab per token: the fp32 logits and their gradient)",
    "ce_chunk_tokens": "tokens per chunk of --chunked-ce (default: 256 MiB of fp32 logits per chunk, e.g. 523 "
    "tokens at a 128,256-token vocabulary)",
    "packing": "causal LM: pack each micro-batch's examples into rows without padding, positions restarting and "
    "attention confined per example; the loss is the unpacked batch's",
    "max_length": "tokens per example; longer ones are truncated (at most the model's window)",
    "eval_every": "evaluate every N optimiser steps (default: every epoch)",
    "patience": "early stopping: evaluations without a better validation loss before stopping (default: off)",
    "save_every": "checkpoint every N optimiser steps (default: at each evaluation)",
    "keep_checkpoints": "keep the newest N checkpoints",
    "log_every": "write metrics.jsonl every N optimiser steps",
    "seed": "seed of the initialisation, the data split and order, and dropout",
    "on_bad_line": "a malformed data line stops the run (error) or is skipped with a warning (skip)",
    "resume": "continue bit for bit from the last checkpoint in --output-dir; refused, naming each difference, "
    "when a setting, the model or the data changed (default: off)",
    "overwrite": "start afresh in an --output-dir that holds another run (deletes only that run's files) "
    "(default: off)",
    "fsdp": "shard with FSDP2 (fully_shard) across the processes of torchrun (default: off)",
}


def with_default(text: str, default, wanted: str | None = None) -> str:
    """``text [wanted] (default: default)``: the range a value must be in, if any, then the default (the one
    ``text`` already states, else ``default``; False reads "off")."""
    text, stated, rest = text.partition(" (default")
    shown = f"{stated}{rest}" if stated else f" (default: {'off' if default is False else default})"
    return f"{text} [{wanted}]{shown}" if wanted else f"{text}{shown}"


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as --flag (default None: the YAML file or the built-in default decides)."""
    help_ = TRAIN_HELP
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    ranges = {name: wanted for name, _, _, wanted in NUMERIC_FIELDS}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("progress", "jobs"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in _BOOL:
            p.add_argument(flag, action="store_true", default=None, help=with_default(help_[f.name], False))
            continue
        kind = str
        if f.name in (
            "epochs",
            "batch_size",
            "grad_accum",
            "max_steps",
            "lora_r",
            "loftq_iter",
            "adapter_r",
            "num_virtual_tokens",
            "max_length",
            "eval_every",
            "patience",
            "save_every",
            "keep_checkpoints",
            "log_every",
            "seed",
            "ce_chunk_tokens",
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
                   "ptuning_encoder": ("mlp", "lstm"), "init": INITS,
                   "adapter_placement": ("houlsby", "pfeiffer", "parallel"), "optim": OPTIMIZERS,
                   "chunked_ce": ("on", "off"), "packing": ("on", "off")}.get(f.name)  # fmt: skip
        text = with_default(help_[f.name], defaults[f.name], ranges.get(f.name))  # the range TrainConfig checks
        p.add_argument(flag, type=kind, default=None, choices=choices, help=text)
    p.add_argument("--job", action="append", metavar="NAME=DATA[,key=value...]", help="a LoRA job (repeat it): "
                   "its adapter NAME, its DATA file and settings of its own (lr, r, alpha, dropout, targets (a|b), "
                   "epochs, steps, batch, weight_decay, warmup, schedule, max_grad_norm, patience, eval_every, val, "
                   "val_split); the jobs train together on one frozen base (default: one run on --data)")  # fmt: skip
    p.add_argument("--jobs", metavar="FILE", help="the jobs as JSON or YAML: a list of {name, data, key: value} or "
                   "a mapping NAME -> settings (default: none)")  # fmt: skip
    p.add_argument("--config", help="YAML file of settings (field names as keys); flags override it (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, log lines only (default: a bar)")
    p.add_argument("--summary-json", help="also write the final summary to this file (checked before training; "
                   "an existing file is replaced only if it is empty or a summary fastlora wrote) (default: "
                   "only OUTPUT_DIR/summary.json)")  # fmt: skip


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
    if getattr(args, "job", None) or getattr(args, "jobs", None):
        from fastlora.train.jobs import parse_job, read_jobs_file

        listed = read_jobs_file(args.jobs) if args.jobs else []
        overrides["jobs"] = listed + [parse_job(text) for text in args.job or ()]
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
    p.add_argument("--to-4bit", nargs="?", const="same", choices=("same", "nf4", "fp4"), default=None,
                   metavar="nf4|fp4", help="re-quantise the merged LoRA layers to 4 bits and write a transformers "
                   "bitsandbytes 4-bit checkpoint (no value: the run's 4-bit format; a float run: nf4, blocksize "
                   "64, double quantisation) (default: a full-precision model)")  # fmt: skip
    p.add_argument("--refit-rank", type=count(1), default=None, metavar="K", help="with --to-4bit: fit a rank-K "
                   "[>= 1] residual to each layer's re-quantisation error (LoftQ's alternation), saved as a peft LoRA "
                   "adapter in OUT/residual; the output error on the probe inputs is printed before and after "
                   "(default: none, the plain re-quantisation)")  # fmt: skip
    p.add_argument("--refit-iters", type=count(1), default=None, metavar="N", help="with --refit-rank: quantise/fit "
                   "alternations [>= 1] (default: 1)")  # fmt: skip
    p.add_argument("--allow-base-mismatch", action="store_true", help="load the adapter although its record says "
                   "it was trained on another base (a warning instead of the error) (default: refuse)")  # fmt: skip

    p = sub.add_parser("generate", help="generate text with a causal LM and optionally a trained artefact")
    p.add_argument("--model", help="base model directory (default: the one recorded with --adapter)")
    p.add_argument("--adapter", help="directory written by fastlora finetune; a QLoRA run's 4-bit base is rebuilt "
                   "as trained (default: none, the base model alone)")  # fmt: skip
    p.add_argument("--prompt", required=True, help="instruction (wrapped in the training template) or raw text")
    p.add_argument("--raw", action="store_true", help="do not wrap --prompt in the instruction template (default: "
                   "wrap it)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=count(1), default=64, help="tokens to generate [>= 1] (default: 64)")
    p.add_argument("--temperature", type=_nonnegative, default=0.0, help="sampling temperature; 0: greedy "
                   "[>= 0] (default: 0)")  # fmt: skip
    p.add_argument("--seed", type=count(0), default=0, help="seed of the sampling [>= 0] (default: 0)")
    p.add_argument("--allow-base-mismatch", action="store_true", help="load the adapter although its record says "
                   "it was trained on another base (a warning instead of the error) (default: refuse)")  # fmt: skip

    p = sub.add_parser("eval", help="validation loss (and accuracy) of a trained artefact on a data file")
    p.add_argument("--adapter", required=True, help="directory written by fastlora finetune (adapter/ or best/); a "
                   "QLoRA run's 4-bit base is rebuilt as trained, so the run's own validation data gives the "
                   "loss finetune reported")  # fmt: skip
    p.add_argument("--model", help="base model directory (default: the one recorded with the adapter)")
    p.add_argument("--data", help="JSONL/CSV (default: the embedded validation set when it was trained on it)")
    p.add_argument("--batch-size", type=count(1), default=32, help="examples per forward [>= 1] (default: 32)")
    p.add_argument("--allow-base-mismatch", action="store_true", help="load the adapter although its record says "
                   "it was trained on another base (a warning instead of the error) (default: refuse)")  # fmt: skip

    p = sub.add_parser("compare", help="train several methods on one task and print the trade-off table")
    methods = "full,head,adapter,lora,qlora,prefix,prompt"
    p.add_argument("--methods", default=methods,
                   help=f"comma-separated, from: {', '.join(METHODS)} (default: {methods})")  # fmt: skip
    p.add_argument("--model", help="as finetune's --model (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--data", help="as finetune's --data (default: the embedded 4-topic sentence set)")
    p.add_argument("--max-steps", type=count(1), default=60, help="optimiser steps per method [>= 1] (default: 60)")
    p.add_argument("--batch-size", type=count(1), default=16, help="examples per step [>= 1] (default: 16)")
    p.add_argument("--output-dir", default="fastlora-compare",
                   help="one run directory per method in here: new, empty, or an earlier compare's "
                   "(default: fastlora-compare)")  # fmt: skip
    p.add_argument("--out", help="also write the table as JSON here; replaces only a table fastlora wrote "
                   "(default: none)")  # fmt: skip
