"""The fine-tuning loop behind ``fastlora finetune``: one process, DDP under torchrun, or FSDP2.

A step is ``grad_accum`` micro-batches of ``batch_size`` examples on each of ``world`` ranks. The
loss of a step is the mean over all its examples (classification) or all its response tokens
(causal LM), whatever the split across micro-batches and ranks, so one process and DDP on the same
global batch compute the same update.

Checkpoints (every ``save_every`` steps, on Ctrl-C or SIGTERM, and at the end) hold the trainable parameters,
the optimiser and scheduler, every RNG and the step; the data order is a function of (seed, epoch)
so the position follows from the step. ``--resume`` continues bit for bit, and only the same run.
The output directory belongs to one run at a time (:mod:`fastlora.train.rundir`).

``run()`` is its phases: set-up (a :class:`Plan`), start (a fresh or resumed :class:`RunState`), the loop
(step, report, validate, early stop, checkpoint), finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator

import torch

from fastlora.methods.files import atomic_write
from fastlora.train import data as D
from fastlora.train import methods as M
from fastlora.train import rundir
from fastlora.train.checkpoint import Checkpointer
from fastlora.train.config import TrainConfig
from fastlora.train.display import ProgressBar, eval_line, header
from fastlora.train.loss import chunked_causal_loss_sum, forward_logits, loss_count, loss_sum
from fastlora.train.memory import SavedActivations, make_optimizer, memory_note
from fastlora.train.metrics import MetricsLog
from fastlora.train.packing import Packer
from fastlora.train.prepare import build_model, micro_batches, read_data
from fastlora.train.runtime import (  # noqa: F401  (re-exported: the trainer's public helpers)
    Dist,
    TrainingError,
    _minilm_path,
    _peak_memory_mib,
    autocast_dtype,
    check_model_dir,
    init_distributed,
    load_model,
    load_tokenizer,
    lr_lambda,
    model_max_length,
    out_of_memory_advice,
    param_groups,
    sigint_handler,
    stop_signals,
)
from fastlora.train.state import Plan, RunState, StepResult, Summary
from fastlora.train.trained import QUANT_KEY, quantization_record

Batch = dict[str, torch.Tensor]


class Trainer:
    """One fine-tuning run. ``Trainer(cfg).run()`` returns a :class:`Summary`.

    ``on_step(step, trainer)`` (tests, tools) is called after each optimiser step.
    """

    def __init__(
        self, cfg: TrainConfig, *, on_step: Callable[[int, Trainer], None] | None = None, console=None
    ) -> None:
        self.cfg = cfg
        self.on_step = on_step
        self.dist = init_distributed()
        if self.dist.world > 1 and cfg.max_steps is None and cfg.epochs is None:
            raise TrainingError("fastlora: set --epochs or --max-steps")
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
        self.console = console
        self.checkpointer = Checkpointer(cfg, self.dist)
        self._interrupted = False  # set by Ctrl-C or SIGTERM: the loop stops after the current step

    def run(self) -> Summary:
        start = time.perf_counter()
        model_path = self.cfg.model or _minilm_path()
        check_model_dir(model_path)
        self.checkpointer.identify(model_path)  # fingerprints the model and data, for checkpoints and --resume
        # before any model loads, so that a refusal comes at once
        own = rundir.hold(self.cfg, self.dist, self.device, check_resume=self.checkpointer.resumable, log=self._log)
        with own:
            plan = self._set_up()
            state = self._start(plan)
            self._log(header(self.cfg, model=self.model_name, task=self.task, data=self.data_name, n_train=len(
                self.train_examples), n_val=len(self.val_examples), trainable=self.trainable, total=self.total,
                steps=plan.total, world=self.dist.world, device=self.device.type))  # fmt: skip
            progress = ProgressBar(plan.total, state.step, enabled=self.dist.main and self.cfg.progress,
                                   console=self.console)  # fmt: skip
            # Ctrl-C or SIGTERM: finish the step, save, then stop. Every rank listens (torchrun passes a signal on
            # to each worker) and the ranks agree on the step to stop at (_stop_requested).
            stop = stop_signals(self._on_stop_signal)
            with stop, progress, out_of_memory_advice(self.cfg.batch_size):
                self._train(plan, state, progress)
            return self._finish(state, start)

    # -- set-up -------------------------------------------------------------------------------

    def _log(self, message: str) -> None:
        if self.dist.main:
            if self.console is not None:
                self.console.print(message)
            else:
                print(message, flush=True)

    def _set_up(self) -> Plan:
        """Data, model, encoded examples, output directory, metrics log, optimiser and schedule."""
        cfg = self.cfg
        data = read_data(cfg)
        self.task, self.labels, self.data_name = data.task, data.labels, data.name
        built = build_model(cfg, data, self.device, self.dist)
        self.model, self.train_model, self.tokenizer = built.model, built.train_model, built.tokenizer
        self.max_length, self.pad_id = built.max_length, built.pad_id
        self.trainable, self.total = built.trainable, built.total
        self.model_path, self.model_name = built.path, built.name
        # how a 4-bit base was quantised, so that eval/generate/merge rebuild the base the adapter trained on
        self.base_quantization = quantization_record(self.model, autocast_dtype(cfg.precision, self.device))
        self.train_examples = self._encode(data.train_records, cfg.data or "the embedded training set")
        self.val_examples = self._encode(data.val_records, cfg.val_data or "the validation split")
        if self.dist.main:
            os.makedirs(cfg.output_dir, exist_ok=True)
        self.metrics = MetricsLog(cfg.output_dir, main=self.dist.main)
        plan = Plan.make(cfg, len(self.train_examples), self.dist.world)
        self.optimizer = make_optimizer(param_groups(self.model, cfg), cfg.optim, cfg.learning_rate)
        self.activations = SavedActivations(self.model, offload=cfg.offload_activations,
                                            count=self.device.type == "cpu")  # fmt: skip
        # causal data: each micro-batch packed into rows (not under a prompt method, whose virtual tokens lead a row)
        packs = cfg.packing == "on" and self.task == "causal" and not M.recipe(cfg.method).virtual_tokens
        self.packer = Packer(packs, self.pad_id, self.max_length)
        schedule = lr_lambda(plan.total, plan.warmup, cfg.schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        return plan

    def _encode(self, records, where: str) -> list[D.Example]:
        if self.task == "classification":
            return D.encode_classification(records, self.tokenizer, self.labels, self.max_length, where)
        return D.encode_causal(records, self.tokenizer, self.max_length, where)

    def _start(self, plan: Plan) -> RunState:
        """A fresh, seeded run state, or under ``--resume`` the latest checkpoint's; then the validation
        metrics before training (a resumed run has them)."""
        if self.cfg.resume:
            state = self._resume(plan)
        else:
            torch.manual_seed(self.cfg.seed)
            self.metrics.reset()
            state = RunState()
        if state.before is None:
            state.before = self.evaluate()
            self.metrics.write({"step": 0, **state.before})
        return state

    def _resume(self, plan: Plan) -> RunState:
        path = self.checkpointer.resumable()
        state = self.checkpointer.load(path, self.model, self.optimizer, self.scheduler)
        self.metrics.trim(state.step)
        self._log(f"fastlora: resumed from {path} (step {state.step} of {plan.total})")
        return state

    # -- loss and evaluation ----------------------------------------------------------------

    def _forward(self, batch: Batch) -> torch.Tensor:
        """Logits aligned with the batch: (B, C) or (B, L, V) fp32 (virtual prompt positions dropped)."""
        return forward_logits(self.train_model, batch, self.device, autocast_dtype(self.cfg.precision, self.device),
                              self.task)  # fmt: skip

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(loss sum, terms, logits or None): a causal LM's by the chunked cross-entropy (no logits) unless
        --chunked-ce off, under FSDP, or with a head that is not plain; else from :meth:`_forward`'s logits."""
        if self.task == "causal" and self.cfg.chunked_ce == "on" and not self.cfg.fsdp:
            dtype = autocast_dtype(self.cfg.precision, self.device)
            out = chunked_causal_loss_sum(self.model, self.train_model, batch, self.device, dtype,
                                          self.cfg.ce_chunk_tokens)  # fmt: skip
            if out is not None:
                return (*out, None)
        logits = self._forward(batch)
        return (*loss_sum(logits, batch["labels"], self.task), logits)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (mean per example / per response token) and, for classifiers, accuracy."""
        was = self.model.training
        self.model.eval()
        loss = count = correct = 0.0
        shard = self.val_examples[self.dist.rank :: self.dist.world]
        for start in range(0, len(shard), self.cfg.batch_size):
            batch = D.collate(shard[start : start + self.cfg.batch_size], self.pad_id, self.task)
            s, n, logits = self._loss(batch)
            loss, count = loss + s.item(), count + n
            if self.task == "classification":
                correct += (logits.argmax(-1).cpu() == batch["labels"]).sum().item()
        loss, count, correct = self.dist.sum([loss, count, correct], self.device)
        self.model.train(was)
        out = {"val_loss": loss / max(count, 1)}
        if self.task == "classification":
            out["val_accuracy"] = correct / max(count, 1)
        return out

    # -- the loop -----------------------------------------------------------------------------

    def _train(self, plan: Plan, state: RunState, progress: ProgressBar) -> None:
        """Optimiser steps until the plan's last, Ctrl-C or an early stop (``state.stopped`` says which)."""
        micro = self.packer(micro_batches(self.train_examples, plan, state.step, self.cfg, self.dist, self.pad_id,
                                          self.task))  # fmt: skip
        self.model.train()
        while state.step < plan.total:
            if self._stop_requested():
                state.stopped = "interrupted"
                return
            result = self._step(micro)
            state.record_step(result)
            self._report_step(plan, state, result, progress)
            if plan.evaluates(state.step):
                self._validate(plan, state)
                if self._early_stop(state):
                    return
            if plan.saves(state.step):
                self.checkpointer.save(state, self.model, self.optimizer, self.scheduler)
            if self.on_step is not None:
                self.on_step(state.step, self)

    def _step(self, micro: Iterator[Batch]) -> StepResult:
        """One optimiser step over the next ``grad_accum`` micro-batches of ``micro`` (all ranks together)."""
        t0 = time.perf_counter()
        group = [next(micro) for _ in range(self.cfg.grad_accum)]
        count = self.dist.sum([float(loss_count(b["labels"], self.task)) for b in group], self.device)[0]
        summed, tokens = self._backward(group, count)
        lr, grad_norm = self._apply_gradients()
        summed, tokens = self.dist.sum([summed, float(tokens)], self.device)
        examples = sum(int(b.get("examples", len(b["input_ids"]))) for b in group) * self.dist.world  # packed: rows
        return StepResult(loss=summed / count, lr=lr, tokens=int(tokens), examples=examples,
                          seconds=time.perf_counter() - t0, grad_norm=grad_norm)  # fmt: skip

    def _backward(self, group: list[Batch], count: float) -> tuple[float, int]:
        """Forward and backward of each micro-batch of ``group``, the loss scaled so the step's gradient is the
        mean over all ``count`` examples (or tokens) of all ranks; (this rank's loss sum, its input tokens)."""
        summed, tokens = 0.0, 0
        for i, batch in enumerate(group):
            sync = i == len(group) - 1 or self.dist.world == 1 or self.cfg.fsdp  # DDP: reduce on the last only
            ctx = contextlib.nullcontext() if sync else self.train_model.no_sync()
            with ctx:
                with self.activations.forward():  # counted on a CPU; kept in CPU memory under --offload-activations
                    s, _, _ = self._loss(batch)
                (s * self.dist.world / count).backward()  # DDP averages over ranks
            summed += s.item()
            tokens += int(batch["attention_mask"].sum())
        return summed, tokens

    def _apply_gradients(self) -> tuple[float, float | None]:
        """Clip, step the optimiser and the schedule, clear the gradients; (the rate used, the gradient norm)."""
        grad_norm = None
        if self.cfg.max_grad_norm is not None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, grad_norm

    def _report_step(self, plan: Plan, state: RunState, result: StepResult, progress: ProgressBar) -> None:
        """Stop on a non-finite loss; log the step (every ``log_every``) and move the progress bar."""
        if not math.isfinite(result.loss):
            raise TrainingError(f"fastlora: the loss became {result.loss} at step {state.step}; lower --lr "
                                "or use --precision bf16/fp32")  # fmt: skip
        record = result.record(state.step, _peak_memory_mib(self.device))
        if plan.logs(state.step):
            self.metrics.write(record)
        progress.advance(record)

    def _validate(self, plan: Plan, state: RunState) -> None:
        """Evaluate, log it, and save the ``best`` artefact when the validation loss is the best so far."""
        result = self.evaluate()
        self.metrics.write({"step": state.step, **result})
        self._log(eval_line(state.step, plan.total, result))
        if state.record_eval(result):
            self._save_artifact("best")

    def _early_stop(self, state: RunState) -> bool:
        """True (and ``state.stopped`` set) after ``patience`` evaluations without a better validation loss."""
        patience = self.cfg.patience
        if patience is None or state.bad_evals < patience:
            return False
        state.stopped = f"early stop at step {state.step}: no better validation loss in {patience} evaluations"
        self._log(f"fastlora: {state.stopped}")
        return True

    def _stop_requested(self) -> bool:
        """Whether Ctrl-C reached any rank (a collective, so every rank stops at the same step)."""
        flag = float(self._interrupted)
        return self.dist.sum([flag], self.device)[0] > 0

    def _on_stop_signal(self, signum, frame) -> None:
        """Ctrl-C or SIGTERM: stop after the current step with a checkpoint (the CLI then exits 130 for either)."""
        if self._interrupted:  # a second one: give up at once
            raise KeyboardInterrupt
        self._interrupted = True
        name = signal.Signals(signum).name if signum in set(signal.Signals) else str(signum)
        self._log(f"fastlora: interrupted ({name}); finishing the current step and saving a resumable checkpoint...")

    # -- the finish ---------------------------------------------------------------------------

    def _finish(self, state: RunState, start: float) -> Summary:
        """The last checkpoint (and, unless interrupted, the final artefact), the summary and ``summary.json``."""
        path = self.checkpointer.save(state, self.model, self.optimizer, self.scheduler)
        if state.stopped == "interrupted":
            self._log(f"fastlora: saved {path}; continue with the same command and --resume")
        else:
            self._save_artifact("adapter")
        last = state.last_eval
        after = last if last is not None and last["step"] == state.step else self.evaluate()
        summary = state.summary(after, method=self.cfg.method, task=self.task, trainable=self.trainable,
                                total=self.total, device=self.device, output_dir=self.cfg.output_dir,
                                wall_s=time.perf_counter() - start)  # fmt: skip
        note = memory_note(self.device, summary.memory_kind, self.optimizer, self.activations,
                           self.cfg.offload_activations)  # fmt: skip
        summary = dataclasses.replace(summary, memory_kind=note)
        if self.packer.line():
            self._log(self.packer.line())
        if self.dist.main:
            atomic_write(os.path.join(self.cfg.output_dir, "summary.json"),
                         json.dumps(summary.to_dict(), indent=2).encode())  # fmt: skip
        self.metrics.close()
        return summary

    def _save_artifact(self, name: str) -> None:
        """``best`` or ``adapter``: what the method trained, as ``fastlora merge/eval`` and peft read it."""
        manifest = {
            "method": self.cfg.method,
            "task": self.task,
            "labels": self.labels,
            "base_model": os.path.abspath(self.model_path),
            "max_length": self.max_length,
            QUANT_KEY: self.base_quantization,
            "fastlora_config": {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "progress"},
        }
        self.checkpointer.save_artifact(os.path.join(self.cfg.output_dir, name), self.model, manifest)
