"""The data and the model of a run, prepared from its :class:`TrainConfig` (the trainer's set-up), and the
order in which the loop reads the training examples."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fastlora.methods.report import count_parameters
from fastlora.train import data as D
from fastlora.train import methods as M
from fastlora.train.config import TrainConfig
from fastlora.train.runtime import (
    Dist,
    TrainingError,
    _minilm_path,
    attends_ahead,
    autocast_dtype,
    fsdp2_shard,
    load_model,
    load_tokenizer,
    model_max_length,
)
from fastlora.train.state import Plan


@dataclasses.dataclass
class RunData:
    """The records of a run, before tokenisation."""

    task: str  # "classification" | "causal"
    labels: list[str] | None  # a classifier's label names, sorted; None for a causal LM
    train_records: list[tuple[int, dict[str, Any]]]  # (line number, record)
    val_records: list[tuple[int, dict[str, Any]]]
    name: str  # where they came from, for the header


def read_data(cfg: TrainConfig) -> RunData:
    """``cfg.data`` (validation: ``cfg.val_data`` or a ``cfg.val_split`` share of it), or the embedded topic set."""
    if cfg.data is None:
        train_records, val_records = D.default_classification_data(seed=1234)
        task, name = "classification", "embedded 4-topic sentences (generated)"
    else:
        train_records = D.read_records(cfg.data, task=cfg.task, on_bad_line=cfg.on_bad_line)
        task = cfg.task or D.detect_task([r for _, r in train_records])
        if cfg.val_data:
            val_records = D.read_records(cfg.val_data, task=task, on_bad_line=cfg.on_bad_line)
        else:
            train_records, val_records = D.split_validation(train_records, cfg.val_split, cfg.seed)
        name = cfg.data
    labels = None
    if task == "classification":
        labels = sorted({str(r["label"]) for _, r in train_records})
        if len(labels) < 2:
            raise D.DataError(f"{cfg.data}: a classifier needs at least two labels, found {labels}")
    return RunData(task, labels, train_records, val_records, name)


@dataclasses.dataclass
class RunModel:
    """The model of a run with its method applied, on its device."""

    model: nn.Module  # trainable parameters in fp32 (master weights)
    train_model: nn.Module  # what the loop calls: ``model``, DDP around it, or ``model`` sharded by FSDP2
    tokenizer: Any
    max_length: int  # tokens an example may have (room left for virtual tokens)
    pad_id: int
    trainable: int  # parameters (a 4-bit value counts as one)
    total: int
    path: str  # the base model's directory
    name: str  # the base model's name, for the header


def build_model(cfg: TrainConfig, data: RunData, device: torch.device, dist: Dist) -> RunModel:
    """Load the base for ``data.task``, apply ``cfg.method``, move it to ``device``, wrap it for ``dist``."""
    path = cfg.model or _minilm_path()
    name = os.path.basename(cfg.model.rstrip("/")) if cfg.model else "all-MiniLM-L6-v2 (embedded)"
    dtype = torch.float32
    if device.type == "cuda" and cfg.method != "full":  # frozen bases in the compute dtype (trainable: fp32 below)
        dtype = autocast_dtype(cfg.precision, device) or torch.float32
    torch.manual_seed(cfg.seed)  # the fresh head and adapters start the same in every run
    base = load_model(path, data.task, data.labels, dtype)
    if data.task == "causal":
        check_causal(base, name, data.name)
    tokenizer = load_tokenizer(path)
    limit = model_max_length(base)
    max_length = min(cfg.max_length, limit) if limit else cfg.max_length
    if M.recipe(cfg.method).virtual_tokens:  # the prompt takes positions of the model's window
        max_length = min(max_length, (limit or 10**9) - cfg.num_virtual_tokens)
    if cfg.gradient_checkpointing:
        enable_checkpointing(base)
        base.config.use_cache = False
    model = M.build(base, cfg.method, cfg.method_options(), data.task)
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()  # optimiser state and updates in fp32 (master weights)
    model = model.to(device)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise TrainingError(f"fastlora: method {cfg.method!r} left nothing trainable in this model")
    train_model = distribute(model, cfg, device, dist)
    return RunModel(model, train_model, tokenizer, max_length, pad_id, trainable, total, path, name)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing, non-reentrant, through transformers' current name for it:
    ``activation_checkpointing_enable`` from 5.24 on, which deprecates ``gradient_checkpointing_enable``
    (a FutureWarning; removed in v6), the only name before."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_causal(model: nn.Module, name: str, data_name: str) -> None:
    """A :class:`TrainingError` when causal (instruction/chat) data meets a model whose positions see the tokens
    after them (an encoder such as BERT, loaded with an LM head): it would learn from answers it can read."""
    if not attends_ahead(model):
        return
    kind = getattr(model.config, "model_type", None) or type(model).__name__
    raise TrainingError(
        f"fastlora: {data_name} holds instruction/chat data (causal language modelling), but the model {name} "
        f"({kind}) is an encoder: every position sees the tokens after it, so it would be trained on answers it "
        "can read. Pass --model with a decoder (a causal LM directory: Llama, Qwen, Mistral, GPT-2...), or "
        'classification data ({"text", "label"} records) for this model'
    )


def distribute(model: nn.Module, cfg: TrainConfig, device: torch.device, dist: Dist) -> nn.Module:
    """What the loop runs: ``model`` itself in one process, else DDP around it or FSDP2 shards of it."""
    if cfg.fsdp and dist.world == 1:
        raise TrainingError("fastlora: --fsdp shards across processes: launch with torchrun --nproc_per_node N")
    if cfg.fsdp and not M.recipe(cfg.method).fsdp:
        sharded = ", ".join(m for m, r in M.RECIPES.items() if r.fsdp)
        raise TrainingError(f"fastlora: --fsdp supports {sharded}; {cfg.method} trains few "
                            "enough parameters for plain DDP (drop --fsdp)")  # fmt: skip
    if dist.world == 1:
        return model
    if cfg.fsdp:
        return fsdp2_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def micro_batches(
    examples: list[D.Example], plan: Plan, step: int, cfg: TrainConfig, dist: Dist, pad_id: int, task: str
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's collated micro-batches of ``cfg.batch_size`` examples, epoch after epoch, from where the data
    stands after ``step`` optimiser steps (a resumed run's position): the order of an epoch depends only on
    (``cfg.seed``, epoch), and an epoch's remainder short of a whole step is skipped."""
    epoch, offset = plan.data_position(step)
    while True:
        for i, chunk in enumerate(D.batches(examples, cfg.batch_size, cfg.seed, epoch, dist.rank, dist.world)):
            if i >= plan.micro_per_epoch:
                break
            if i >= offset:
                yield D.collate(chunk, pad_id, task)
        epoch, offset = epoch + 1, 0
