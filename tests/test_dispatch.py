"""Dispatch: one table per op; the choice by device, size, argument and FASTLORA_BACKEND; clear errors."""

import logging

import pytest
import torch

import fastlora
from fastlora import _alloc, dispatch, native


def _backend(op, requested=None, device="cpu", **facts):
    return dispatch.choose(op, device, requested, **facts).backend


def test_every_op_has_its_reference_and_kernels_registered():
    tables = {op: list(dispatch.table(op)) for op in dispatch._TABLES}
    assert tables["quantize_4bit"] == ["torch", "native", "triton"]
    assert tables["dequantize_4bit"] == ["torch", "native", "triton"]
    assert tables["lora_linear"] == ["native", "triton", "torch"]
    assert tables["lora_linear_dx"] == ["triton", "torch"]
    assert tables["adapter"] == tables["adapter_backward"] == ["triton", "torch"]
    assert tables["merge_4bit"] == ["native", "torch"]
    with pytest.raises(KeyError, match="no implementation of 'nope' is registered"):
        dispatch.table("nope")


def test_default_backend_by_device(monkeypatch):
    monkeypatch.setattr(native.loader, "_module", None)  # as without the extension
    monkeypatch.setattr(native.loader, "_reason", "simulated: not built")
    monkeypatch.setattr(native.loader, "_jit_tried", True)
    assert _backend("dequantize_4bit") == "torch"
    assert _backend("adapter") == "torch"  # the interpreter is on, but Triton on a CPU only when asked
    assert _backend("adapter", device="cuda") == "triton"
    assert _backend("dequantize_4bit", device="cuda") == "triton"
    assert _backend("lora_linear", device="cuda", m=1, quantized=True) == "triton"  # native on CUDA: when asked


def test_request_and_environment(monkeypatch):
    assert _backend("adapter", "triton") == "triton"  # the interpreter is on in tests
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    assert _backend("adapter") == "triton"
    assert _backend("adapter", "torch") == "torch"  # an explicit request wins
    monkeypatch.setenv("FASTLORA_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'triton', 'native'\), got 'tpu'"):
        _backend("quantize_4bit")
    with pytest.raises(ValueError, match=r"fastlora lora_linear: backend must be one of .* got 'tpu'"):
        fastlora.lora_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(1, 8), torch.randn(4, 1), 1.0)


def test_cuda_is_the_old_name_of_native():
    if not native.is_built():
        pytest.skip(f"native extension not loaded: {native.unavailable_reason()}")
    assert _backend("dequantize_4bit", "cuda") == _backend("dequantize_4bit", "native") == "native"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs a CUDA tensor .* TRITON_INTERPRET=1"):
        _backend("dequantize_4bit", "triton")


def test_native_falls_back_without_a_native_kernel(caplog):
    """An op with no native kernel for the call: Triton (the interpreter is on), one warning."""
    dispatch._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        assert _backend("adapter", "native") == "triton"
        assert _backend("adapter", "native", m=3) == "triton"
    assert len(caplog.records) == 1 and "using the triton path" in caplog.records[0].getMessage()
    dispatch._warn_once.cache_clear()


def test_size_conditions_and_reasons():
    """The native decode GEMV runs a 4-bit weight at M <= 16; elsewhere the choice says why not."""
    if not native.is_built():
        pytest.skip(f"native extension not loaded: {native.unavailable_reason()}")
    m = native.MAX_DECODE_M
    assert _backend("lora_linear", m=m, quantized=True) == "native"
    big = dispatch.choose("lora_linear", "cpu", m=m + 1, quantized=True)
    assert big.backend == "torch" and "reference" in big.reason
    assert _backend("lora_linear", m=1, quantized=False) == "torch"
    dispatch._warn_once.cache_clear()
    forced = dispatch.choose("lora_linear", "cpu", "native", m=m + 1, quantized=True)
    assert forced.backend == "triton" and f"at most {m} rows, got {m + 1}" in forced.reason
    dispatch._warn_once.cache_clear()


def test_native_kernels_picked_when_built():
    """ "native" names the csrc/ kernels: the default for a CPU tensor when the op has a CPU kernel and
    the extension is loaded (tests/test_native_build.py covers the fallback when it is not)."""
    if not native.is_built():
        pytest.skip(f"native extension not loaded: {native.unavailable_reason()}")
    assert _backend("dequantize_4bit", "native") == "native"
    assert _backend("quantize_4bit") == _backend("dequantize_4bit") == _backend("merge_4bit") == "native"


def test_register_rejects_unknown_backends():
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.register("x", "cuda")


def test_poisoned_buffers():
    assert torch.isnan(_alloc.empty((3,), dtype=torch.bfloat16, device="cpu")).all()
    assert (_alloc.empty((2,), dtype=torch.int32, device="cpu") == -1).all()
    previous = _alloc.set_poison(False)
    try:
        assert _alloc.empty((2,), dtype=torch.float32, device="cpu").shape == (2,)
    finally:
        _alloc.set_poison(previous)
