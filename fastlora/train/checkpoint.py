"""Resumable checkpoints of a run, and its artefacts: :class:`Checkpointer`, which the trainer owns and calls
with the model, optimiser, scheduler and :class:`~fastlora.train.state.RunState` to save or restore.

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
from torch import nn

from fastlora.train import methods as M
from fastlora.train.config import TrainConfig
from fastlora.train.runtime import Dist, TrainingError, _rng_state, _set_rng_state, fsdp2_reshard
from fastlora.train.state import RunState


def _finished(root: str) -> list[str]:
    """The complete checkpoint directories under ``root``, oldest first (step-N sorts by N: zero-padded)."""
    return sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))


class Checkpointer:
    """Saves and restores the checkpoints of the run ``cfg`` (under ``cfg.output_dir/checkpoints``, keeping
    the newest ``cfg.keep_checkpoints``) on the process group ``dist``.

    Every rank calls :meth:`save` and :meth:`load` together: rank 0 writes the parameters and the run state,
    every rank its RNG and, under FSDP2 (``cfg.fsdp`` on more than one process), its optimiser shard.
    """

    def __init__(self, cfg: TrainConfig, dist: Dist) -> None:
        self.cfg = cfg
        self.dist = dist
        self.root = os.path.join(cfg.output_dir, "checkpoints")
        self.sharded = cfg.fsdp and dist.world > 1  # FSDP2: parameters and optimiser state are DTensor shards

    def _gather_ready(self, model: nn.Module) -> None:
        """Under FSDP2, put ``model`` back into shards so that saving gathers whole parameters."""
        if self.sharded:
            fsdp2_reshard(model)

    def save_artifact(self, directory: str, model: nn.Module, manifest: dict[str, Any]) -> None:
        """What ``cfg.method`` trained in ``model``, into ``directory`` with ``manifest`` (see
        :func:`fastlora.train.methods.save_artifact`). Every rank takes part (FSDP2 shards are gathered
        collectively); rank 0 writes."""
        self._gather_ready(model)
        M.save_artifact(model, self.cfg.method, directory, manifest, write=self.dist.main)
        self.dist.barrier()

    def save(self, state: RunState, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> str:
        """Write checkpoint ``state.step`` of ``model``'s trainable parameters, ``optimizer``, ``scheduler``
        (an LR scheduler), every RNG and ``state`` into ``step-N.tmp``, then rename it to ``step-N``;
        drop the oldest beyond ``keep_checkpoints``. Returns the checkpoint's path."""
        final = os.path.join(self.root, f"step-{state.step:07d}")
        tmp = final + ".tmp"
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.dist.barrier()
        try:
            self._write(tmp, state, model, optimizer, scheduler)
            self.dist.barrier()
        except BaseException:
            if self.dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.dist.main:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in _finished(self.root)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        self.dist.barrier()
        return final

    def _write(self, tmp: str, state: RunState, model: nn.Module, optimizer, scheduler) -> None:
        rank = self.dist.rank
        self._gather_ready(model)
        # every rank gathers (a collective under FSDP2); rank 0 writes
        tensors = {n: M.full_tensor(t).cpu().clone() for n, t in M.trainable_state(model).items()}
        if self.sharded:
            torch.save(optimizer.state_dict(), os.path.join(tmp, f"optimizer-rank{rank}.pt"))
        torch.save(_rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))
        if not self.dist.main:
            return
        save_file(tensors, os.path.join(tmp, "trainable.safetensors"))
        extra = {"scheduler": scheduler.state_dict()}
        if not self.sharded:
            extra["optimizer"] = optimizer.state_dict()
        torch.save(extra, os.path.join(tmp, "optimizer.pt"))
        run = {**state.to_checkpoint(), "step": state.step, "world": self.dist.world,
               "config": dataclasses.asdict(self.cfg)}  # fmt: skip
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(run, f, indent=2)

    def latest(self) -> str | None:
        """The newest complete checkpoint's path, or None."""
        if not os.path.isdir(self.root):
            return None
        done = _finished(self.root)
        return os.path.join(self.root, done[-1]) if done else None

    def load(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> RunState:
        """Restore checkpoint ``path`` into ``model`` (its trainable parameters), ``optimizer``, ``scheduler``
        and every RNG; returns its run state. Refuses (:class:`TrainingError`) a checkpoint of a run with
        other settings (``TrainConfig.RESUME_KEYS``) or another number of processes."""
        with open(os.path.join(path, "state.json")) as f:
            saved = json.load(f)
        self._check_same_run(path, saved)
        self._load_parameters(path, model)
        extra = torch.load(os.path.join(path, "optimizer.pt"), weights_only=False)
        optimizer_state = extra.get("optimizer")
        if optimizer_state is None:
            optimizer_state = torch.load(os.path.join(path, f"optimizer-rank{self.dist.rank}.pt"), weights_only=False)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(extra["scheduler"])
        _set_rng_state(torch.load(os.path.join(path, f"rng-rank{self.dist.rank}.pt"), weights_only=False))
        return RunState.from_checkpoint(saved, saved["step"])

    def _check_same_run(self, path: str, saved: dict[str, Any]) -> None:
        config = saved["config"]
        for key in TrainConfig.RESUME_KEYS:
            if config.get(key) != getattr(self.cfg, key):
                raise TrainingError(f"fastlora: cannot resume from {path}: it was run with {key}={config.get(key)!r}, "
                                    f"this run has {key}={getattr(self.cfg, key)!r}")  # fmt: skip
        if saved["world"] != self.dist.world:
            raise TrainingError(f"fastlora: cannot resume from {path}: it was written by a run of a different number "
                                "of processes")  # fmt: skip

    def _load_parameters(self, path: str, model: nn.Module) -> None:
        tensors = load_file(os.path.join(path, "trainable.safetensors"))
        if not self.sharded:
            M.load_trainable_state(model, tensors, path)
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = dict(model.named_parameters())
        for name, value in tensors.items():  # scatter the full tensors into this rank's shards
            p = params.get(name)
            if isinstance(p, DTensor):
                tensors[name] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements).to_local()
        M.load_trainable_state(model, tensors, path, local=True)
