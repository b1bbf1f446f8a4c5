"""What a run shows while it trains: its header, the evaluation lines and the rich progress bar of the main rank."""

from __future__ import annotations

from typing import Any

from fastlora.train.config import TrainConfig


def header(cfg: TrainConfig, *, model: str, task: str, data: str, n_train: int, n_val: int, trainable: int,
           total: int, steps: int, world: int, device: str) -> str:  # fmt: skip
    """The two lines a run starts with: what trains on what, and the plan (``steps`` on ``world`` processes)."""
    share = 100 * trainable / total
    return (
        f"fastlora finetune: {cfg.method} on {model} ({task}), {n_train} train / {n_val} val examples from {data}\n"
        f"  trainable {trainable:,d} of {total:,d} parameters ({share:.2f}%), {steps} steps of "
        f"{cfg.batch_size * cfg.grad_accum * world} examples, lr {cfg.learning_rate:g} "
        f"({cfg.schedule}, warm-up {cfg.warmup_ratio:.0%}), {world} process(es) on {device}"
    )


def eval_line(step: int, total: int, result: dict[str, float]) -> str:
    """``  step s/total: val loss ...[, val accuracy ...]`` for an evaluation ``result``."""
    acc = f", val accuracy {result['val_accuracy']:.1%}" if "val_accuracy" in result else ""
    return f"  step {step}/{total}: val loss {result['val_loss']:.4f}{acc}"


class ProgressBar:
    """A rich progress bar over ``total`` steps, ``done`` of them already (a resumed run), showing the last
    step's loss, rate, speed and memory. Does nothing unless ``enabled``. A context manager: stops on exit."""

    def __init__(self, total: int, done: int, *, enabled: bool, console=None) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self.progress.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> ProgressBar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self, record: dict[str, Any]) -> None:
        """One step done; ``record`` is its metrics line (loss, lr, tokens_per_s, memory_mib)."""
        if self.progress is None:
            return
        info = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
                f"{record['memory_mib']:,.0f} MiB")  # fmt: skip
        self.progress.update(self.progress.task_ids[0], advance=1, info=info)
