"""Backend choice: by device, by argument, by FASTLORA_BACKEND; clear errors."""

import logging

import pytest
import torch

from fastlora import _alloc, _backend, native


def test_default_backend_by_device():
    assert _backend.select(torch.zeros(1)) == "torch"


def test_request_and_environment(monkeypatch):
    t = torch.zeros(1)
    assert _backend.select(t, "triton") == "triton"  # the interpreter is on in tests
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    assert _backend.select(t) == "triton"
    assert _backend.select(t, "torch") == "torch"  # an explicit request wins
    monkeypatch.setenv("FASTLORA_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'triton', 'cuda'\), got 'tpu'"):
        _backend.select(t, op="quantize_4bit")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs a CUDA tensor .* TRITON_INTERPRET=1"):
        _backend.select(torch.zeros(1), "triton", op="dequantize_4bit")


def test_cuda_backend_falls_back_without_a_native_kernel(caplog):
    """An op with no native kernel for the tensor's device: Triton (the interpreter is on), one warning."""
    _backend._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        assert _backend.select(torch.zeros(1), "cuda", op="adapter") == "triton"
        assert _backend.select(torch.zeros(1), "cuda", op="adapter", native=("cuda",)) == "triton"
    assert len(caplog.records) == 1 and "using the triton path" in caplog.records[0].getMessage()
    _backend._warn_once.cache_clear()


def test_cuda_backend_picks_native_kernels_when_built():
    """ "cuda" names the native kernels (csrc/): chosen for a CPU tensor when the op has a CPU kernel
    and the extension is loaded (tests/test_native.py covers the fallback when it is not)."""
    if not native.is_built():
        pytest.skip(f"native extension not loaded: {native.unavailable_reason()}")
    assert _backend.select(torch.zeros(1), "cuda", op="dequantize_4bit", native=("cpu", "cuda")) == "cuda"


def test_poisoned_buffers():
    assert torch.isnan(_alloc.empty((3,), dtype=torch.bfloat16, device="cpu")).all()
    assert (_alloc.empty((2,), dtype=torch.int32, device="cpu") == -1).all()
    previous = _alloc.set_poison(False)
    try:
        assert _alloc.empty((2,), dtype=torch.float32, device="cpu").shape == (2,)
    finally:
        _alloc.set_poison(previous)
