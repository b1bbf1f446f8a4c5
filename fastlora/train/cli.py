"""``fastlora finetune | merge | generate | eval | compare``: the command-line front of fastlora.train."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

from fastlora.train.config import TrainConfig
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
    }
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
        choices = {"method": METHODS, "schedule": ("cosine", "linear", "constant"),
                   "task": ("classification", "causal"),
                   "precision": ("auto", "fp32", "bf16", "fp16"), "on_bad_line": ("error", "skip"),
                   "ptuning_encoder": ("mlp", "lstm"),
                   "adapter_placement": ("houlsby", "pfeiffer", "parallel")}.get(f.name)  # fmt: skip
        p.add_argument(flag, type=kind, default=None, choices=choices, help=help_.get(f.name))
    p.add_argument("--config", help="YAML file of settings (field names as keys); flags override it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--summary-json", help="also write the final summary to this file")


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
    p.add_argument("--out", required=True, help="output directory (written whole, then renamed into place)")

    p = sub.add_parser("generate", help="generate text with a causal LM and optionally a trained artefact")
    p.add_argument("--model", help="base model directory (default: the one recorded with --adapter)")
    p.add_argument("--adapter", help="directory written by fastlora finetune")
    p.add_argument("--prompt", required=True, help="instruction (wrapped in the training template) or raw text")
    p.add_argument("--raw", action="store_true", help="do not wrap --prompt in the instruction template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("eval", help="validation loss (and accuracy) of a trained artefact on a data file")
    p.add_argument("--adapter", required=True, help="directory written by fastlora finetune")
    p.add_argument("--model", help="base model directory (default: the one recorded with the adapter)")
    p.add_argument("--data", help="JSONL/CSV (default: the embedded validation set when it was trained on it)")
    p.add_argument("--batch-size", type=int, default=32)

    p = sub.add_parser("compare", help="train several methods on one task and print the trade-off table")
    p.add_argument("--methods", default="full,head,adapter,lora,qlora,prefix,prompt",
                   help="comma-separated, from: " + ", ".join(METHODS))  # fmt: skip
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output-dir", default="fastlora-compare")
    p.add_argument("--out", help="also write the table as JSON here")


def run(args: argparse.Namespace) -> int:
    from fastlora.train.data import DataError
    from fastlora.train.trainer import TrainingError

    try:
        if args.command == "finetune":
            return _finetune(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "compare":
            return _compare(args)
    except (DataError, TrainingError, ValueError) as e:
        message = str(e)
        print(message if message.startswith("fastlora") else f"fastlora: {message}", file=sys.stderr)
        return 2
    return 2


def _finetune(args) -> int:
    from fastlora.train.trainer import Trainer

    cfg = config_from_args(args)
    console = _console()
    summary = Trainer(cfg, console=console).run()
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(console, [summary])
        if args.summary_json:
            from fastlora.methods.files import atomic_write

            atomic_write(args.summary_json, json.dumps(summary.to_dict(), indent=2).encode())
    return 130 if summary.stopped == "interrupted" else 0


def _console():
    """A rich console; 140 columns when writing to a file or pipe (rich would assume 80)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_summary(console, summaries) -> None:
    from rich.table import Table

    table = Table(title="fastlora finetune", show_lines=False)
    for col in ("method", "trainable", "share", "peak memory", "step time", "tokens/s", "best val loss",
                "val acc before → after", "stopped"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("method", "stopped") else "right")
    for s in summaries:
        acc = "-"
        if s.val_accuracy_after is not None:
            acc = f"{s.val_accuracy_before:.1%} → {s.val_accuracy_after:.1%}"
        table.add_row(
            s.method,
            f"{s.trainable:,d}",
            f"{100 * s.trainable / s.total:.2f}%",
            f"{s.peak_memory_mib:,.0f} MiB ({s.memory_kind})",
            f"{1000 * s.step_time_s:,.0f} ms",
            f"{s.tokens_per_s:,.0f}",
            _fmt(s.best_val_loss, ".4f"),
            acc,
            s.stopped,
        )
    console.print(table)
    if len(summaries) == 1 and summaries[0].output_dir:
        console.print(f"artefacts: {summaries[0].output_dir}/adapter (last), {summaries[0].output_dir}/best (best val)")


def _base_and_artifact(args, *, task_required: str | None = None):
    from fastlora.train import methods as M
    from fastlora.train.trainer import load_model, load_tokenizer

    manifest = M.read_manifest(args.adapter)
    if task_required and manifest["task"] != task_required:
        raise ValueError(f"fastlora: {args.adapter} was trained for {manifest['task']}, this needs {task_required}")
    path = args.model or manifest["base_model"]
    import torch

    base = load_model(path, manifest["task"], manifest["labels"], torch.float32)
    model = M.load_artifact(base, args.adapter)
    return manifest, model, load_tokenizer(path), path


def _merge(args) -> int:
    from fastlora.methods.lora import LoraModel
    from fastlora.train import methods as M

    manifest, model, tokenizer, _ = _base_and_artifact(args)
    if manifest["method"] not in ("lora", "qlora"):
        raise ValueError(f"fastlora: merge folds LoRA adapters; {args.adapter} holds a {manifest['method']} artefact")
    assert isinstance(model, LoraModel)
    merged = model.merge_and_unload()
    tmp = M._atomic_dir(args.out)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        M._publish(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"fastlora: merged {args.adapter} into {args.out}")
    return 0


def _generate(args) -> int:
    import torch

    from fastlora.train.data import PROMPT_TEMPLATE
    from fastlora.train.trainer import load_model, load_tokenizer

    if args.adapter:
        _, model, tokenizer, _ = _base_and_artifact(args, task_required="causal")
    else:
        if not args.model:
            raise ValueError("fastlora generate: pass --model, --adapter, or both")
        model, tokenizer = load_model(args.model, "causal", None, torch.float32), load_tokenizer(args.model)
    text = args.prompt if args.raw else PROMPT_TEMPLATE.format(instruction=args.prompt)
    encoded = tokenizer(text, return_tensors="pt")
    ids = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    torch.manual_seed(args.seed)
    model.eval()
    sample = args.temperature > 0
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             temperature=args.temperature if sample else None,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    print(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def _eval(args) -> int:
    from fastlora.train import data as D
    from fastlora.train.trainer import Trainer

    manifest, model, tokenizer, _ = _base_and_artifact(args)
    cfg = TrainConfig(method=manifest["method"], batch_size=args.batch_size, progress=False)
    trainer = Trainer(cfg)
    trainer.task, trainer.labels, trainer.tokenizer = manifest["task"], manifest["labels"], tokenizer
    trainer.model = trainer.train_model = model.to(trainer.device)
    trainer.max_length = manifest["max_length"]
    trainer.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if args.data:
        records = D.read_records(args.data, task=manifest["task"])
    elif manifest["fastlora_config"].get("data") is None:
        records = D.default_classification_data(seed=1234)[1]
    else:
        raise ValueError("fastlora eval: pass --data")
    trainer.val_examples = trainer._encode(records, args.data or "the embedded validation set")
    result = trainer.evaluate()
    print(json.dumps(result))
    return 0


def _compare(args) -> int:
    """Each method in a fresh process (peak memory is per process), same data, steps and batch."""
    from fastlora.train.trainer import Summary

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"fastlora compare: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    summaries = []
    for method in methods:
        out = os.path.join(args.output_dir, method)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            summary_path = f.name
        cmd = [sys.executable, "-m", "fastlora.cli", "finetune", "--method", method, "--output-dir", out,
               "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size), "--eval-every",
               str(args.max_steps), "--no-progress", "--summary-json", summary_path]  # fmt: skip
        for flag in ("model", "data"):
            if getattr(args, flag):
                cmd += [f"--{flag}", getattr(args, flag)]
        print(f"fastlora compare: {method} ...", flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-2000:], result.stderr[-4000:], file=sys.stderr)
            raise ValueError(f"fastlora compare: method {method} failed (exit {result.returncode})")
        with open(summary_path) as f:
            summaries.append(Summary(**json.load(f)))
        os.unlink(summary_path)
    console = _console()
    print_summary(console, summaries)
    if args.out:
        from fastlora.methods.files import atomic_write

        atomic_write(args.out, json.dumps([s.to_dict() for s in summaries], indent=2).encode())
    return 0
