"""Decode (M <= 16, inference, 4-bit base) and NF4 dequantisation: ``fastlora.bench.decode``."""

import pytest

from benchmarks.helpers import CUDA, QUICK, guarded_or_skip
from fastlora.bench import cases, decode

CASES = cases.decode_cases(quick=QUICK)
DEQUANT = list(dict.fromkeys((c.k, c.n, c.dtype) for c in CASES))


@pytest.mark.parametrize("impl", decode.IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decode(case, impl, bench, case_cache):
    cache = case_cache(("decode", case.id))
    ready = guarded_or_skip(cache, impl, lambda: decode.guarded(case, impl, cuda=CUDA, cache=cache))
    bench(ready, "fwd", group=f"decode {case.id}")


@pytest.mark.parametrize("impl", decode.DEQUANT_IMPLS)
@pytest.mark.parametrize("shape", DEQUANT, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}")
def test_dequant(shape, impl, bench, case_cache):
    k, n, dtype = shape
    cache = case_cache(("dequant", shape))
    ready = guarded_or_skip(cache, impl, lambda: decode.guarded_dequant(k, n, dtype, impl, cuda=CUDA, cache=cache))
    bench(ready, "dequant", group=f"dequant {k}x{n} {dtype}")
