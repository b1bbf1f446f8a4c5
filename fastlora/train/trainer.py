"""The fine-tuning loop behind ``fastlora finetune``: one process, DDP under torchrun, or FSDP2.

A step is ``grad_accum`` micro-batches of ``batch_size`` examples on each of ``world`` ranks. The
loss of a step is the mean over all its examples (classification) or all its response tokens
(causal LM), whatever the split across micro-batches and ranks, so one process and DDP on the same
global batch compute the same update.

Checkpoints (every ``save_every`` steps, on Ctrl-C, and at the end) hold the trainable parameters,
the optimiser and scheduler, every RNG and the step; the data order is a function of (seed, epoch)
so the position follows from the step. ``--resume`` continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastlora.adapters.io import atomic_write
from fastlora.adapters.wrapper import count_parameters
from fastlora.train import data as D
from fastlora.train import methods as M
from fastlora.train.checkpoint import CheckpointMixin
from fastlora.train.config import TrainConfig
from fastlora.train.runtime import (  # noqa: F401  (re-exported: the trainer's public helpers)
    Dist,
    TrainingError,
    _minilm_path,
    _peak_memory_mib,
    check_model_dir,
    init_distributed,
    load_model,
    load_tokenizer,
    lr_lambda,
    model_max_length,
    param_groups,
)


@dataclasses.dataclass
class Summary:
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


class Trainer(CheckpointMixin):
    """One fine-tuning run. ``Trainer(cfg).run()`` returns a :class:`Summary`.

    ``on_step(step, trainer)`` (tests, tools) is called after each optimiser step.
    """

    def __init__(self, cfg: TrainConfig, *, on_step=None, console=None) -> None:
        self.cfg = cfg
        self.on_step = on_step
        self.dist = init_distributed()
        if self.dist.world > 1 and cfg.max_steps is None and cfg.epochs is None:
            raise TrainingError("fastlora: set --epochs or --max-steps")
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu")
        self.console = console
        self._interrupted = False
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")

    # -- set-up -------------------------------------------------------------------------------

    def _log(self, message: str) -> None:
        if self.dist.main:
            if self.console is not None:
                self.console.print(message)
            else:
                print(message, flush=True)

    def _precision(self) -> torch.dtype | None:
        p = self.cfg.precision
        if p == "auto":
            p = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if p == "fp16" and self.device.type != "cuda":
            raise TrainingError("fastlora: fp16 mixed precision needs a GPU; use --precision bf16 or fp32 on CPU")
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]

    def _prepare_data(self) -> None:
        cfg = self.cfg
        if cfg.data is None:
            train_records, val_records = D.default_classification_data(seed=1234)
            self.task = "classification"
            self.data_name = "embedded 4-topic sentences (generated)"
        else:
            train_records = D.read_records(cfg.data, task=cfg.task, on_bad_line=cfg.on_bad_line)
            self.task = cfg.task or D.detect_task([r for _, r in train_records])
            if cfg.val_data:
                val_records = D.read_records(cfg.val_data, task=self.task, on_bad_line=cfg.on_bad_line)
            else:
                train_records, val_records = D.split_validation(train_records, cfg.val_split, cfg.seed)
            self.data_name = cfg.data
        self.train_records, self.val_records = train_records, val_records
        self.labels = None
        if self.task == "classification":
            self.labels = sorted({str(r["label"]) for _, r in train_records})
            if len(self.labels) < 2:
                raise D.DataError(f"{cfg.data}: a classifier needs at least two labels, found {self.labels}")

    def _prepare_model(self) -> None:
        cfg = self.cfg
        self.model_path = cfg.model or _minilm_path()
        self.model_name = os.path.basename(cfg.model.rstrip("/")) if cfg.model else "all-MiniLM-L6-v2 (embedded)"
        dtype = torch.float32
        if self.device.type == "cuda" and cfg.method != "full" and self._precision() is not None:
            dtype = self._precision()  # frozen bases in the compute dtype; trainable params kept fp32 below
        torch.manual_seed(cfg.seed)  # the fresh head and adapters start the same in every run
        base = load_model(self.model_path, self.task, self.labels, dtype)
        self.tokenizer = load_tokenizer(self.model_path)
        limit = model_max_length(base)
        self.max_length = min(cfg.max_length, limit) if limit else cfg.max_length
        if cfg.method in ("prompt", "ptuning", "prefix"):
            self.max_length = min(self.max_length, (limit or 10**9) - cfg.num_virtual_tokens)
        if cfg.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        model = M.build(base, cfg.method, cfg.method_options(), self.task)
        for p in model.parameters():
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()  # optimiser state and updates in fp32 (master weights)
        self.model = model.to(self.device)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.trainable, self.total = count_parameters(model)
        if self.trainable == 0:
            raise TrainingError(f"fastlora: method {cfg.method!r} left nothing trainable in this model")
        self.train_model = self.model
        if self.dist.world > 1:
            if cfg.fsdp:
                self.train_model = self._fully_shard(self.model)
            else:
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.dist.local_rank] if self.device.type == "cuda" else None
                self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        elif cfg.fsdp:
            raise TrainingError("fastlora: --fsdp shards across processes: launch with torchrun --nproc_per_node N")
        if cfg.fsdp and cfg.method not in ("lora", "qlora", "full", "head"):
            raise TrainingError(f"fastlora: --fsdp supports lora, qlora, full and head; {cfg.method} trains few "
                                "enough parameters for plain DDP (drop --fsdp)")  # fmt: skip

    def _fully_shard(self, model: nn.Module) -> nn.Module:
        """FSDP2: shard each transformer block, then the rest. A 4-bit base stays packed (uint8) and is
        sharded like any frozen parameter; its small statistics are replicated."""
        from torch.distributed.fsdp import fully_shard

        # FSDP2 before torch 2.13 creates every shard as nn.Parameter(t) (requires_grad=True), which an
        # integer tensor refuses. So a frozen byte parameter (the packed 4-bit base) is sharded as a
        # 1-byte float view of the same bytes: its quant_storage, which every 4-bit path reads as bytes.
        # Done on every torch version, so the path tested is the one that runs.
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if not p.is_floating_point() and not p.requires_grad and p.element_size() == 1:
                    setattr(module, name, nn.Parameter(p.data.view(torch.float8_e4m3fn), requires_grad=False))
        blocks = [m for name, m in model.named_modules() if name.endswith(tuple(f"layers.{i}" for i in range(999)))
                  or name.endswith(tuple(f"layer.{i}" for i in range(999)))]  # fmt: skip
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model

    def _encode(self, records, where):
        if self.task == "classification":
            return D.encode_classification(records, self.tokenizer, self.labels, self.max_length, where)
        return D.encode_causal(records, self.tokenizer, self.max_length, where)

    # -- loss and evaluation ----------------------------------------------------------------

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits aligned with the batch: (B, C) or (B, L, V) (virtual prompt positions dropped)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        dtype = self._precision()
        ctx = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            out = self.train_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits if hasattr(out, "logits") else out[0]
        if self.task == "causal":
            logits = logits[:, -batch["input_ids"].shape[1] :]
        return logits.float()

    def _loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(sum of per-example or per-token losses, how many) of one micro-batch."""
        labels = labels.to(logits.device)
        if self.task == "classification":
            return F.cross_entropy(logits, labels, reduction="sum"), labels.numel()
        shifted, targets = logits[:, :-1], labels[:, 1:]
        loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=D.IGNORE,
                               reduction="sum")  # fmt: skip
        return loss, int((targets != D.IGNORE).sum())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (mean per example / per response token) and, for classifiers, accuracy."""
        was = self.model.training
        self.model.eval()
        loss = count = correct = 0.0
        shard = self.val_examples[self.dist.rank :: self.dist.world]
        for start in range(0, len(shard), self.cfg.batch_size):
            batch = D.collate(shard[start : start + self.cfg.batch_size], self.pad_id, self.task)
            logits = self._forward(batch)
            s, n = self._loss_sum(logits, batch["labels"])
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

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self._interrupted = True
        self._log("fastlora: interrupted; finishing the current step and saving a resumable checkpoint...")

    def run(self) -> Summary:
        cfg = self.cfg
        start_wall = time.perf_counter()
        self._prepare_data()
        self._prepare_model()
        self.train_examples = self._encode(self.train_records, cfg.data or "the embedded training set")
        self.val_examples = self._encode(self.val_records, cfg.val_data or "the validation split")
        if self.dist.main:
            os.makedirs(cfg.output_dir, exist_ok=True)
        self.tb = None
        if self.dist.main:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))

        global_batch = cfg.batch_size * self.dist.world
        per_epoch = len(self.train_examples) // global_batch if self.dist.world > 1 else math.ceil(
            len(self.train_examples) / cfg.batch_size)  # fmt: skip
        steps_per_epoch = per_epoch // cfg.grad_accum
        if steps_per_epoch == 0:
            raise TrainingError(f"fastlora: {len(self.train_examples)} training examples make no full step of "
                                f"{global_batch * cfg.grad_accum}; lower --batch-size or --grad-accum")  # fmt: skip
        total = cfg.max_steps if cfg.max_steps is not None else steps_per_epoch * cfg.epochs
        warmup = int(cfg.warmup_ratio * total)
        eval_every = cfg.eval_every or steps_per_epoch
        save_every = cfg.save_every or eval_every

        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(total, warmup, cfg.schedule))
        state = {"best_val_loss": None, "bad_evals": 0, "before": None, "examples_seen": 0, "tokens_seen": 0}
        step = 0
        if cfg.resume:
            path = self.latest_checkpoint()
            if path is None:
                raise TrainingError(f"fastlora: --resume: no checkpoint under {self._checkpoint_root()}")
            state = self.load_checkpoint(path)
            step = state.pop("step")
            state.pop("config")
            self._trim_metrics(step)
            self._log(f"fastlora: resumed from {path} (step {step} of {total})")
        else:
            torch.manual_seed(cfg.seed)
            if self.dist.main and os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)
        if state["before"] is None:
            state["before"] = self.evaluate()
            self._metric({"step": 0, **state["before"]})

        self._log(self._header(total))
        stopped = "finished"
        previous = signal.getsignal(signal.SIGINT)
        if self.dist.main and sys.platform != "win32":
            with contextlib.suppress(ValueError):  # not the main thread: leave Ctrl-C alone
                signal.signal(signal.SIGINT, self._on_sigint)
        progress = self._progress(total, step)
        self.model.train()
        step_times, tokens_timed = [], 0
        try:
            micro = self._micro_batches(step * cfg.grad_accum, steps_per_epoch * cfg.grad_accum)
            while step < total:
                if self._stop_requested():
                    stopped = "interrupted"
                    break
                t0 = time.perf_counter()
                group = [next(micro) for _ in range(cfg.grad_accum)]
                count = self.dist.sum([float(self._count(b)) for b in group], self.device)[0]
                loss_total = 0.0
                tokens = 0
                for i, batch in enumerate(group):
                    sync = i == len(group) - 1 or self.dist.world == 1 or cfg.fsdp
                    ctx = contextlib.nullcontext() if sync else self.train_model.no_sync()
                    with ctx:
                        s, _ = self._loss_sum(self._forward(batch), batch["labels"])
                        (s * self.dist.world / count).backward()  # DDP averages over ranks
                    loss_total += s.item()
                    tokens += int(batch["attention_mask"].sum())
                grad_norm = None
                if cfg.max_grad_norm is not None:
                    params = [p for p in self.model.parameters() if p.requires_grad]
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_step = self.dist.sum([loss_total], self.device)[0] / count
                tokens = int(self.dist.sum([float(tokens)], self.device)[0])
                state["examples_seen"] += sum(len(b["input_ids"]) for b in group) * self.dist.world
                state["tokens_seen"] += tokens
                dt = time.perf_counter() - t0
                step_times.append(dt)
                tokens_timed += tokens
                if not math.isfinite(loss_step):
                    raise TrainingError(f"fastlora: the loss became {loss_step} at step {step}; lower --lr "
                                        "or use --precision bf16/fp32")  # fmt: skip
                record = {"step": step, "loss": loss_step, "lr": lr, "tokens_per_s": tokens / dt,
                          "memory_mib": _peak_memory_mib(self.device)}  # fmt: skip
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                if step % cfg.log_every == 0 or step == total:
                    self._metric(record)
                self._advance(progress, record)
                if step % eval_every == 0 or step == total:
                    result = self.evaluate()
                    state["last_eval"] = {"step": step, **result}
                    self._metric({"step": step, **result})
                    self._log(self._eval_line(step, total, result))
                    best = state["best_val_loss"]
                    if best is None or result["val_loss"] < best:
                        state["best_val_loss"], state["bad_evals"] = result["val_loss"], 0
                        state["best"] = result
                        self._save_artifact("best")
                    else:
                        state["bad_evals"] += 1
                    if cfg.patience is not None and state["bad_evals"] >= cfg.patience:
                        stopped = f"early stop at step {step}: no better validation loss in {cfg.patience} evaluations"
                        self._log(f"fastlora: {stopped}")
                        break
                if step % save_every == 0 and step < total:
                    self.save_checkpoint(step, state)
                if self.on_step is not None:
                    self.on_step(step, self)
        except torch.cuda.OutOfMemoryError as e:
            raise TrainingError(
                f"fastlora: out of GPU memory at batch size {cfg.batch_size} ({e}). Try a smaller --batch-size "
                "with a larger --grad-accum, --gradient-checkpointing, a shorter --max-length, or --method qlora"
            ) from e
        finally:
            self._close_progress(progress)
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, previous)
        if stopped == "interrupted":
            path = self.save_checkpoint(step, state)
            self._log(f"fastlora: saved {path}; continue with the same command and --resume")
        else:
            self.save_checkpoint(step, state)
            self._save_artifact("adapter")
        last = state.get("last_eval")
        after = last if last is not None and last["step"] == step else self.evaluate()
        summary = Summary(
            method=cfg.method,
            task=self.task,
            trainable=self.trainable,
            total=self.total,
            steps=step,
            examples_seen=state["examples_seen"],
            tokens_per_s=tokens_timed / max(sum(step_times), 1e-9),
            step_time_s=sum(step_times) / max(len(step_times), 1),
            peak_memory_mib=_peak_memory_mib(self.device),
            memory_kind="GPU allocated" if self.device.type == "cuda" else "process RSS",
            best_val_loss=state["best_val_loss"],
            val_loss_before=state["before"]["val_loss"],
            val_loss_after=after["val_loss"],
            val_accuracy_before=state["before"].get("val_accuracy"),
            val_accuracy_after=after.get("val_accuracy"),
            stopped=stopped,
            output_dir=cfg.output_dir,
            wall_s=time.perf_counter() - start_wall,
        )
        if self.dist.main:
            atomic_write(os.path.join(cfg.output_dir, "summary.json"), json.dumps(summary.to_dict(), indent=2).encode())
        if self.tb is not None:
            self.tb.close()
        return summary

    def _stop_requested(self) -> bool:
        flag = float(self._interrupted)
        return self.dist.sum([flag], self.device)[0] > 0

    def _count(self, batch: dict[str, torch.Tensor]) -> int:
        if self.task == "classification":
            return len(batch["labels"])
        return int((batch["labels"][:, 1:] != D.IGNORE).sum())

    def _micro_batches(self, skip: int, per_epoch: int):
        """Micro-batches from position ``skip`` on (the data position of a resumed run), epoch after epoch."""
        epoch, offset = divmod(skip, per_epoch)
        while True:
            for i, chunk in enumerate(D.batches(self.train_examples, self.cfg.batch_size, self.cfg.seed, epoch,
                                                self.dist.rank, self.dist.world)):  # fmt: skip
                if i >= per_epoch:
                    break
                if i >= offset:
                    yield D.collate(chunk, self.pad_id, self.task)
            epoch, offset = epoch + 1, 0

    def _save_artifact(self, name: str) -> None:
        """``best`` or ``adapter``: what the method trained, as ``fastlora merge/eval`` and peft read it."""
        self._reshard()
        manifest = {  # every rank takes part: FSDP shards are gathered collectively
            "method": self.cfg.method,
            "task": self.task,
            "labels": self.labels,
            "base_model": os.path.abspath(self.model_path),
            "max_length": self.max_length,
            "fastlora_config": {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "progress"},
        }
        M.save_artifact(self.model, self.cfg.method, os.path.join(self.cfg.output_dir, name), manifest,
                        write=self.dist.main)  # fmt: skip
        self.dist.barrier()

    # -- display ------------------------------------------------------------------------------

    def _header(self, total: int) -> str:
        cfg = self.cfg
        share = 100 * self.trainable / self.total
        return (
            f"fastlora finetune: {cfg.method} on {self.model_name} ({self.task}), "
            f"{len(self.train_examples)} train / {len(self.val_examples)} val examples from {self.data_name}\n"
            f"  trainable {self.trainable:,d} of {self.total:,d} parameters ({share:.2f}%), {total} steps of "
            f"{cfg.batch_size * cfg.grad_accum * self.dist.world} examples, lr {cfg.learning_rate:g} "
            f"({cfg.schedule}, warm-up {cfg.warmup_ratio:.0%}), {self.dist.world} process(es) on {self.device.type}"
        )

    def _eval_line(self, step: int, total: int, result: dict[str, float]) -> str:
        acc = f", val accuracy {result['val_accuracy']:.1%}" if "val_accuracy" in result else ""
        return f"  step {step}/{total}: val loss {result['val_loss']:.4f}{acc}"

    def _progress(self, total: int, done: int):
        if not (self.dist.main and self.cfg.progress):
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        progress.start()
        progress.add_task("train", total=total, completed=done, info="")
        return progress

    def _advance(self, progress, record: dict[str, Any]) -> None:
        if progress is None:
            return
        info = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
                f"{record['memory_mib']:,.0f} MiB")  # fmt: skip
        progress.update(progress.task_ids[0], advance=1, info=info)

    def _close_progress(self, progress) -> None:
        if progress is not None:
            progress.stop()
