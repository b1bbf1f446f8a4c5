"""The jobs of a multi-job run (``fastlora finetune --job ... --job ...`` or ``--jobs FILE``): several LoRA adapters
trained at once on one frozen base, one per data file (:mod:`fastlora.train.multijob` trains them).

A job is a mapping with a ``name`` (its adapter's name), its ``data`` file and optional settings that replace the
run's own for that job alone (:data:`JOB_KEYS`; short names or the TrainConfig field names). On the command line::

    --job NAME=DATA[,key=value...]        e.g.  --job sql=sql.jsonl,lr=1e-4,r=16,epochs=2
    --jobs FILE                           JSON or YAML: a list of mappings, or a mapping NAME -> settings

A list value (``targets``) is written ``a|b|c`` on the command line. This module checks the form (names, keys, the
values' types); :func:`fastlora.train.multijob.job_configs` checks the values against their ranges and the files.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

# the settings a job may set (its own value replaces the run's): key -> TrainConfig field
JOB_KEYS = {
    "data": "data",
    "val": "val_data",
    "val_split": "val_split",
    "lr": "lr",
    "r": "lora_r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "target_modules",
    "epochs": "epochs",
    "steps": "max_steps",
    "batch": "batch_size",
    "weight_decay": "weight_decay",
    "warmup": "warmup_ratio",
    "schedule": "schedule",
    "max_grad_norm": "max_grad_norm",
    "patience": "patience",
    "eval_every": "eval_every",
}
_ALIASES = {field: key for key, field in JOB_KEYS.items()}  # the TrainConfig names are accepted too
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")  # an adapter name (no '.', which module paths use) and a dir name
RESERVED = ("__base__", "default")  # peft's "the bare base" row name; the single-job run's adapter name


def parse_job(text: str) -> dict[str, Any]:
    """``NAME=DATA[,key=value...]`` (one ``--job``) as a job mapping {"name", "data", key: value...}; the values stay
    strings (TrainConfig converts and checks them). ValueError naming the flag's text when malformed."""
    head, _, rest = text.partition(",")
    name, eq, data = head.partition("=")
    if not eq or not name.strip() or not data.strip():
        raise ValueError(f"fastlora: --job {text!r}: expected NAME=DATA_FILE[,key=value...]")
    job: dict[str, Any] = {"name": name.strip(), "data": data.strip()}
    for item in filter(None, (p.strip() for p in rest.split(","))) if rest else ():
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"fastlora: --job {text!r}: {item!r} is not key=value (keys: {', '.join(JOB_KEYS)})")
        if key in job or _ALIASES.get(key) in job:
            raise ValueError(f"fastlora: --job {text!r}: {key} given twice")
        job[key] = value.strip().split("|") if key in ("targets", "target_modules") and "|" in value else value.strip()
    return job


def read_jobs_file(path: str) -> list[dict[str, Any]]:
    """The jobs of a ``--jobs`` file: JSON or YAML holding a list of mappings (each with ``name``) or a mapping
    NAME -> settings."""
    if not os.path.isfile(path):
        raise ValueError(f"fastlora: --jobs {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        raw = json.loads(text)
    except ValueError:
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"fastlora: --jobs {path} is neither JSON nor YAML: {e}") from e
    if isinstance(raw, dict):
        raw = [{"name": name, **(v if isinstance(v, dict) else {"data": v})} for name, v in raw.items()]
    if not isinstance(raw, list) or not all(isinstance(j, dict) for j in raw):
        raise ValueError(f"fastlora: --jobs {path} must hold a list of job mappings or a mapping NAME -> settings")
    return [dict(j) for j in raw]


def normalize_jobs(jobs: Any) -> list[dict[str, Any]] | None:
    """``jobs`` (None, or a list of job mappings) with every key in its short form (:data:`JOB_KEYS`); ValueError
    for a missing or bad name, a duplicate name, a job without data, an unknown key, or fewer than two jobs."""
    if jobs is None:
        return None
    if not isinstance(jobs, (list, tuple)) or not all(isinstance(j, dict) for j in jobs):
        raise ValueError(f"fastlora: jobs must be a list of job mappings, got {jobs!r}")
    out, seen = [], set()
    for job in jobs:
        name = job.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED:
            raise ValueError(f"fastlora: job name {name!r} must be letters, digits, '_' or '-' (not "
                             f"{' or '.join(RESERVED)})")  # fmt: skip
        if name in seen:
            raise ValueError(f"fastlora: job name {name!r} given twice; each job needs its own name")
        seen.add(name)
        settings = {}
        for key, value in job.items():
            if key == "name":
                continue
            short = key if key in JOB_KEYS else _ALIASES.get(key)
            if short is None:
                raise ValueError(f"fastlora: job {name!r}: unknown key {key!r} (known: {', '.join(JOB_KEYS)})")
            if short in settings:
                raise ValueError(f"fastlora: job {name!r}: {short} given twice")
            settings[short] = value
        if not isinstance(settings.get("data"), str) or not settings["data"].strip():
            raise ValueError(f"fastlora: job {name!r} has no data file (NAME=DATA_FILE, or data: in --jobs)")
        out.append({"name": name, **settings})
    if len(out) < 2:
        raise ValueError(f"fastlora: a multi-job run needs two jobs or more, got {len(out)} (one job: use --data)")
    return out
