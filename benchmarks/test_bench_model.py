"""One training step (forward + backward + AdamW) of a Llama-style model: ``fastlora.bench.model``."""

import pytest

from benchmarks.helpers import CUDA, QUICK, guarded_or_skip
from fastlora.bench import cases, model

CASES = cases.model_cases(quick=QUICK)


@pytest.mark.parametrize("impl", model.IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_model_step(case, impl, bench, case_cache):
    cache = case_cache(("model", case.id))
    ready = guarded_or_skip(cache, impl, lambda: model.guarded(case, impl, cuda=CUDA, cache=cache))
    bench(ready, "step", group=f"model {case.id}", rounds=10 if CUDA else 5, tokens=case.tokens)
