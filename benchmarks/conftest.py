"""pytest-benchmark suites over the case lists of ``fastlora.bench``: ``pytest benchmarks/ --benchmark-only``.

The cases are ``fastlora bench``'s own (quick on a CPU, full on a CUDA device; FASTLORA_BENCH_QUICK=1 picks the
quick lists on a GPU too). Every benchmark first builds its implementation and runs the correctness guard
(``fastlora.bench.guard``): an implementation that cannot run here is skipped with the reason, and a wrong
one FAILS its test and is never timed. No Triton interpreter here: CPU runs take fastlora's torch path, as a
CPU user's would, and a GPU run the compiled kernels.

Fixtures and hooks only; what the suites import (``CUDA``, ``QUICK``, ``guarded_or_skip``) is in helpers.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from benchmarks.helpers import CUDA, QUICK, ROUNDS
from fastlora.bench.harness import Guarded


def pytest_report_header(config):
    if CUDA:
        return f"fastlora bench: {torch.cuda.get_device_name()}, {'quick' if QUICK else 'full'} case lists"
    return "fastlora bench: no CUDA device; CPU figures only, quick case lists (GPU figures need a GPU)"


@pytest.fixture(scope="session")
def case_cache() -> Callable[[object], dict]:
    """``case_cache(key)``: a dict shared by the tests of one case (weights, references, guarded builds).

    Only the latest case's dict is kept, so a full GPU run holds one case's tensors at a time.
    """
    held: dict[object, dict] = {}

    def get(key: object) -> dict:
        if key not in held:
            held.clear()
            if CUDA:
                torch.cuda.empty_cache()
            held[key] = {}
        return held[key]

    return get


@pytest.fixture
def bench(benchmark):
    """``bench(guarded, pass_, group, rounds=ROUNDS, tokens=None)``: time one pass with pytest-benchmark
    (CUDA-synchronised; gradients cleared before each round, untimed) and record FLOPs, bytes, TFLOP/s, GB/s
    (and tokens/s when ``tokens`` is given) in extra_info."""
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def run(ready: Guarded, pass_: str, group: str, rounds: int = ROUNDS, tokens: int | None = None) -> None:
        fn = ready.fns[pass_]

        def setup():
            for t in ready.reset:
                t.grad = None
            sync()

        def target():
            fn()
            sync()

        benchmark.group = group
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=2, iterations=1)
        flops, nbytes = ready.counts[pass_]
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(
            flops=flops,
            bytes=nbytes,
            tflops=flops / median / 1e12 if flops else None,
            gbs=nbytes / median / 1e9 if nbytes else None,
            max_rel_err=max((e[0] for e in ready.errors.values()), default=0.0),
            device=torch.cuda.get_device_name() if CUDA else "cpu",
        )
        if tokens:
            benchmark.extra_info["tokens_per_s"] = tokens / median

    return run
