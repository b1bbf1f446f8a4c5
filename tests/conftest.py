"""Test set-up: Triton's CPU interpreter, fixed seeds, poisoned outputs, a `gpu` marker, the native extension.

Two runs, because ``TRITON_INTERPRET`` is read when kernels are defined:
- ``make test`` (any machine): every kernel runs on CPU tensors under the interpreter; `gpu` tests skip.
- ``make test-gpu`` (``FASTLORA_GPU=1`` on a CUDA machine): only the `gpu` tests, on compiled kernels.
``make test-fast`` is the first without the `slow`, `install` and `aot` tests (marked here or in pyproject.toml).

Fixtures and hooks only: the names tests share (``DTYPES``, ``rel_error``, ...) live in helpers.py and the
models in models.py, both imported by name (``from helpers import ...``); nothing imports this file.
"""

import os
import random

import torch

GPU_RUN = os.environ.get("FASTLORA_GPU") == "1" and torch.cuda.is_available()
# Must happen before any fastlora.kernels module (and so triton.jit) is imported.
if not GPU_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("FASTLORA_BACKEND", None)

import pytest  # noqa: E402
from helpers import compiler_available  # noqa: E402

from fastlora import _alloc  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device and FASTLORA_GPU=1 (make test-gpu)")
    skip_cpu = pytest.mark.skip(reason="interpreter test: run by `make test`, without FASTLORA_GPU")
    for item in items:
        if ("gpu" in item.keywords) != GPU_RUN:
            item.add_marker(skip_cpu if GPU_RUN else skip_gpu)
        # tests/test_aot.py's compile of every kernel for sm_80/sm_90 (minutes): `make test` runs it,
        # `make test-fast` (-m "not aot ...") does not
        if item.path.name == "test_aot.py" and "compiled" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.aot)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Every test starts from seed 0, and every buffer fastlora allocates starts as NaN."""
    torch.manual_seed(0)
    random.seed(0)
    previous = _alloc.set_poison(True)
    yield
    _alloc.set_poison(previous)


@pytest.fixture(scope="module")
def native_ext():
    """The native extension (fastlora._C): the installed build, else the cached or a fresh first-use build,
    once per test module.

    A failure with a compiler present fails the tests (every supported install compiles them); only a
    missing toolchain or ``FASTLORA_NO_EXT=1`` (an install that opted out) skips them. The native test
    modules use it for every test (``pytestmark``).
    """
    from fastlora import native

    if os.environ.get("FASTLORA_NO_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
        pytest.skip("FASTLORA_NO_EXT is set: this install runs without the native kernels")
    module = native.load(jit=True)
    if module is None:
        if not compiler_available():
            pytest.skip(f"no C++ compiler to build the native extension: {native.unavailable_reason()}")
        pytest.fail(f"the native extension did not build or load: {native.unavailable_reason()}")
    return module
