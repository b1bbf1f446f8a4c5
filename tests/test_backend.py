"""Backend choice: by device, by argument, by FASTLORA_BACKEND; clear errors."""

import pytest
import torch

from fastlora import _alloc, _backend


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


def test_cuda_backend_falls_back_while_not_built():
    assert _backend.select(torch.zeros(1), "cuda") == "triton"


def test_poisoned_buffers():
    assert torch.isnan(_alloc.empty((3,), dtype=torch.bfloat16, device="cpu")).all()
    assert (_alloc.empty((2,), dtype=torch.int32, device="cpu") == -1).all()
    previous = _alloc.set_poison(False)
    try:
        assert _alloc.empty((2,), dtype=torch.float32, device="cpu").shape == (2,)
    finally:
        _alloc.set_poison(previous)
