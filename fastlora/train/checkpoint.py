"""Resumable checkpoints of a run, and its artefacts: :class:`Checkpointer`, which the trainer owns and calls
with the model, optimiser, scheduler and :class:`~fastlora.train.state.RunState` to save or restore.

A checkpoint directory ``checkpoints/step-N`` is written as ``step-N.tmp`` and renamed when complete:
``trainable.safetensors`` (every trainable parameter, whole), ``optimizer.pt`` (scheduler, and the
optimiser unless sharded), ``optimizer-rank{r}.pt`` (FSDP2: each rank's optimiser shard),
``rng-rank{r}.pt`` (every RNG of each rank) and ``state.json`` (step, run state, settings).

Every ``.pt`` file holds tensors and plain data only and is read with ``torch.load(weights_only=True)``: a
checkpoint is data a user may be handed, and unpickling it could run any code. ``state.json`` also records what
decides a run's result (:func:`fastlora.train.rundir.run_settings`: the settings, the base model's and the data's
fingerprints), and ``--resume`` continues only the same run, naming every difference otherwise. Each file and
directory is fsynced before the rename that publishes the checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pickle
import re
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastlora.train import methods as M
from fastlora.train.config import TrainConfig
from fastlora.train.durable import fsync_path, replace_dir
from fastlora.train.rundir import differences, run_settings
from fastlora.train.runtime import Dist, TrainingError, _minilm_path, _rng_state, _set_rng_state, fsdp2_reshard
from fastlora.train.state import RunState


def _finished(root: str) -> list[str]:
    """The complete checkpoint directories under ``root``, oldest first (step-N sorts by N: zero-padded)."""
    return sorted(d for d in os.listdir(root) if re.fullmatch(r"step-\d+", d))


def _load_plain(path: str, checkpoint: str) -> Any:
    """``torch.load`` of checkpoint file ``path`` refusing anything but tensors and plain data (``weights_only``);
    a file that names code, or is damaged, is a :class:`TrainingError` that says what to do."""
    if torch.distributed.is_available():  # registers DTensor (FSDP2 optimiser shards) as plain data
        importlib.import_module("torch.distributed.tensor")

    remedy = f"delete {checkpoint} to resume from an earlier checkpoint, or start again with --overwrite"
    if not os.path.isfile(path):
        raise TrainingError(f"fastlora: cannot resume from {checkpoint}: {os.path.basename(path)} is missing; "
                            f"{remedy}")  # fmt: skip
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is mostly advice to load with weights_only=False, which is exactly what must not happen
        why = next((line for line in str(e).splitlines() if "GLOBAL" in line), "").rstrip(".")
        raise TrainingError(
            f"fastlora: refusing to resume from {checkpoint}: {path} holds Python objects that loading would have to "
            f"run{f' ({why})' if why else ''}, where a fastlora checkpoint holds only tensors and plain data. It was "
            f"not written by this version of fastlora, or it was tampered with; nothing of it was run. "
            f"{remedy[0].upper()}{remedy[1:]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise TrainingError(f"fastlora: cannot resume from {checkpoint}: {path} is damaged ({e}); {remedy}") from e


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
        self.settings: dict[str, Any] | None = None  # what identifies the run (see identify)

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
            for path in self._write(tmp, state, model, optimizer, scheduler):
                fsync_path(path)  # each rank its own files (a shared filesystem may cache per host)
            self.dist.barrier()
        except BaseException:
            if self.dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.dist.main:
            replace_dir(tmp, final)  # fsyncs the files and the directory, renames, fsyncs checkpoints/
            for old in _finished(self.root)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        self.dist.barrier()
        return final

    def _write(self, tmp: str, state: RunState, model: nn.Module, optimizer, scheduler) -> list[str]:
        """This rank's files of the checkpoint into ``tmp``; returns their paths."""
        rank = self.dist.rank
        self._gather_ready(model)
        # every rank gathers (a collective under FSDP2); rank 0 writes
        tensors = {n: M.full_tensor(t).cpu().clone() for n, t in M.trainable_state(model).items()}
        written = []
        if self.sharded:
            written.append(os.path.join(tmp, f"optimizer-rank{rank}.pt"))
            torch.save(optimizer.state_dict(), written[-1])
        written.append(os.path.join(tmp, f"rng-rank{rank}.pt"))
        torch.save(_rng_state(), written[-1])
        if not self.dist.main:
            return written
        written.append(os.path.join(tmp, "trainable.safetensors"))
        save_file(tensors, written[-1])
        extra = {"scheduler": scheduler.state_dict()}
        if not self.sharded:
            extra["optimizer"] = optimizer.state_dict()
        written.append(os.path.join(tmp, "optimizer.pt"))
        torch.save(extra, written[-1])
        run = {**state.to_checkpoint(), "step": state.step, "world": self.dist.world,
               "config": dataclasses.asdict(self.cfg), "settings": self.settings}  # fmt: skip
        written.append(os.path.join(tmp, "state.json"))
        with open(written[-1], "w") as f:
            json.dump(run, f, indent=2)
        return written

    def latest(self) -> str | None:
        """The newest complete checkpoint's path, or None."""
        if not os.path.isdir(self.root):
            return None
        done = _finished(self.root)
        return os.path.join(self.root, done[-1]) if done else None

    def load(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> RunState:
        """Restore checkpoint ``path`` into ``model`` (its trainable parameters), ``optimizer``, ``scheduler``
        and every RNG; returns its run state. Refuses (:class:`TrainingError`) a checkpoint of another run
        (:meth:`check_same_run`) and any file holding more than tensors and plain data."""
        saved = self.check_same_run(path)
        extra = _load_plain(os.path.join(path, "optimizer.pt"), path)  # every file read before anything changes
        optimizer_state = extra.get("optimizer") if isinstance(extra, dict) else None
        if optimizer_state is None:
            optimizer_state = _load_plain(os.path.join(path, f"optimizer-rank{self.dist.rank}.pt"), path)
        rng = _load_plain(os.path.join(path, f"rng-rank{self.dist.rank}.pt"), path)
        self._load_parameters(path, model)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(extra["scheduler"])
        _set_rng_state(rng)
        return RunState.from_checkpoint(saved, saved["step"])

    def identify(self, model_path: str) -> None:
        """Record what identifies this run (:func:`run_settings` on the base model at ``model_path``): every
        checkpoint stores it and :meth:`check_same_run` compares with it."""
        self.settings = run_settings(self.cfg, model_path)

    def resumable(self) -> str:
        """The checkpoint ``--resume`` continues from: the newest, once :meth:`check_same_run` passed."""
        path = self.latest()
        if path is None:
            raise TrainingError(f"fastlora: --resume: no checkpoint under {self.root}; start the run without "
                                "--resume (--overwrite if the directory holds an earlier run's files)")  # fmt: skip
        self.check_same_run(path)
        return path

    def check_same_run(self, path: str) -> dict[str, Any]:
        """``state.json`` of checkpoint ``path``, once it is known to be of this run: the same settings, base
        model, data (:func:`run_settings`) and number of processes. Otherwise a :class:`TrainingError` naming
        every difference."""
        state_path = os.path.join(path, "state.json")
        try:
            with open(state_path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise TrainingError(f"fastlora: cannot resume from {path}: {state_path} is unreadable ({e}); delete "
                                f"{path} to resume from an earlier checkpoint, or start again with "
                                "--overwrite") from e  # fmt: skip
        if not isinstance(saved, dict) or "settings" not in saved:
            raise TrainingError(f"fastlora: cannot resume from {path}: it was written by an earlier version of "
                                "fastlora, which recorded neither its settings nor its random state as plain data; "
                                "start again with --overwrite")  # fmt: skip
        if saved.get("world") != self.dist.world:
            raise TrainingError(f"fastlora: cannot resume from {path}: it was written by a run of "
                                f"{saved.get('world')} process(es), this run has {self.dist.world}")  # fmt: skip
        if self.settings is None:
            self.identify(self.cfg.model or _minilm_path())
        found = differences(saved["settings"], self.settings)
        if found:
            raise TrainingError(f"fastlora: cannot resume from {path}: {'; '.join(found)}. Resume with the settings, "
                                "model and data it was run with, or start a new run: --overwrite (deletes this one) "
                                "or another --output-dir")  # fmt: skip
        return saved

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
