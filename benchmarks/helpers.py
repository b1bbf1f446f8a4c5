"""What the benchmark suites share besides fixtures (those are in conftest.py, which nothing imports):
the device, the case lists' size, the rounds, and the guard that keeps a wrong implementation from being timed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from fastlora.bench.guard import WrongResult
from fastlora.bench.harness import Guarded, Skip

CUDA = torch.cuda.is_available()
QUICK = not CUDA or os.environ.get("FASTLORA_BENCH_QUICK") == "1"
ROUNDS = 50 if CUDA else 10


def guarded_or_skip(cache: dict, impl: str, make: Callable[[], Guarded]) -> Guarded:
    """The guarded build of ``impl`` (made once per case), never benchmarked unless it passed the guard.

    Cannot run here: skipped. Wrong output or gradient: a failure for fastlora's own implementations; an
    expected failure (xfail, with the reason) for a peer, whose bug is reported rather than fatal.
    """
    key = ("guarded", impl)
    if key not in cache:
        try:
            cache[key] = make()
        except Skip as e:
            cache[key] = e
        except WrongResult as e:
            cache[key] = e
    result = cache[key]
    if isinstance(result, Skip):
        pytest.skip(f"{impl}: {result}")
    if isinstance(result, WrongResult):
        if impl.startswith(("fastlora", "native")):
            pytest.fail(f"wrong result, not benchmarked: {result}", pytrace=False)
        pytest.xfail(f"the peer gives a wrong result, not benchmarked: {result}")
    return result
