"""Checkpoints and the metrics log of a run (a mixin of :class:`fastlora.train.trainer.Trainer`).

A checkpoint directory ``checkpoints/step-N`` is written as ``step-N.tmp`` and renamed when complete:
``trainable.safetensors`` (every trainable parameter, whole), ``optimizer.pt`` (scheduler, and the
optimiser unless sharded), ``optimizer-rank{r}.pt`` (FSDP2: each rank's optimiser shard),
``rng-rank{r}.pt`` (every RNG of each rank) and ``state.json`` (step, run state, settings).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastlora.train import methods as M
from fastlora.train.config import TrainConfig
from fastlora.train.runtime import TrainingError, _rng_state, _set_rng_state


class CheckpointMixin:
    """save_checkpoint / latest_checkpoint / load_checkpoint and the metrics.jsonl log, for a Trainer
    (which provides cfg, dist, model, optimizer, scheduler, metrics_path and tb)."""

    def _checkpoint_root(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoints")

    def _reshard(self) -> None:
        """Under FSDP2, every parameter back to its DTensor shard (the root stays unsharded after forward,
        holding views of a freed all-gather buffer), so the gathers below see whole parameters."""
        if self.cfg.fsdp and self.dist.world > 1:
            from torch.distributed.fsdp import FSDPModule

            for m in self.model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> str:
        """Write checkpoint ``step`` into ``step-N.tmp``, then rename it to ``step-N`` (all ranks take part:
        rank 0 writes the parameters and the run state, every rank its RNG and, under FSDP, its optimiser shard)."""
        root = self._checkpoint_root()
        final = os.path.join(root, f"step-{step:07d}")
        tmp = final + ".tmp"
        rank = self.dist.rank
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.dist.barrier()
        try:
            self._reshard()
            tensors = {n: M.full_tensor(t).cpu().clone() for n, t in M.trainable_state(self.model).items()}
            sharded_optimizer = self.cfg.fsdp and self.dist.world > 1
            if sharded_optimizer:
                torch.save(self.optimizer.state_dict(), os.path.join(tmp, f"optimizer-rank{rank}.pt"))
            torch.save(_rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))
            if self.dist.main:
                save_file(tensors, os.path.join(tmp, "trainable.safetensors"))
                extra = {"scheduler": self.scheduler.state_dict()}
                if not sharded_optimizer:
                    extra["optimizer"] = self.optimizer.state_dict()
                torch.save(extra, os.path.join(tmp, "optimizer.pt"))
                run = {**state, "step": step, "world": self.dist.world, "config": dataclasses.asdict(self.cfg)}
                with open(os.path.join(tmp, "state.json"), "w") as f:
                    json.dump(run, f, indent=2)
            self.dist.barrier()
        except BaseException:
            if self.dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.dist.main:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            kept = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
            for old in kept[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        self.dist.barrier()
        return final

    def latest_checkpoint(self) -> str | None:
        root = self._checkpoint_root()
        if not os.path.isdir(root):
            return None
        done = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
        return os.path.join(root, done[-1]) if done else None

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        saved = state["config"]
        for key in TrainConfig.RESUME_KEYS:
            if saved.get(key) != getattr(self.cfg, key):
                raise TrainingError(f"fastlora: cannot resume from {path}: it was run with {key}={saved.get(key)!r}, "
                                    f"this run has {key}={getattr(self.cfg, key)!r}")  # fmt: skip
        if state.pop("world") != self.dist.world:
            raise TrainingError(f"fastlora: cannot resume from {path}: it was written by a run of a different number "
                                "of processes")  # fmt: skip
        tensors = load_file(os.path.join(path, "trainable.safetensors"))
        if self.cfg.fsdp and self.dist.world > 1:  # scatter the full tensors into this rank's shards
            from torch.distributed.tensor import DTensor, distribute_tensor

            params = dict(self.model.named_parameters())
            for name, value in tensors.items():
                p = params.get(name)
                if isinstance(p, DTensor):
                    tensors[name] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements).to_local()
            M.load_trainable_state(self.model, tensors, path, local=True)
        else:
            M.load_trainable_state(self.model, tensors, path)
        extra = torch.load(os.path.join(path, "optimizer.pt"), weights_only=False)
        optimizer = extra.get("optimizer")
        if optimizer is None:
            optimizer = torch.load(os.path.join(path, f"optimizer-rank{self.dist.rank}.pt"), weights_only=False)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        _set_rng_state(torch.load(os.path.join(path, f"rng-rank{self.dist.rank}.pt"), weights_only=False))
        return state

    # -- metrics ------------------------------------------------------------------------------

    def _metric(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def _trim_metrics(self, step: int) -> None:
        """On resume, drop what the interrupted run logged after its last checkpoint (atomic rewrite)."""
        if not self.dist.main or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.metrics_path)
