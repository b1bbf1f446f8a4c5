"""The set-up of a multi-job run (:mod:`fastlora.train.multijob`): its jobs' settings checked, the model with one
adapter per job, a job's artefact, the run's summary."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from fastlora.methods import lora
from fastlora.train import methods as M
from fastlora.train.checkpoint import Checkpointer
from fastlora.train.config import TrainConfig
from fastlora.train.durable import replace_dir
from fastlora.train.jobs import JOB_KEYS
from fastlora.train.mixed import job_parameters
from fastlora.train.prepare import RunData, check_causal, enable_checkpointing, read_data
from fastlora.train.rundir import run_settings
from fastlora.train.runtime import (
    TrainingError,
    _minilm_path,
    autocast_dtype,
    load_model,
    load_tokenizer,
    model_max_length,
)
from fastlora.train.state import Plan, RunState, Summary

JOBS_DIR = "jobs"  # OUTPUT_DIR/jobs/NAME/{adapter,best}


@dataclasses.dataclass
class Job:
    """One job of the run: its settings (``cfg``: the run's with the job's own values) and what the loop keeps."""

    name: str
    cfg: TrainConfig
    train: list = dataclasses.field(default_factory=list)
    val: list = dataclasses.field(default_factory=list)
    plan: Plan | None = None
    state: RunState = dataclasses.field(default_factory=RunState)
    params: list = dataclasses.field(default_factory=list)
    micro: Any = None  # its micro-batches, epoch after epoch
    done: bool = False  # finished its steps or stopped early: frozen, out of the batch
    saved: bool = False  # its final ``adapter`` written


def job_configs(cfg: TrainConfig) -> list[Job]:
    """The jobs of ``cfg.jobs``, each with its settings checked (a ValueError naming the job): its data file
    exists, its values are in range; and what a multi-job run cannot do refused (a TrainingError)."""
    refuse = [(cfg.method not in ("lora", "qlora"), f"--method {cfg.method} (lora or qlora)"),
              (cfg.data is not None or cfg.val_data is not None, "--data/--val-data (each job names its own)"),
              (cfg.fsdp, "--fsdp"), (cfg.dora, "--dora"), (cfg.init not in ("kaiming", "gaussian"),
              f"--init {cfg.init} (it rewrites the shared base)"), (cfg.layer_decay is not None, "--layer-decay"),
              (cfg.loraplus_ratio is not None, "--loraplus-ratio")]  # fmt: skip
    for bad, what in refuse:
        if bad:
            raise TrainingError(f"fastlora: several jobs (--job/--jobs) do not support {what}")
    jobs = []
    for spec in cfg.jobs:
        name = spec["name"]
        values = {JOB_KEYS[k]: v for k, v in spec.items() if k != "name"}
        for key in ("data", "val_data"):
            if values.get(key) is not None and not os.path.isfile(values[key]):
                raise ValueError(f"fastlora: job {name!r}: {key.replace('_', ' ')} file {values[key]} does not exist")
        try:
            job_cfg = dataclasses.replace(cfg, jobs=None, **values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"fastlora: job {name!r}: {str(e).removeprefix('fastlora: ')}") from None
        jobs.append(Job(name, job_cfg))
    return jobs


def read_jobs_data(jobs: list[Job]) -> tuple[list[RunData], RunData]:
    """(each job's records, the run's: its task, a classifier's labels (those of every job: each job's head is
    trained over them all), the data's name for the header); jobs of different tasks are refused."""
    datas = [read_data(job.cfg) for job in jobs]
    tasks = {d.task for d in datas}
    if len(tasks) > 1:
        raise TrainingError(f"fastlora: the jobs mix tasks ({', '.join(sorted(tasks))}); one run trains one task")
    task = datas[0].task
    labels = sorted({lb for d in datas for lb in d.labels}) if task == "classification" else None
    return datas, RunData(task, labels, [], [], ", ".join(f"{job.name}={job.cfg.data}" for job in jobs))


def build_jobs_model(cfg: TrainConfig, jobs: list[Job], data: RunData, device: torch.device):
    """The base of ``cfg.model`` with one LoRA adapter per job (named after it; a classifier's head trained per job
    beside it), on ``device``; (model, tokenizer, max_length, pad_id, path, name). Each adapter starts as its
    job's own run would: the random state after the base loads is reset before each one."""
    path = cfg.model or _minilm_path()
    name = os.path.basename(cfg.model.rstrip("/")) if cfg.model else "all-MiniLM-L6-v2 (embedded)"
    dtype = (autocast_dtype(cfg.precision, device) or torch.float32) if device.type == "cuda" else torch.float32
    torch.manual_seed(cfg.seed)
    base = load_model(path, data.task, data.labels, dtype)
    if data.task == "causal":
        check_causal(base, name, data.name)
    tokenizer = load_tokenizer(path)
    limit = model_max_length(base)
    max_length = min(cfg.max_length, limit) if limit else cfg.max_length
    if cfg.gradient_checkpointing:
        enable_checkpointing(base)
        base.config.use_cache = False
    heads = M.head_modules(base) if data.task == "classification" else []
    start, model = torch.get_rng_state(), base
    for job in jobs:
        torch.set_rng_state(start)
        o = job.cfg.method_options()
        model = lora.inject(model, adapter_name=job.name, r=o["lora_r"], lora_alpha=o["lora_alpha"],
                            lora_dropout=o["lora_dropout"], target_modules=o["target_modules"],
                            quantize="nf4" if cfg.method == "qlora" else None, modules_to_save=heads or None,
                            task_type="SEQ_CLS" if data.task == "classification" else "CAUSAL_LM",
                            init_lora_weights=True if o["init"] == "kaiming" else o["init"])  # fmt: skip
    for p in model.parameters():
        if p.is_floating_point() and p.dtype in (torch.bfloat16, torch.float16) and any(
                p is q for job in jobs for _, q in job_parameters(model, job.name)):  # fmt: skip
            p.data = p.data.float()  # master weights in fp32
    model = model.to(device)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return model, tokenizer, max_length, pad_id, path, name


@dataclasses.dataclass
class MultiRunState(RunState):
    """The run's state with its jobs (``jobs``: the :class:`Job` objects), whose own states, stop and save flags a
    checkpoint's ``state.json`` keeps under ``jobs``."""

    jobs: list = dataclasses.field(default_factory=list)

    def to_checkpoint(self) -> dict[str, Any]:
        out = super().to_checkpoint()
        out["jobs"] = {job.name: {**job.state.to_checkpoint(), "step": job.state.step, "stopped": job.state.stopped,
                                  "done": job.done, "saved": job.saved} for job in self.jobs}  # fmt: skip
        return out

    def restore_jobs(self, saved: dict[str, Any]) -> None:
        """Each job's state, stop and save flags from a checkpoint's ``jobs`` (:meth:`to_checkpoint`)."""
        for job in self.jobs:
            mine = saved[job.name]
            job.state = RunState.from_checkpoint(mine, mine["step"])
            job.state.stopped, job.done, job.saved = mine["stopped"], mine["done"], mine["saved"]


class JobsCheckpointer(Checkpointer):
    """The run's checkpoints (:class:`Checkpointer`), identified by every job's settings and data files too, so
    that ``--resume`` refuses a run whose jobs changed, naming each difference."""

    def __init__(self, cfg: TrainConfig, dist, jobs: list[Job]) -> None:
        super().__init__(cfg, dist)
        self.jobs = jobs

    def identify(self, model_path: str) -> None:
        super().identify(model_path)
        self.settings["jobs"] = [job.name for job in self.jobs]
        for job in self.jobs:
            for key, value in run_settings(job.cfg, model_path).items():
                if key != "model":
                    self.settings[f"{job.name}.{key}"] = value


@dataclasses.dataclass
class MultiSummary(Summary):
    """A multi-job run's summary: the run's row (its trainable parameters and validation losses the jobs' sums
    and means) and each job's (``jobs``, Summary dicts whose ``method`` reads ``qlora:NAME``)."""

    jobs: list = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, rows: list[dict[str, Any]], state: RunState, *, memory_mib: float, **fields: Any) -> MultiSummary:
        """The run's summary from its jobs' (``rows``), its own state and ``fields`` (method, task, trainable,
        total, memory_kind, output_dir, wall_s): the validation figures are the jobs' means."""

        def mean(key: str) -> float | None:
            values = [r[key] for r in rows]
            return None if any(v is None for v in values) else sum(values) / len(values)

        means = {key: mean(key) for key in ("best_val_loss", "val_loss_before", "val_loss_after",
                                            "val_accuracy_before", "val_accuracy_after")}  # fmt: skip
        return cls(steps=state.step, examples_seen=state.examples_seen, tokens_per_s=state.tokens_per_s,
                   step_time_s=state.step_time_s, peak_memory_mib=memory_mib, stopped=state.stopped, jobs=rows,
                   **means, **fields)  # fmt: skip

    @property
    def per_job(self) -> list[Summary]:
        return [Summary(**row) for row in self.jobs]


def job_groups(model: nn.Module, job: Job) -> list[dict[str, Any]]:
    """``job``'s optimiser groups (tagged ``job``): its rate, weight decay on matrices and none on biases and
    norms (a classifier head's bias)."""
    groups = []
    for decay in (True, False):
        params = [p for n, p in job_parameters(model, job.name)
                  if decay == (p.ndim >= 2 and not any(k in n for k in ("bias", "norm", "LayerNorm")))]  # fmt: skip
        if params:
            groups.append({"params": params, "lr": job.cfg.learning_rate, "job": job.name,
                           "weight_decay": job.cfg.weight_decay if decay else 0.0})  # fmt: skip
    return groups


def save_job(model: nn.Module, job: Job, final: str, manifest: dict[str, Any]) -> None:
    """``job``'s adapter of LoraModel ``model`` in peft's format with its ``fastlora_run.json`` (``manifest`` plus the
    job's name and settings), written whole beside the directory ``final`` and renamed into place (durably)."""
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    config = {k: v for k, v in dataclasses.asdict(job.cfg).items() if k != "progress"}
    manifest = {**manifest, "job": job.name, "fastlora_config": config}
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=os.path.dirname(os.path.abspath(final)))
    try:
        tensors = {k: v.detach() for k, v in model.adapter_state_dict(job.name).items()}
        model.save(tmp, tensors, adapter_name=job.name)
        with open(os.path.join(tmp, "fastlora_run.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
