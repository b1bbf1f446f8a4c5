"""Bottleneck adapter, fwd / bwd / fwd+bwd: FastAdapter's op vs the plain-PyTorch adapter (fastlora.bench.adapter)."""

import pytest

from benchmarks.helpers import CUDA, QUICK, guarded_or_skip
from fastlora.bench import adapter, cases

CASES = cases.adapter_cases(quick=QUICK)


@pytest.mark.parametrize("pass_", cases.PASSES)
@pytest.mark.parametrize("impl", adapter.IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_adapter(case, impl, pass_, bench, case_cache):
    cache = case_cache(("adapter", case.id))
    ready = guarded_or_skip(cache, impl, lambda: adapter.guarded(case, impl, cuda=CUDA, cache=cache))
    bench(ready, pass_, group=f"adapter {case.id} {pass_}")
