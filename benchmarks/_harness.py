"""Shared by the benchmark scripts: one timer and one result writer, so every table is measured
and recorded the same way (median and 20/80 quantiles; markdown + JSON with metadata)."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def time_ms(fn: Callable[[], object], cuda: bool, reset: Sequence[torch.Tensor] = ()) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of ``fn`` in ms; ``reset`` grads are set to None before every rep, untimed.

    GPU: ``triton.testing.do_bench`` (warmup 25 ms, 250 ms of reps, L2 flushed). CPU: 10 reps, perf_counter.
    """
    if cuda:
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=250, grad_to_none=list(reset), quantiles=[0.5, 0.2, 0.8])
        return tuple(q)
    times = []
    for _ in range(10):
        for t in reset:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[2], times[7]


def write_results(out_dir: str, stem: str, text: str, meta: dict, results: object) -> None:
    """Write ``<out_dir>/<stem>.md`` (the printed table) and ``.json`` (metadata + raw rows)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem)
    with open(path + ".md", "w") as f:
        f.write(text)
    with open(path + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {path}.md/.json")
