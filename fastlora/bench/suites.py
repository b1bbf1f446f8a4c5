"""Run suites and write everything a run produces: the one entry point the CLI and scripts share.

meta, records = run_benchmarks(["layer", "decode"], quick=True)
paths = write_outputs("out/", meta, records)   # results.json, results.csv, results.md, *.png
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastlora.bench import adapter, cases, decode, layer, model, multi, records, report
from fastlora.bench.records import FAILED, Record
from fastlora.bench.timing import DEFAULT_TIMER, DTYPES, QUICK_TIMER, device_peaks

SUITES = ("layer", "decode", "model", "adapter", "multi")
ALL_IMPLS = {
    "layer": layer.IMPLS,
    "decode": decode.IMPLS + decode.DEQUANT_IMPLS,
    "model": model.IMPLS,
    "adapter": adapter.IMPLS,
    "multi": multi.IMPLS,
}


@dataclasses.dataclass
class Overrides:
    """Replace an axis of the default cases (None keeps the default): shapes "KxN", M values, ranks, dtypes,
    model names; ``impls`` keeps only the named implementations; ``passes`` a subset of fwd/bwd/fwd+bwd."""

    shapes: list[tuple[int, int, str]] | None = None
    tokens: list[int] | None = None
    ranks: list[int] | None = None
    dtypes: list[str] | None = None
    models: list[str] | None = None
    impls: list[str] | None = None
    passes: list[str] | None = None

    def validate(self) -> None:
        known = {i for v in ALL_IMPLS.values() for i in v}
        unknown = [i for i in self.impls or () if i not in known]
        if unknown:
            raise ValueError(f"fastlora bench: unknown implementation {unknown}; expected some of {sorted(known)}")
        bad = [p for p in self.passes or () if p not in cases.PASSES]
        if bad:
            raise ValueError(f"fastlora bench: unknown pass {bad}; expected some of {list(cases.PASSES)}")
        bad_dt = [d for d in self.dtypes or () if d not in ("bf16", "fp16", "fp32")]
        if bad_dt:
            raise ValueError(f"fastlora bench: unknown dtype {bad_dt}; expected some of ['bf16', 'fp16', 'fp32']")
        for name, values in (("tokens", self.tokens), ("ranks", self.ranks)):
            if values is not None and (not values or any(v <= 0 for v in values)):
                raise ValueError(f"fastlora bench: {name} must be positive integers, got {values}")

    def impls_for(self, suite: str) -> tuple[str, ...]:
        names = ALL_IMPLS[suite]
        return tuple(i for i in names if self.impls is None or i in self.impls)


def run_benchmarks(
    suites: Sequence[str],
    *,
    quick: bool,
    cuda: bool | None = None,
    overrides: Overrides | None = None,
    argv: Sequence[str] = (),
    on_record: Callable[[Record], None] = lambda r: None,
    partial_json: str | None = None,
) -> tuple[dict[str, Any], list[Record]]:
    """Measure the device's peaks, then run each suite; returns (metadata, records with ratios filled).

    Args:
        suites: some of "layer", "decode" (with its "dequant" cases), "model", "adapter".
        quick: the reduced case lists and a shorter timer (the CPU smoke run, or a fast GPU check).
        cuda: run on the GPU; default: when one is available.
        overrides: replace case axes or filter implementations (see :class:`Overrides`).
        argv: the command line, recorded in the metadata.
        on_record: called with each record as soon as it is measured.
        partial_json: rewritten with every record so far whenever a new case starts, so a run that is
            killed (a time limit) keeps what it measured.
    """
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"fastlora bench: unknown suite {unknown}; expected some of {list(SUITES)}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    ov = overrides or Overrides()
    ov.validate()
    timer = QUICK_TIMER if quick else DEFAULT_TIMER
    passes = tuple(ov.passes or cases.PASSES)
    dtypes = ov.dtypes or (["bf16"] if quick else ["bf16", "fp16"])
    peaks = device_peaks([DTYPES[d] for d in dtypes], cuda=cuda, quick=quick)
    meta = records.metadata(cuda=cuda, quick=quick, argv=argv, extra={"device_peaks": dataclasses.asdict(peaks)})
    meta["suites"] = list(suites)
    axes = dict(shapes=ov.shapes, tokens=ov.tokens, ranks=ov.ranks, dtypes=ov.dtypes)
    out: list[Record] = []

    def emit(rec: Record) -> None:
        if partial_json and out and (out[-1].suite, out[-1].case) != (rec.suite, rec.case):
            records.write_json(partial_json, meta, out)
        out.append(rec)
        on_record(rec)

    for suite in suites:
        impls = ov.impls_for(suite)
        if suite == "layer":
            layer.run(cases.layer_cases(quick=quick, **axes), cuda=cuda, timer=timer, passes=passes,
                      impls=impls, on_record=emit)  # fmt: skip
        elif suite == "decode":
            fwd = tuple(i for i in impls if i in decode.IMPLS)
            decode.run(cases.decode_cases(quick=quick, **axes), cuda=cuda, timer=timer, impls=fwd,
                       dequant_impls=tuple(i for i in impls if i in decode.DEQUANT_IMPLS), on_record=emit)  # fmt: skip
        elif suite == "model":
            step_timer = model.QUICK_STEP_TIMER if quick else model.STEP_TIMER
            model.run(cases.model_cases(quick=quick, names=ov.models, dtypes=ov.dtypes), cuda=cuda, timer=step_timer,
                      impls=impls, on_record=emit)  # fmt: skip
        elif suite == "adapter":
            adapter.run(cases.adapter_cases(quick=quick, tokens=ov.tokens, dtypes=ov.dtypes), cuda=cuda, timer=timer,
                        passes=passes, impls=impls, on_record=emit)  # fmt: skip
        elif suite == "multi":
            multi.run(multi.multi_cases(quick=quick, cuda=cuda, dtypes=ov.dtypes), cuda=cuda, timer=timer, impls=impls,
                      on_record=emit)  # fmt: skip
    for suite, refs in report.REFERENCES.items():
        records.add_ratios([r for r in out if r.suite == suite], refs)
    return meta, out


def write_outputs(out_dir: str, meta: dict[str, Any], recs: Sequence[Record], *, plots: bool = True) -> list[str]:
    """Write results.json (metadata + rows), results.csv, results.md and the PNG plots; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    suites = [s for s in report.SUITE_ORDER if any(r.suite == s for r in recs)]
    refs = sorted({ref for s in suites for ref in report.REFERENCES[s]})
    paths = [os.path.join(out_dir, name) for name in ("results.json", "results.csv", "results.md")]
    records.write_json(paths[0], meta, recs)
    records.write_csv(paths[1], meta, recs, refs)
    records._atomic_text(paths[2], report.markdown(recs, meta, suites))
    if plots:
        paths += report.plots(recs, meta, out_dir)
    return paths


def fastlora_failures(recs: Sequence[Record]) -> list[Record]:
    """FAILED records of fastlora's own implementations (a peer's failure is reported, not fatal)."""
    return [r for r in recs if r.status == FAILED and (r.impl.startswith("fastlora") or r.impl.startswith("native"))]
