"""LoRA / QLoRA linear layer, fwd / bwd / fwd+bwd, every implementation of ``fastlora.bench.layer``."""

import pytest

from benchmarks.helpers import CUDA, QUICK, guarded_or_skip
from fastlora.bench import cases, layer

CASES = cases.layer_cases(quick=QUICK)


@pytest.mark.parametrize("pass_", cases.PASSES)
@pytest.mark.parametrize("impl", layer.IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_layer(case, impl, pass_, bench, case_cache):
    cache = case_cache(("layer", case.id))
    ready = guarded_or_skip(cache, impl, lambda: layer.guarded(case, impl, cuda=CUDA, cache=cache))
    bench(ready, pass_, group=f"layer {case.id} {pass_}")
