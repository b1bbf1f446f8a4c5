"""Result records, the run's metadata, and the JSON / CSV writers.

A :class:`Record` is one implementation on one case and one pass: timed (``status="ok"``), refused by
the correctness guard or crashed (``"FAILED"``, never timed), or not runnable here (``"SKIPPED"``, e.g.
bitsandbytes missing). Every file written carries the device, the versions, the date and the commit.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from typing import Any

import torch

OK, FAILED, SKIPPED = "ok", "FAILED", "SKIPPED"


@dataclasses.dataclass
class Record:
    """One row of a result table.

    Attributes:
        suite: "layer", "decode", "model" or "adapter".
        case: the case id (shape, M, rank, dtype); ``shape``, ``m``, ``r``, ``dtype`` repeat its parts.
        impl: the implementation, e.g. "fastlora-nf4", "peft+bnb-nf4", "torch".
        pass_: "fwd", "bwd", "fwd+bwd", "step" (model: forward + backward + optimiser) or "dequant".
        status: "ok", "FAILED" or "SKIPPED"; ``note`` says why for the last two.
        ms, q20, q80: median, 20th and 80th percentile time per call (ms).
        flops, bytes: counted work of the pass (see each suite's docstring); tflops, gbs derived from ``ms``.
        peak_mib: peak memory above the pre-call allocation (CUDA), None where not measurable (CPU).
        tokens_per_s: model suite: tokens per second of a training step.
        max_rel_err: the largest relative error the guard measured against the reference.
        ratios: reference impl -> this time / the reference's time in the same case and pass.
    """

    suite: str
    case: str
    impl: str
    pass_: str
    shape: str = ""
    m: int | None = None
    r: int | None = None
    dtype: str = ""
    status: str = OK
    note: str = ""
    ms: float | None = None
    q20: float | None = None
    q80: float | None = None
    reps: int | None = None
    flops: int | None = None
    bytes: int | None = None
    tflops: float | None = None
    gbs: float | None = None
    peak_mib: float | None = None
    tokens_per_s: float | None = None
    max_rel_err: float | None = None
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)

    def finish(self) -> Record:
        """Fill TFLOP/s and GB/s from ms, flops and bytes."""
        if self.ms and self.flops:  # no FLOPs (a dequantisation, a copy): no rate
            self.tflops = self.flops / self.ms / 1e9
        if self.ms and self.bytes is not None:
            self.gbs = self.bytes / self.ms / 1e6
        return self


def add_ratios(records: Sequence[Record], references: Sequence[str]) -> None:
    """Set ``ratios[ref] = ms / ms(ref)`` for every timed record whose case and pass has a timed ``ref``."""
    timed: dict[tuple[str, str, str, str], float] = {}
    for r in records:
        if r.status == OK and r.ms:
            timed[(r.suite, r.case, r.pass_, r.impl)] = r.ms
    for r in records:
        r.ratios = {}
        if r.status != OK or not r.ms:
            continue
        for ref in references:
            other = timed.get((r.suite, r.case, r.pass_, ref))
            if other:
                r.ratios[ref] = r.ms / other


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception as e:  # not installed, or broken: say so rather than omit
        return f"unavailable ({type(e).__name__})"


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)  # fmt: skip
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(cuda: bool) -> str:
    """ "NVIDIA H100 80GB HBM3", or "cpu (<processor>, N threads)"."""
    if cuda:
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def metadata(
    *, cuda: bool, quick: bool, argv: Sequence[str] = (), extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Device, versions (torch, triton, fastlora, peft, bitsandbytes, transformers), date, commit, command."""
    meta: dict[str, Any] = {
        "device": device_name(cuda),
        "gpu": cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{m: _version(m) for m in ("torch", "triton", "fastlora", "peft", "bitsandbytes", "transformers")},
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "quick": quick,
        "command": " ".join(argv),
        "timer": ("triton.testing.do_bench" if cuda else "time.perf_counter") + ", quantiles 0.5/0.2/0.8",
        "peak_memory": "torch.cuda.max_memory_allocated above the pre-call allocation" if cuda else "n/a on CPU",
    }
    if extra:
        meta.update(extra)
    return meta


def to_dict(record: Record) -> dict[str, Any]:
    d = dataclasses.asdict(record)
    d["pass"] = d.pop("pass_")
    return d


def write_json(path: str, meta: dict[str, Any], records: Sequence[Record]) -> None:
    """``{"meta": {...}, "results": [record, ...]}``, written atomically (a partial run stays readable)."""
    _atomic_text(path, json.dumps({"meta": meta, "results": [to_dict(r) for r in records]}, indent=1) + "\n")


CSV_META = ("device", "date", "torch", "triton", "fastlora", "git_commit")


def write_csv(path: str, meta: dict[str, Any], records: Sequence[Record], references: Sequence[str]) -> None:
    """One row per record; every row repeats the device, date and versions so a row stands on its own."""
    fields = [f.name for f in dataclasses.fields(Record) if f.name != "ratios"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = [*CSV_META, *[("pass" if f == "pass_" else f) for f in fields], *[f"t/t({ref})" for ref in references]]
    writer.writerow(header)
    for r in records:
        row = [meta.get(k) for k in CSV_META] + [getattr(r, f) for f in fields]
        writer.writerow([("" if v is None else v) for v in row] + [r.ratios.get(ref, "") for ref in references])
    _atomic_text(path, buf.getvalue())


def _atomic_text(path: str, text: str) -> None:
    from fastlora.methods.files import atomic_write

    atomic_write(path, text.encode())
    os.chmod(path, 0o644)  # results are for reading: not the temporary file's private mode


def read_json(path: str) -> tuple[dict[str, Any], list[Record]]:
    """Read a file written by :func:`write_json` back into (meta, records)."""
    with open(path) as f:
        data = json.load(f)
    records = []
    for d in data["results"]:
        d = dict(d)
        d["pass_"] = d.pop("pass")
        records.append(Record(**d))
    return data["meta"], records
