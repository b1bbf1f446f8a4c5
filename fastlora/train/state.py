"""The typed state of a fine-tuning run: its fixed plan, what the loop carries, one step's result, the summary.

:class:`Plan` is decided once at set-up (how many steps, when to log, evaluate and save). :class:`RunState`
is what changes from step to step; its persisted part is a checkpoint's ``state.json`` (beside ``step``,
``world`` and ``config``, which the checkpointer adds). The data position is not stored: the example order
is a function of (seed, epoch), so :meth:`Plan.data_position` finds it from the step alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from fastlora.train.config import TrainConfig
from fastlora.train.runtime import TrainingError, _peak_memory_mib


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shape of a run, fixed at set-up. A step is ``grad_accum`` micro-batches on every rank."""

    total: int  # optimiser steps of the whole run
    steps_per_epoch: int
    grad_accum: int
    warmup: int  # steps of linear warm-up
    log_every: int
    eval_every: int
    save_every: int

    @classmethod
    def make(cls, cfg: TrainConfig, n_examples: int, world: int) -> Plan:
        """The plan of ``cfg`` over ``n_examples`` training examples on ``world`` processes.

        Under DDP an epoch has only full global batches (``batch_size * world``), so the ranks stay in step;
        one process keeps the partial last batch.
        """
        global_batch = cfg.batch_size * world
        per_epoch = n_examples // global_batch if world > 1 else math.ceil(n_examples / cfg.batch_size)
        steps_per_epoch = per_epoch // cfg.grad_accum
        if steps_per_epoch == 0:
            raise TrainingError(f"fastlora: {n_examples} training examples make no full step of "
                                f"{global_batch * cfg.grad_accum}; lower --batch-size or --grad-accum")  # fmt: skip
        total = cfg.max_steps if cfg.max_steps is not None else steps_per_epoch * cfg.epochs
        eval_every = cfg.eval_every or steps_per_epoch
        return cls(
            total=total,
            steps_per_epoch=steps_per_epoch,
            grad_accum=cfg.grad_accum,
            warmup=int(cfg.warmup_ratio * total),
            log_every=cfg.log_every,
            eval_every=eval_every,
            save_every=cfg.save_every or eval_every,
        )

    @property
    def micro_per_epoch(self) -> int:
        """Micro-batches of one epoch that steps use (a remainder short of a whole step is skipped)."""
        return self.steps_per_epoch * self.grad_accum

    def data_position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batch within it) where the data stands after ``step`` optimiser steps."""
        return divmod(step * self.grad_accum, self.micro_per_epoch)

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total

    def evaluates(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total

    def saves(self, step: int) -> bool:
        """A periodic checkpoint after ``step`` (the last step's is written by the finish)."""
        return step % self.save_every == 0 and step < self.total


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One optimiser step, summed over every rank."""

    loss: float  # mean per example (classification) or per response token (causal LM)
    lr: float  # the rate this step used
    tokens: int  # non-padding input tokens
    examples: int
    seconds: float
    grad_norm: float | None  # before clipping; None without --max-grad-norm

    def record(self, step: int, memory_mib: float) -> dict[str, Any]:
        """The step's ``metrics.jsonl`` line."""
        record = {"step": step, "loss": self.loss, "lr": self.lr, "tokens_per_s": self.tokens / self.seconds,
                  "memory_mib": memory_mib}  # fmt: skip
        if self.grad_norm is not None:
            record["grad_norm"] = self.grad_norm
        return record


# the fields of RunState a checkpoint keeps; the rest (stop reason, timing) belong to one process's run
_PERSISTED = ("best_val_loss", "bad_evals", "before", "examples_seen", "tokens_seen")


@dataclasses.dataclass
class RunState:
    """What the loop carries from step to step."""

    step: int = 0  # optimiser steps done
    examples_seen: int = 0  # over all ranks, since the first step of the run (resumes included)
    tokens_seen: int = 0
    before: dict[str, float] | None = None  # validation metrics before the first step
    last_eval: dict[str, Any] | None = None  # {"step": s, "val_loss": ..., ["val_accuracy": ...]}
    best: dict[str, float] | None = None  # the validation metrics of the best evaluation
    best_val_loss: float | None = None
    bad_evals: int = 0  # evaluations since the best one (early stopping counts these)
    stopped: str = "finished"  # or "interrupted", or the early-stop reason
    step_times: list[float] = dataclasses.field(default_factory=list)  # this process's steps, in seconds
    tokens_timed: int = 0  # tokens of the timed steps

    def record_step(self, result: StepResult) -> None:
        self.step += 1
        self.examples_seen += result.examples
        self.tokens_seen += result.tokens
        self.step_times.append(result.seconds)
        self.tokens_timed += result.tokens

    def record_eval(self, result: dict[str, float]) -> bool:
        """Note an evaluation at the current step; True when its validation loss is the best so far."""
        self.last_eval = {"step": self.step, **result}
        if self.best_val_loss is None or result["val_loss"] < self.best_val_loss:
            self.best_val_loss, self.bad_evals, self.best = result["val_loss"], 0, result
            return True
        self.bad_evals += 1
        return False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_timed / max(sum(self.step_times), 1e-9)

    @property
    def step_time_s(self) -> float:
        return sum(self.step_times) / max(len(self.step_times), 1)

    def to_checkpoint(self) -> dict[str, Any]:
        """The JSON-ready run state of a checkpoint (``last_eval``/``best`` only once there was one)."""
        out = {key: getattr(self, key) for key in _PERSISTED}
        for key in ("last_eval", "best"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def summary(self, after: dict[str, float], *, method: str, task: str, trainable: int, total: int,
                device: torch.device, output_dir: str, wall_s: float) -> Summary:  # fmt: skip
        """The :class:`Summary` of a run that ends in this state, ``after`` being its last evaluation."""
        return Summary(
            method=method,
            task=task,
            trainable=trainable,
            total=total,
            steps=self.step,
            examples_seen=self.examples_seen,
            tokens_per_s=self.tokens_per_s,
            step_time_s=self.step_time_s,
            peak_memory_mib=_peak_memory_mib(device),
            memory_kind="GPU allocated" if device.type == "cuda" else "process RSS",
            best_val_loss=self.best_val_loss,
            val_loss_before=self.before["val_loss"],
            val_loss_after=after["val_loss"],
            val_accuracy_before=self.before.get("val_accuracy"),
            val_accuracy_after=after.get("val_accuracy"),
            stopped=self.stopped,
            output_dir=output_dir,
            wall_s=wall_s,
        )

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], step: int) -> RunState:
        """The run state :meth:`to_checkpoint` wrote, at ``step``."""
        return cls(step=step, last_eval=saved.get("last_eval"), best=saved.get("best"),
                   **{key: saved[key] for key in _PERSISTED})  # fmt: skip


@dataclasses.dataclass
class Summary:
    """What a run did (``summary.json``, the ``fastlora finetune``/``compare`` tables)."""

    method: str
    task: str
    trainable: int
    total: int
    steps: int
    examples_seen: int
    tokens_per_s: float
    step_time_s: float
    peak_memory_mib: float
    memory_kind: str
    best_val_loss: float | None
    val_loss_before: float | None
    val_loss_after: float | None
    val_accuracy_before: float | None
    val_accuracy_after: float | None
    stopped: str
    output_dir: str
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
