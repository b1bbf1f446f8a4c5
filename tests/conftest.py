"""Test set-up: Triton's CPU interpreter, fixed seeds, poisoned outputs, a `gpu` marker.

Two runs, because ``TRITON_INTERPRET`` is read when kernels are defined:
- ``make test`` (any machine): every kernel runs on CPU tensors under the interpreter; `gpu` tests skip.
- ``make test-gpu`` (``FASTLORA_GPU=1`` on a CUDA machine): only the `gpu` tests, on compiled kernels.
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

from fastlora import _alloc  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device and FASTLORA_GPU=1 (make test-gpu)")
    skip_cpu = pytest.mark.skip(reason="interpreter test: run by `make test`, without FASTLORA_GPU")
    for item in items:
        if ("gpu" in item.keywords) != GPU_RUN:
            item.add_marker(skip_cpu if GPU_RUN else skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Every test starts from seed 0, and every buffer fastlora allocates starts as NaN."""
    torch.manual_seed(0)
    random.seed(0)
    previous = _alloc.set_poison(True)
    yield
    _alloc.set_poison(previous)


def id_formatter(name):
    """Readable parametrize ids: ``id_formatter("bs")`` -> ``bs=64``."""

    def fmt(value):
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        return f"{name}={value}"

    return fmt


# The numeric bound of the kernel tests: error ≤ 2x PyTorch's own error in that dtype plus this floor
# (flash-attention's rule), errors relative to a float64 reference.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref||, in float64 (a zero reference counts as norm 1e-30)."""
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
