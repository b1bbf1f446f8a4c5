"""Test set-up: Triton's CPU interpreter without a GPU, fixed seeds, poisoned outputs, a `gpu` marker."""

import os
import random

import torch

# Must happen before any fastlora.kernels module (and so triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("FASTLORA_BACKEND", None)

import pytest

from fastlora import _alloc

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
