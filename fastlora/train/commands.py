"""``fastlora finetune | merge | generate | eval | compare`` (parsed by :mod:`fastlora.train.cli`): :func:`run`
and the command bodies.

Each checks its outputs before it loads a model (:mod:`fastlora.train.guards`): a directory is written only
where nothing is, into an empty directory, or over the same command's earlier output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

from fastlora.train import guards
from fastlora.train.cli import config_from_args
from fastlora.train.config import TrainConfig
from fastlora.train.methods import METHODS

MERGE_MARKER = "fastlora_merge.json"  # what fastlora merge wrote into --out (so only that is ever replaced)
COMPARE_MARKER = "fastlora_compare.json"


def run(args: argparse.Namespace) -> int:
    """Run one subcommand. An error a user or the machine can cause (bad flags or files, missing artefacts, a
    full disk, permissions) is one ``fastlora: ...`` line on stderr and exit 2; Ctrl-C outside training exits 130."""
    if args.command not in COMMANDS:
        return 2
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("fastlora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = guards.explain(e, **_error_context(args))
        if message is None:
            raise  # not something a user can fix: a bug, whose traceback is what to report
        print(message, file=sys.stderr)
        return 2


def _error_context(args) -> dict[str, str]:
    """What :func:`guards.explain` says about a full disk or a missing file for this command."""
    adapter_hint = "--adapter must be the adapter/ or best/ directory of a fastlora finetune run"
    if args.command == "finetune":
        out = getattr(args, "output_dir", None) or TrainConfig.output_dir
        return {"where": out, "retry": "rerun with --resume to continue from the last checkpoint"}
    if args.command == "merge":
        return {"where": args.out, "missing_hint": adapter_hint}
    if args.command == "compare":
        return {"where": args.output_dir}
    return {"missing_hint": adapter_hint}


def _finetune(args) -> int:
    from fastlora.train.trainer import Trainer

    cfg = config_from_args(args)  # every setting range-checked
    args.output_dir = cfg.output_dir  # (it may come from --config) for the error messages of run()
    # outputs checked before the model loads (the run directory's ownership is the trainer's to check)
    guards.check_writable(cfg.output_dir, "--output-dir", inside=True)
    if args.summary_json:
        guards.check_file_destination(args.summary_json, "--summary-json", _is_summary, "a fastlora summary")
    console = _console()
    if cfg.jobs:  # several LoRA jobs on one frozen base
        from fastlora.train.multijob import MultiJobTrainer as Trainer
    summary = Trainer(cfg, console=console).run()
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(console, getattr(summary, "per_job", None) or [summary])
        if args.summary_json:
            from fastlora.methods.files import atomic_write

            atomic_write(args.summary_json, json.dumps(summary.to_dict(), indent=2).encode())
    return 130 if summary.stopped == "interrupted" else 0


def _is_summary(content) -> bool:
    """JSON that ``--summary-json`` writes (one run's summary)."""
    return isinstance(content, dict) and {"method", "trainable", "total", "stopped"} <= content.keys()


def _is_table(content) -> bool:
    """JSON that ``compare --out`` writes (a list of summaries)."""
    return isinstance(content, list) and all(_is_summary(row) for row in content)


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


def _base_and_artifact(args, *, task_required: str | None = None, manifest: dict | None = None,
                       merge_into: str = "dequantized"):  # fmt: skip
    """(manifest, the trained model on the base it was trained on (a 4-bit run's base rebuilt as recorded;
    ``merge_into="original"``: its float base), the tokenizer, the base's path, the 4-bit record used or None)."""
    from fastlora.train.trained import load_trained
    from fastlora.train.trainer import load_tokenizer

    manifest = manifest or guards.read_manifest(args.adapter, base_given=bool(args.model))
    if task_required and manifest["task"] != task_required:
        raise ValueError(f"fastlora: {args.adapter} was trained for {manifest['task']}, this needs {task_required}")
    path = args.model or manifest["base_model"]
    model, record = load_trained(args.adapter, manifest, path, merge_into=merge_into,
                                 allow_base_mismatch=getattr(args, "allow_base_mismatch", False))  # fmt: skip
    return manifest, model, load_tokenizer(path), path, record


def _merge(args) -> int:
    """Fold the adapter into its base and write a plain transformers directory at --out, refusing (before the
    model loads) a destination that holds anything but an earlier merge's output. A 4-bit run merges into its
    dequantised 4-bit base (what the adapter was trained on) unless ``--merge-into original``; either way the
    merged model's logits on a fixed probe batch are compared with the trained model's and the difference printed.

    ``--to-4bit``: the merged LoRA layers re-quantised to NF4/FP4 (a transformers bitsandbytes 4-bit checkpoint,
    :mod:`fastlora.train.merge4bit`), with ``--refit-rank k`` a rank-k residual fitted to the re-quantisation error
    and saved as a peft adapter in out/residual; each layer's output error on the probe batch's inputs is printed
    before and after the refit."""
    from fastlora.methods.lora import LoraModel
    from fastlora.train import merge4bit as M4
    from fastlora.train.trained import describe, logits, output_difference, probe_batch

    manifest = guards.read_manifest(args.adapter, base_given=bool(args.model))
    if manifest["method"] not in ("lora", "qlora"):
        raise ValueError(f"fastlora: merge folds LoRA adapters; {args.adapter} holds a {manifest['method']} artefact")
    to_4bit, refit_rank = getattr(args, "to_4bit", None), getattr(args, "refit_rank", 0) or 0
    refit_iters = getattr(args, "refit_iters", None)
    if to_4bit is None and (refit_rank or refit_iters is not None):
        raise ValueError("fastlora merge: --refit-rank and --refit-iters fit a residual to a 4-bit re-quantisation; "
                         "pass --to-4bit with them")  # fmt: skip
    if refit_iters is not None and not refit_rank:
        raise ValueError("fastlora merge: --refit-iters needs --refit-rank K > 0 (the residual's rank)")
    guards.check_dir_destination(args.out, "--out", MERGE_MARKER, "merge")
    guards.check_writable(args.out, "--out")
    into = args.merge_into or "dequantized"
    manifest, model, tokenizer, base, record = _base_and_artifact(args, manifest=manifest)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    probe = probe_batch(tokenizer, manifest["max_length"], pad)
    assert isinstance(model, LoraModel)
    paths = [path for path, _ in model.lora_layers()]
    seen, hooks = M4.capture_inputs(dict(model.lora_layers())) if to_4bit else ({}, [])
    trained = logits(model, probe, manifest["task"])  # the model as trained: the reference
    for hook in hooks:
        hook.remove()
    if record is not None and into == "original":
        del model
        _, model, _, _, _ = _base_and_artifact(args, manifest=manifest, merge_into="original")
    assert isinstance(model, LoraModel)
    merged = model.merge_and_unload()
    quant, reports, residuals, refit_difference = None, {}, {}, None
    if to_4bit:
        # the run's 4-bit format (a float run: NF4, blocksize 64, double quantisation), --to-4bit TYPE its type
        quant = {"quant_type": record["quant_type"] if record else "nf4", "blocksize": record["blocksize"] if record
                 else 64, "double_quant": record["double_quant"] if record else True}  # fmt: skip
        quant["quant_type"] = quant["quant_type"] if to_4bit == "same" else to_4bit
        samples = {path: rows[0] for path, rows in seen.items() if rows}
        reports, residuals = M4.requantize_layers(merged, paths, **quant, refit_rank=refit_rank,
                                                  refit_iters=refit_iters or 1, samples=samples)  # fmt: skip
    difference = output_difference(trained, logits(merged, probe, manifest["task"]))
    if residuals:
        hooks = M4.residual_hooks(merged, residuals)
        refit_difference = output_difference(trained, logits(merged, probe, manifest["task"]))
        for hook in hooks:
            hook.remove()
    if record is None:  # a float run, or a qlora run written before the record (on its fp32 base, as then)
        into = "original" if manifest["method"] == "qlora" else "float"
    tmp = guards.new_dir_beside(args.out)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        extra = {}
        if quant:
            dtype = next(p.dtype for p in merged.parameters() if p.is_floating_point())
            M4.write_quantization_config(tmp, M4.quantization_config(merged, **{k: quant[k] for k in (
                "quant_type", "double_quant")}, dtype=dtype))  # fmt: skip
            extra = {"to_4bit": {**quant, "layers": len(paths), "refit_rank": refit_rank,
                                 "refit_iters": (refit_iters or 1) if refit_rank else 0, "error": M4.summarize(reports),
                                 "refit_output_difference": refit_difference}}  # fmt: skip
            if residuals:
                M4.save_residual(tmp, residuals, os.path.abspath(args.out))
        guards.write_marker(tmp, MERGE_MARKER, "merge", adapter=os.path.abspath(args.adapter),
                            base_model=os.path.abspath(base), merged_into=into,
                            output_difference=difference, **extra)  # fmt: skip
        guards.publish_dir(tmp, args.out, "--out", MERGE_MARKER, "merge")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"fastlora: merged {args.adapter} into {args.out}")
    if record is not None and into == "dequantized":
        print(f"fastlora: merged into the dequantised 4-bit base ({describe(record)}), the weights the adapter was "
              "trained on (--merge-into original: into the full-precision weights instead)")  # fmt: skip
    elif record is not None:
        print(f"fastlora: merged into the original {record['dtype']} weights, not the 4-bit base "
              f"({describe(record)}) the adapter was trained on")  # fmt: skip
    elif args.merge_into:
        print(f"fastlora: note: --merge-into {args.merge_into} changes nothing here: the run's base is not "
              "recorded as 4-bit", file=sys.stderr)  # fmt: skip
    print(f"fastlora: the merged model's logits differ from the trained model's by at most {difference['max_abs']:.3g} "
          f"(relative {difference['relative']:.3g}) on {len(probe['input_ids'])} probe texts")  # fmt: skip
    if quant:
        M4.print_report(quant, reports, refit_rank, refit_difference)
    return 0


def _generate(args) -> int:
    import torch

    from fastlora.train.data import PROMPT_TEMPLATE
    from fastlora.train.trainer import load_model, load_tokenizer

    if args.adapter:
        _, model, tokenizer, _, _ = _base_and_artifact(args, task_required="causal")
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

    manifest, model, tokenizer, _, _ = _base_and_artifact(args)
    cfg = TrainConfig(method=manifest["method"], batch_size=args.batch_size, precision=_precision(manifest),
                      progress=False)  # fmt: skip
    trainer = Trainer(cfg)
    trainer.task, trainer.labels, trainer.tokenizer = manifest["task"], manifest["labels"], tokenizer
    trainer.model = trainer.train_model = model.to(trainer.device)
    trainer.max_length = manifest["max_length"]
    trainer.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if args.data:
        records = D.read_records(args.data, task=manifest["task"])
    elif not isinstance(manifest.get("fastlora_config"), dict) or manifest["fastlora_config"].get("data") is None:
        records = D.default_classification_data(seed=1234)[1]
    else:
        raise ValueError("fastlora eval: pass --data")
    trainer.val_examples = trainer._encode(records, args.data or "the embedded validation set")
    result = trainer.evaluate()
    print(json.dumps(result))
    return 0


def _precision(manifest: dict) -> str:
    """The run's --precision (how its validation loss was computed), "auto" for older manifests; fp16, which
    needs a GPU, becomes fp32 without one (with a note)."""
    config = manifest.get("fastlora_config")
    precision = config.get("precision") if isinstance(config, dict) else None
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        return "auto"
    import torch

    if precision == "fp16" and not torch.cuda.is_available():
        print("fastlora: note: the run trained with --precision fp16, which needs a GPU: evaluating in fp32",
              file=sys.stderr)  # fmt: skip
        return "fp32"
    return precision


def _compare(args) -> int:
    """Each method in a fresh process (peak memory is per process), same data, steps and batch."""
    from fastlora.train.trainer import Summary

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"fastlora compare: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    # outputs checked before anything runs: --output-dir is new, empty or an earlier compare's (whose method
    # directories its finetune runs replace); --out is new, empty or an earlier table
    guards.check_dir_destination(args.output_dir, "--output-dir", COMPARE_MARKER, "compare", shallow=True)
    guards.check_writable(args.output_dir, "--output-dir", inside=True)
    if args.out:
        guards.check_file_destination(args.out, "--out", _is_table, "a fastlora compare table")
    earlier = guards.marked_entries(args.output_dir, COMPARE_MARKER, "compare")
    os.makedirs(args.output_dir, exist_ok=True)
    guards.write_marker(args.output_dir, COMPARE_MARKER, "compare", entries=sorted(earlier | set(methods)))
    overwrite = "overwrite" in {f.name for f in dataclasses.fields(TrainConfig)}
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
        if overwrite and os.path.isdir(out):  # an earlier compare's run (checked above): this one replaces it
            cmd.append("--overwrite")
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


COMMANDS = {"finetune": _finetune, "merge": _merge, "generate": _generate, "eval": _eval, "compare": _compare}
