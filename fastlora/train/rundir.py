"""The output directory of a run, owned by one run at a time.

:func:`claim` takes the directory for the run's life: a lock (``.fastlora.lock``, an ``flock`` the kernel drops
when its process dies, so a killed run's lock is taken over and never needs removing by hand); leftovers of a
killed run's writes put back or removed; and a fresh run refused where another run's files are (continue it
with ``--resume`` or delete them with ``--overwrite``). :func:`model_fingerprint` and :func:`data_fingerprint`
identify what a run trained on, so ``--resume`` can tell that it is continuing the same run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fastlora.train.config import TrainConfig
from fastlora.train.durable import fsync_path
from fastlora.train.runtime import Dist, TrainingError

LOCK_NAME = ".fastlora.lock"
# what a run writes into its output directory: --overwrite deletes these and nothing else
RUN_FILES = ("checkpoints", "adapter", "best", "metrics.jsonl", "summary.json", "tensorboard", "jobs")  # jobs: multijob
ARTIFACTS = ("adapter", "best")  # published by replace_dir: name.tmp-XXXX while written, name.old while replaced
STEP = re.compile(r"step-\d+")


class RunLock:
    """An exclusive ``flock`` on ``directory/.fastlora.lock`` for this process (see :func:`claim`). The file holds
    the owner's pid, host, start time and command while the lock is held and is emptied on release, so a
    non-empty file found unlocked was left by a run that did not end normally."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd: int | None = None
        self.previous: dict[str, Any] | None = None  # the owner record a killed run left, if any

    def acquire(self) -> RunLock:
        """Take the lock now or raise :class:`TrainingError` naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: another process holds it
            owner = _read_owner(fd)
            os.close(fd)
            who = _describe(owner) if owner else "another process (it has not written its name yet)"
            raise TrainingError(
                f"fastlora: {os.path.dirname(self.path)} is in use by another run: {who}. Wait for it to end "
                "(or stop it), or choose another --output-dir"
            ) from None
        self.previous = _read_owner(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Empty the file (a clean end) and drop the lock."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        owner = json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    return (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')} "
            f"({owner.get('command', '?')})")  # fmt: skip


def clean_leftovers(directory: str) -> list[str]:
    """Put back or remove what a run killed mid-write left in ``directory``; returns what was done, for a log line.

    A checkpoint or artefact is written under a temporary name and renamed when complete, so a temporary one is
    incomplete or unpublished and goes. ``NAME.old`` (a published directory being replaced) goes too, unless the
    kill came between the two renames and ``NAME`` is missing: then it is put back, the last complete version.
    """
    done = []
    places = [(directory, ARTIFACTS), (os.path.join(directory, "checkpoints"), None)]
    for where, names in places:
        if not os.path.isdir(where):
            continue
        for entry in sorted(os.listdir(where)):
            path = os.path.join(where, entry)
            base, dot, rest = entry.partition(".")
            ours = STEP.fullmatch(base) if names is None else base in names
            if not ours or not dot or not (rest in ("tmp", "old") or rest.startswith("tmp-")):
                continue
            final = os.path.join(where, base)
            if rest == "old" and not os.path.exists(final):
                os.rename(path, final)
                done.append(f"restored {final} from {entry}")
            else:
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path}")
    for entry in sorted(os.listdir(directory)):  # half-written files of atomic_write (".tmp-XXXXsummary.json")
        if entry == "metrics.jsonl.tmp" or (entry.startswith(".tmp-") and entry.endswith("summary.json")):
            os.unlink(os.path.join(directory, entry))
            done.append(f"removed {os.path.join(directory, entry)}")
    return done


def run_files(directory: str) -> list[str]:
    """The files and directories of a run in ``directory``: those of :data:`RUN_FILES` that exist (a directory
    only when something is in it: a run killed before its first checkpoint leaves ``checkpoints/`` empty)."""
    found = []
    for name in RUN_FILES:
        path = os.path.join(directory, name)
        if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
            found.append(name)
    return found


def claim(directory: str, *, resume: bool, overwrite: bool, log: Callable[[str], None]) -> RunLock:
    """Own ``directory`` for a run: create it, lock it (:class:`RunLock`), clean a killed run's leftovers and,
    for a fresh run, make sure no other run's files are there (``overwrite``: delete them). Returns the lock,
    which the caller releases when the run ends. A refusal (:class:`TrainingError`) comes before any run file
    is deleted."""
    if resume and overwrite:
        raise TrainingError("fastlora: --resume continues the run in --output-dir and --overwrite deletes it; "
                            "pass one of them")  # fmt: skip
    try:
        os.makedirs(directory, exist_ok=True)
        lock = RunLock(directory).acquire()
    except OSError as e:
        raise TrainingError(f"fastlora: cannot use --output-dir {directory}: {e.strerror or e}; choose a "
                            "writable directory") from e  # fmt: skip
    try:
        if lock.previous:
            log(f"fastlora: {directory}: taking over from a run that did not end normally ({_describe(lock.previous)})")
        for line in clean_leftovers(directory):
            log(f"fastlora: {line} (left by an interrupted write)")
        found = run_files(directory)
        if found and not resume:
            if not overwrite:
                raise TrainingError(
                    f"fastlora: {directory} already holds a run ({', '.join(found)}). Continue it with --resume, "
                    "delete it and start again with --overwrite, or choose another --output-dir"
                )
            for name in found:
                path = os.path.join(directory, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
            fsync_path(directory)
            log(f"fastlora: --overwrite: deleted {', '.join(found)} of the earlier run in {directory}")
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def hold(cfg: TrainConfig, dist: Dist, device: torch.device, *, check_resume: Callable[[], Any],
         log: Callable[[str], None]) -> Iterator[None]:  # fmt: skip
    """The run's hold on ``cfg.output_dir`` for the block: the main rank claims it (:func:`claim`: lock, leftovers, a
    fresh run refused where another run's files are) and under ``cfg.resume`` calls ``check_resume`` (which
    refuses a checkpoint of another run). Every rank raises when the main one refuses (a collective)."""
    lock, error = None, None
    if dist.main:
        try:
            lock = claim(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite, log=log)
            if cfg.resume:
                check_resume()
        except Exception as e:  # any failure: the other ranks must not wait in the collective below
            error = e
    refused = dist.sum([float(error is not None)], device)[0]
    try:
        if error is not None:
            raise error
        if refused:
            raise TrainingError(f"fastlora: rank 0 refused --output-dir {cfg.output_dir} (its message says why)")
        yield
    finally:
        if lock is not None:
            lock.release()


# -- what a run trained on ---------------------------------------------------------------------------

# the files of a model directory that decide what a run computes: its config, weights and tokenizer
_MODEL_FILES = re.compile(r"config\.json|.*\.(safetensors|bin|pt|index\.json)|tokenizer.*|vocab.*|merges\.txt"
                          r"|special_tokens_map\.json|spiece\.model")  # fmt: skip
_SPAN = 1 << 20  # bytes hashed at each end of a large file


def _sample_sha256(path: str) -> str:
    """SHA-256 of the file, or for a file over 2 MiB of its size, first MiB and last MiB: fast on a 10 GB shard,
    and a retrained model of the same shapes differs in the first tensors' bytes."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= 2 * _SPAN:
            h.update(f.read())
        else:
            h.update(str(size).encode() + f.read(_SPAN))
            f.seek(size - _SPAN)
            h.update(f.read(_SPAN))
    return h.hexdigest()


def model_fingerprint(path: str) -> dict[str, Any]:
    """What identifies the model directory ``path``: its resolved path (``DIR/``, ``DIR`` and a symlink to it are
    one model) and, per config/weight/tokenizer file, its size and :func:`_sample_sha256`."""
    real = os.path.realpath(path)
    files = {}
    for name in sorted(os.listdir(real)) if os.path.isdir(real) else []:
        full = os.path.join(real, name)
        if _MODEL_FILES.fullmatch(name) and os.path.isfile(full):
            files[name] = {"bytes": os.path.getsize(full), "sha256": _sample_sha256(full)}
    return {"path": real, "files": files}


def data_fingerprint(path: str | None) -> dict[str, Any] | None:
    """The resolved path, size and SHA-256 of data file ``path`` (None: the embedded data set)."""
    if path is None:
        return None
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        return {"path": real}
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"path": real, "bytes": os.path.getsize(real), "sha256": h.hexdigest()}


# the settings that change what a run computes, beside TrainConfig.RESUME_KEYS (model and data are compared by
# fingerprint, the rate as resolved); a resumed run must have the same
_RESULT_KEYS = ("method", "task", "batch_size", "grad_accum", "seed", "epochs", "max_steps", "schedule",
                "warmup_ratio", "weight_decay", "max_grad_norm", "layer_decay", "loraplus_ratio", "lora_r",
                "lora_alpha", "lora_dropout", "target_modules", "adapter_r", "adapter_placement",
                "num_virtual_tokens", "ptuning_encoder", "precision", "max_length", "val_split", "eval_every",
                "patience", "fsdp", "on_bad_line")  # fmt: skip
_IDENTIFIED = ("model", "data", "val_data")


def run_settings(cfg: TrainConfig, model_path: str) -> dict[str, Any]:
    """What decides the result of run ``cfg`` on the base model at ``model_path``, as ``state.json`` stores it:
    the settings, the resolved learning rate, and the fingerprints of the model and data files."""
    keys = [k for k in dict.fromkeys((*_RESULT_KEYS, *TrainConfig.RESUME_KEYS)) if k not in _IDENTIFIED]
    settings = {k: getattr(cfg, k) for k in keys}
    settings["lr"] = cfg.learning_rate
    settings["model"] = model_fingerprint(model_path)
    settings["data"] = data_fingerprint(cfg.data)
    settings["val_data"] = data_fingerprint(cfg.val_data)
    return json.loads(json.dumps(settings))  # tuples as lists: as it reads back


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Each way ``now`` differs from ``saved`` (two :func:`run_settings`), in words."""
    out = []
    for key in dict.fromkeys((*saved, *now)):
        was, has = saved.get(key), now.get(key)
        if was == has:
            continue
        if key in _IDENTIFIED and isinstance(was, dict) and isinstance(has, dict):
            out += _file_differences(key, was, has)
        else:
            out.append(f"it was run with {key}={was!r}, this run has {key}={has!r}")
    return out


def _file_differences(key: str, was: dict[str, Any], has: dict[str, Any]) -> list[str]:
    out = []
    if was.get("path") != has.get("path"):
        out.append(f"it was run with {key}={was.get('path')!r}, this run has {key}={has.get('path')!r}")
    if "files" not in was:  # a data file: one fingerprint
        if {k: v for k, v in was.items() if k != "path"} != {k: v for k, v in has.items() if k != "path"}:
            out.append(f"the {key} file's content differs ({_short(was)} then, {_short(has)} now)")
        return out
    files_was, files_has = was.get("files", {}), has.get("files", {})
    for name in sorted(set(files_was) | set(files_has)):
        a, b = files_was.get(name), files_has.get(name)
        if a != b:
            out.append(f"the {key}'s {name} differs ({_short(a)} then, {_short(b)} now)")
    return out


def _short(fingerprint: dict[str, Any] | None) -> str:
    if not fingerprint or "sha256" not in fingerprint:
        return "absent"
    return f"{fingerprint['bytes']} bytes, sha256 {fingerprint['sha256'][:12]}"
