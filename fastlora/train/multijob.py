"""Several LoRA jobs on one frozen base in one run (``fastlora finetune --job NAME=DATA ... --job ...``).

Each job is a data file with its own adapter (named after the job), learning rate, schedule, epochs or steps,
batch size, validation, early stopping and artefacts (``OUTPUT_DIR/jobs/NAME/adapter`` and ``best``, peft's
format, each with its ``fastlora_run.json``: ``fastlora eval/merge/generate`` and peft load them as any run's).

A step takes one micro-batch from every job still training (each job reads its own data in its own order, as its
own run would: the order of an epoch depends on (seed, epoch) only) and lays them into one batch; the model runs it
once, each row through its job's adapter (:func:`fastlora.train.mixed.mixed`: one pass over the shared frozen base,
4-bit or float, for every job). The loss is the sum over jobs of each job's mean over its own examples or response
tokens, so each adapter's gradient is exactly that of its job alone (rows never mix in a transformer: the only
path from job A's adapter to job B's loss is through B's rows, which A's adapter does not touch). One optimiser
holds one group per job (and per weight-decay kind) with the job's rate and schedule; gradients are clipped per
job. A job that finishes its steps or stops early is frozen (no gradient: the optimiser skips it) and leaves the
batch; the others go on. So a job trains as its separate run with the same seed and settings would, up to the
order of float reductions (and dropout's random draws, which differ).

Checkpoints hold every job's adapter (frozen ones too), the optimiser, schedule, RNG and each job's state, and
``--resume`` continues bit for bit (tested against a straight run), refusing a run whose jobs changed. Not supported
with several jobs (refused before the model loads): several processes, DoRA, the base-rewriting starts
(pissa/olora/loftq: the base is shared), layer decay and LoRA+.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from fastlora.methods.report import count_parameters
from fastlora.train import data as D
from fastlora.train.config import TrainConfig
from fastlora.train.display import eval_line
from fastlora.train.loss import loss_count
from fastlora.train.memory import SavedActivations, make_optimizer, memory_note
from fastlora.train.metrics import MetricsLog
from fastlora.train.mixed import concat_batches, job_parameters, mixed, mixed_loss_sums, train_only
from fastlora.train.multijob_setup import (
    JOBS_DIR,
    Job,
    JobsCheckpointer,
    MultiRunState,
    MultiSummary,
    build_jobs_model,
    job_configs,
    job_groups,
    read_jobs_data,
    save_job,
)
from fastlora.train.packing import Packer
from fastlora.train.prepare import micro_batches
from fastlora.train.rundir import clean_leftovers
from fastlora.train.runtime import TrainingError, _peak_memory_mib, autocast_dtype, lr_lambda
from fastlora.train.state import Plan, RunState, StepResult
from fastlora.train.trained import QUANT_KEY, quantization_record
from fastlora.train.trainer import Trainer


class MultiJobTrainer(Trainer):
    """A run of several LoRA jobs on one frozen base (see the module's docstring); ``run()`` returns a
    :class:`MultiSummary`."""

    def __init__(self, cfg: TrainConfig, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        self.jobs = job_configs(cfg)
        self.checkpointer = JobsCheckpointer(cfg, self.dist, self.jobs)
        if self.dist.world > 1:
            raise TrainingError("fastlora: several jobs (--job/--jobs) train in one process; launch without torchrun")
        self.names = [job.name for job in self.jobs]

    # -- set-up -------------------------------------------------------------------------------

    def _set_up(self) -> Plan:
        cfg = self.cfg
        datas, data = read_jobs_data(self.jobs)
        self.task, self.labels, self.data_name = data.task, data.labels, data.name
        self.model, self.tokenizer, self.max_length, self.pad_id, self.model_path, self.model_name = (
            build_jobs_model(cfg, self.jobs, data, self.device))  # fmt: skip
        self.train_model = self.model
        self.base_quantization = quantization_record(self.model, autocast_dtype(cfg.precision, self.device))
        self.total = count_parameters(self.model)[1]
        packs = cfg.packing == "on" and self.task == "causal"
        self.packer = Packer(packs, self.pad_id, self.max_length)
        groups, schedules = [], []
        for job, d in zip(self.jobs, datas, strict=True):
            job.train = self._encode(d.train_records, f"job {job.name}: {job.cfg.data}")
            job.val = self._encode(d.val_records, f"job {job.name}: " + (job.cfg.val_data or "the validation split"))
            job.plan = Plan.make(job.cfg, len(job.train), 1)
            job.params = [p for _, p in job_parameters(self.model, job.name)]
            for group in job_groups(self.model, job):
                groups.append(group)
                schedules.append(lr_lambda(job.plan.total, job.plan.warmup, job.cfg.schedule))
            job.micro = self.packer(micro_batches(job.train, job.plan, 0, job.cfg, self.dist, self.pad_id, self.task))
        self.trainable = sum(p.numel() for job in self.jobs for p in job.params)
        self.train_examples = [e for job in self.jobs for e in job.train]  # for the header's counts
        self.val_examples = [e for job in self.jobs for e in job.val]
        train_only(self.model, self.names, self.names)
        os.makedirs(cfg.output_dir, exist_ok=True)
        for job in self.jobs:  # what a killed run's artefact writes left (the run directory's own: rundir.claim)
            where = os.path.join(cfg.output_dir, JOBS_DIR, job.name)
            for line in clean_leftovers(where) if os.path.isdir(where) else ():
                self._log(f"fastlora: {line} (left by an interrupted write)")
        self.metrics = MetricsLog(cfg.output_dir, main=True)
        self.optimizer = make_optimizer(groups, cfg.optim, cfg.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedules)
        self.activations = SavedActivations(self.model, offload=cfg.offload_activations,
                                            count=self.device.type == "cpu")  # fmt: skip
        total = max(job.plan.total for job in self.jobs)
        save_every = cfg.save_every or min(job.plan.save_every for job in self.jobs)
        return Plan(total=total, steps_per_epoch=1, grad_accum=cfg.grad_accum, warmup=0, log_every=cfg.log_every,
                    eval_every=total, save_every=save_every)  # fmt: skip

    def _start(self, plan: Plan) -> RunState:
        """A fresh, seeded run (each job evaluated before training), or under ``--resume`` the latest checkpoint's
        state: every job's adapter (frozen ones too), the optimiser, schedule, RNG, each job's state and place."""
        state = MultiRunState(jobs=self.jobs)
        if not self.cfg.resume:
            torch.manual_seed(self.cfg.seed)
            self.metrics.reset()
            state.before = {}
            for job in self.jobs:
                job.state.before = self.evaluate_job(job)
                self.metrics.write({"step": 0, "job": job.name, **job.state.before})
            return state
        path = self.checkpointer.resumable()
        train_only(self.model, self.names, self.names)  # every job's parameters are in the checkpoint
        loaded = self.checkpointer.load(path, self.model, self.optimizer, self.scheduler)
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            state.restore_jobs(json.load(f)["jobs"])
        state.__dict__.update({k: v for k, v in vars(loaded).items() if k != "jobs"})
        for job in self.jobs:
            job.micro = self.packer(micro_batches(job.train, job.plan, job.state.step, job.cfg, self.dist, self.pad_id,
                                                  self.task))  # fmt: skip
        train_only(self.model, [job.name for job in self.jobs if not job.done], self.names)
        self.metrics.trim(state.step)
        self._log(f"fastlora: resumed from {path} (step {state.step} of {plan.total})")
        return state

    def _checkpoint(self, state: RunState) -> str:
        """A checkpoint of every job's adapter (frozen ones too), the optimiser, schedule, RNG and run state."""
        train_only(self.model, self.names, self.names)
        try:
            return self.checkpointer.save(state, self.model, self.optimizer, self.scheduler)
        finally:
            train_only(self.model, [job.name for job in self.jobs if not job.done], self.names)

    # -- loss and evaluation ----------------------------------------------------------------

    def job_loss_sums(self, batch, slots: torch.Tensor, jobs: list[Job]) -> list[tuple[torch.Tensor, int, Any]]:
        """One forward of ``batch`` (rows of ``jobs[slots[i]]``) through the jobs' adapters: :func:`mixed_loss_sums`."""
        dtype = autocast_dtype(self.cfg.precision, self.device)
        chunked = self.cfg.ce_chunk_tokens if self.cfg.chunked_ce == "on" else False
        return mixed_loss_sums(self.model, batch, slots, [job.name for job in jobs], self.device, dtype, self.task,
                               chunked)  # fmt: skip

    @torch.no_grad()
    def evaluate_job(self, job: Job) -> dict[str, float]:
        """``job``'s validation loss (and a classifier's accuracy) through its adapter."""
        was = self.model.training
        self.model.eval()
        loss = count = correct = 0.0
        size = job.cfg.batch_size
        for start in range(0, len(job.val), size):
            part = job.val[start : start + size]
            batch = D.collate(part, self.pad_id, self.task)
            slots = torch.zeros(len(part), dtype=torch.long)
            ((s, n, logits),) = self.job_loss_sums(batch, slots, [job])
            loss, count = loss + s.item(), count + n
            if self.task == "classification":
                correct += (logits.argmax(-1).cpu() == batch["labels"]).sum().item()
        self.model.train(was)
        out = {"val_loss": loss / max(count, 1)}
        if self.task == "classification":
            out["val_accuracy"] = correct / max(count, 1)
        return out

    def evaluate(self) -> dict[str, float]:
        """The jobs' mean validation loss (and accuracy); each job's is :meth:`evaluate_job`."""
        results = [self.evaluate_job(job) for job in self.jobs]
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    # -- the loop -----------------------------------------------------------------------------

    def _train(self, plan: Plan, state: RunState, progress) -> None:
        for job in self.jobs:  # below the run's header
            self._log(f"  job {job.name}: {len(job.train)} train / {len(job.val)} val examples, {job.plan.total} "
                      f"steps of {job.cfg.batch_size * self.cfg.grad_accum}, lr {job.cfg.learning_rate:g} "
                      f"({job.cfg.schedule}), r {job.cfg.lora_r}")  # fmt: skip
        self.model.train()
        while state.step < plan.total and not all(job.done for job in self.jobs):
            if self._interrupted:
                state.stopped = "interrupted"
                return
            active = [job for job in self.jobs if not job.done]
            result, per_job = self.multi_step(active)
            state.record_step(result)
            self._report_step(plan, state, result, progress)
            if plan.logs(state.step):
                for job, (loss, lr, norm) in zip(active, per_job, strict=True):
                    self.metrics.write({"step": state.step, "job": job.name, "loss": loss, "lr": lr,
                                        **({"grad_norm": norm} if norm is not None else {})})  # fmt: skip
            for job in active:
                self._after_step(job, state.step)
            if plan.saves(state.step):
                self._checkpoint(state)
            if self.on_step is not None:
                self.on_step(state.step, self)

    def multi_step(self, active: list[Job]) -> tuple[StepResult, list[tuple[float, float, float | None]]]:
        """One optimiser step of the ``active`` jobs: ``grad_accum`` batches, each one micro-batch of every job;
        the run's StepResult (loss: the mean of the jobs') and per job (loss, rate used, gradient norm)."""
        t0 = time.perf_counter()
        groups = [[next(job.micro) for _ in range(self.cfg.grad_accum)] for job in active]
        counts = [float(sum(loss_count(b["labels"], self.task) for b in g)) for g in groups]
        sums, tokens = [0.0] * len(active), [0] * len(active)
        for i in range(self.cfg.grad_accum):
            batch, slots = concat_batches([g[i] for g in groups], self.pad_id)
            with self.activations.forward():
                parts = self.job_loss_sums(batch, slots, active)
            loss = sum(s / max(counts[j], 1.0) for j, (s, _, _) in enumerate(parts))
            with mixed(self.model, [job.name for job in active], slots):  # a checkpointed forward reruns here
                loss.backward()
            for j, (s, _, _) in enumerate(parts):
                sums[j] += s.item()
                tokens[j] += int(groups[j][i]["attention_mask"].sum())
        rates = {g["job"]: lr for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True)}
        clip = torch.nn.utils.clip_grad_norm_
        norms = [None if job.cfg.max_grad_norm is None else float(clip(job.params, job.cfg.max_grad_norm))
                 for job in active]  # fmt: skip
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        per_job, examples = [], 0
        for j, job in enumerate(active):
            per_job.append((sums[j] / max(counts[j], 1.0), rates[job.name], norms[j]))
            n = sum(int(b.get("examples", len(b["input_ids"]))) for b in groups[j])
            job.state.record_step(StepResult(per_job[-1][0], per_job[-1][1], tokens[j], n, seconds, norms[j]))
            examples += n
        loss = sum(p[0] for p in per_job) / len(per_job)
        result = StepResult(loss=loss, lr=per_job[0][1], tokens=sum(tokens), examples=examples, seconds=seconds,
                            grad_norm=None)  # fmt: skip
        return result, per_job

    def _after_step(self, job: Job, step: int) -> None:
        """Evaluate ``job`` when its plan says so (its ``best`` saved on a better loss), stop it early after
        ``patience`` evaluations without one, finish it after its last step: a stopped job is frozen."""
        if job.plan.evaluates(step):
            result = self.evaluate_job(job)
            self.metrics.write({"step": step, "job": job.name, **result})
            self._log(eval_line(step, job.plan.total, result).replace("  step", f"  {job.name}: step", 1))
            if job.state.record_eval(result):
                self.save_job(job, "best")
            patience = job.cfg.patience
            if patience is not None and job.state.bad_evals >= patience:
                job.state.stopped = f"early stop at step {step}: no better validation loss in {patience} evaluations"
                self._log(f"fastlora: job {job.name}: {job.state.stopped}")
                job.done = True
        if step >= job.plan.total:
            job.done = True
        if job.done:
            self.save_job(job, "adapter")
            job.saved = True
            train_only(self.model, [j.name for j in self.jobs if not j.done], self.names)

    # -- the finish ---------------------------------------------------------------------------

    def _finish(self, state: RunState, start: float) -> MultiSummary:
        """The last checkpoint, each job's final ``adapter`` (unless interrupted: the run continues with
        ``--resume``), the summary table (a row per job) and ``summary.json``."""
        path = self._checkpoint(state)
        interrupted = state.stopped == "interrupted"
        if interrupted:
            self._log(f"fastlora: saved {path}; continue with the same command and --resume")
        rows = []
        for job in self.jobs:
            if interrupted and not job.done:
                job.state.stopped = "interrupted"
            elif not job.saved:
                self.save_job(job, "adapter")
            last = job.state.last_eval
            after = last if last is not None and last["step"] == job.state.step else self.evaluate_job(job)
            trainable = sum(p.numel() for p in job.params)
            summary = job.state.summary(after, method=f"{self.cfg.method}:{job.name}", task=self.task,
                                        trainable=trainable, total=self.total, device=self.device,
                                        output_dir=os.path.join(self.cfg.output_dir, JOBS_DIR, job.name),
                                        wall_s=time.perf_counter() - start)  # fmt: skip
            rows.append(summary.to_dict())
            self._log(f"fastlora: job {job.name}: {summary.output_dir}/adapter (last), {summary.output_dir}/best "
                      f"(best val); {job.state.stopped}")  # fmt: skip
        kind = memory_note(self.device, "GPU allocated" if self.device.type == "cuda" else "process RSS",
                           self.optimizer, self.activations, self.cfg.offload_activations)  # fmt: skip
        summary = MultiSummary.of(rows, state, method=f"{self.cfg.method} ({len(self.jobs)} jobs)", task=self.task,
                                  trainable=self.trainable, total=self.total, memory_mib=_peak_memory_mib(self.device),
                                  memory_kind=kind, output_dir=self.cfg.output_dir,
                                  wall_s=time.perf_counter() - start)  # fmt: skip
        if self.packer.line():
            self._log(self.packer.line())
        from fastlora.methods.files import atomic_write

        atomic_write(
            os.path.join(self.cfg.output_dir, "summary.json"), json.dumps(summary.to_dict(), indent=2).encode()
        )
        self.metrics.close()
        return summary

    def save_job(self, job: Job, kind: str) -> None:
        """``kind`` ("adapter" or "best") of ``job`` into ``OUTPUT_DIR/jobs/NAME/kind`` (:func:`save_job`)."""
        manifest = {"method": self.cfg.method, "task": self.task, "labels": self.labels,
                    "base_model": os.path.abspath(self.model_path), "max_length": self.max_length,
                    QUANT_KEY: self.base_quantization}  # fmt: skip
        save_job(self.model, job, os.path.join(self.cfg.output_dir, JOBS_DIR, job.name, kind), manifest)
