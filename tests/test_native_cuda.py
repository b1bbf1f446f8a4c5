"""The native CUDA kernels on a GPU (`make test-gpu`): dequantise bit for bit (fp16/bf16 rounding included),
GEMV and merge against float64 references, lora_linear at decode sizes through the native backend.
test_cuda_emulated.py runs the same kernels on the CPU, through an emulator.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES, FLOOR, id_formatter, rel_error, rounding_cases

from fastlora import native
from fastlora.kernels.lora_ref import lora_linear_ref
from fastlora.ops import lora_linear
from fastlora.quant import QuantState, dequantize_4bit, get_code, quantize_4bit

# every test here needs a GPU and the extension built (conftest.py)
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("native_ext")]


# -- the CUDA kernels on a GPU (make test-gpu) -----------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_native(native_ext):
    if not native.has_cuda():
        pytest.skip(f"fastlora._C has no CUDA kernels here: {native.unavailable_reason('cuda')}")


@pytest.mark.parametrize("double_quant", [False, True], ids=id_formatter("dq"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_dequantize_bit_identical(cuda_native, quant_type, double_quant):
    for shape, bs in (((333, 4097), 64), ((4096, 4096), 128), ((7,), 32)):
        w = torch.randn(shape)
        packed, state = quantize_4bit(w, quant_type, bs, double_quant, backend="torch")
        for out_dtype in DTYPES:
            want = dequantize_4bit(packed, state, out_dtype, backend="torch")
            got = dequantize_4bit(packed.cuda(), state.to("cuda"), out_dtype, backend="native")
            assert torch.equal(got.cpu(), want), (shape, out_dtype)
            # an unaligned view of the packed bytes takes the byte-wise path
            shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), packed.view(-1)]).cuda()[1:]
            assert torch.equal(dequantize_4bit(shifted, state.to("cuda"), out_dtype, backend="native").cpu(), want)


def test_cuda_fp16_bf16_rounding_bit_identical(cuda_native):
    values = rounding_cases()
    bs = 32
    state = QuantState(values, torch.Size((values.numel() * bs,)), torch.float32, bs, "nf4", get_code("nf4"))
    packed = torch.full((values.numel() * bs // 2,), 0xFF, dtype=torch.uint8)
    for out_dtype in (torch.float16, torch.bfloat16):
        got = dequantize_4bit(packed.cuda(), state.to("cuda"), out_dtype, backend="native").view(-1, bs).cpu()
        assert torch.equal(got, values.to(out_dtype)[:, None].expand(-1, bs)), out_dtype


@pytest.mark.parametrize("lora", [None, "a", "u"], ids=id_formatter("lora"))
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16], ids=id_formatter("M"))
@pytest.mark.parametrize("shape", [(200, 77), (129, 33), (4096, 4096), (14336, 1024)], ids=str)
def test_cuda_gemv_matches_float64_reference(cuda_native, shape, m, dtype, lora):
    k, n = shape
    qt, bs, dq = ("nf4", 64, True) if k % 2 == 0 else ("fp4", 32, False)
    packed, state = quantize_4bit(torch.randn(n, k) / math.sqrt(k), qt, bs, dq)
    x = torch.randn(m, k).to(dtype)
    bias = (torch.randn(n) * 0.1).to(dtype)
    r = 16
    a, b = (torch.randn(r, k) / math.sqrt(k)).to(dtype), (torch.randn(n, r) / math.sqrt(r)).to(dtype)
    kwargs = {}
    if lora == "a":
        kwargs = {"lora_a": a, "lora_b": b, "scale": 2.0}
    elif lora == "u":
        kwargs = {"lora_u": (x.float() @ a.float().T).to(dtype), "lora_b": b, "scale": 2.0}
    ref = native.gemv_4bit_ref(x, packed, state, bias, compute_dtype=torch.float64, **kwargs).double()
    own = native.gemv_4bit_ref(x, packed, state, bias, compute_dtype=dtype, **kwargs)
    cuda_kwargs = {key: (v.cuda() if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()}
    y = native.gemv_4bit(x.cuda(), packed.cuda(), state.to("cuda"), bias.cuda(), **cuda_kwargs).cpu()
    assert not torch.isnan(y).any()
    assert rel_error(y, ref) <= 2 * rel_error(own, ref) + FLOOR[dtype]


def test_cuda_gemv_rejects_more_than_16_rows(cuda_native):
    packed, state = quantize_4bit(torch.randn(32, 64, device="cuda"), "nf4", 64)
    with pytest.raises(ValueError, match=r"at most 16 rows of x, got 17"):
        native.gemv_4bit(torch.randn(17, 64, device="cuda"), packed, state)


@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
def test_cuda_merge_and_lora_linear_decode(cuda_native, dtype, monkeypatch):
    n, k, r = 333, 4096, 16
    packed, state = quantize_4bit(torch.randn(n, k, device="cuda") / k**0.5, "nf4", 64, True)
    a, b = torch.randn(r, k, device="cuda").to(dtype), torch.randn(n, r, device="cuda").to(dtype)
    got = native.merge_4bit(packed, state, a, b, 0.5, dtype)
    ref = native.merge_4bit_ref(packed, state, a, b, 0.5, torch.float64, compute_dtype=torch.float64)
    own = native.merge_4bit_ref(packed, state, a, b, 0.5, dtype, compute_dtype=dtype)
    assert rel_error(got, ref) <= 2 * rel_error(own, ref) + FLOOR[dtype]
    # lora_linear at M = 4 with FASTLORA_BACKEND=native: the native GEMV, checked against float64
    monkeypatch.setenv("FASTLORA_BACKEND", "native")
    x, a = torch.randn(4, k, device="cuda").to(dtype), a / k**0.5
    y = lora_linear(x, packed, None, a, b, 2.0, quant_state=state)
    w_ref = dequantize_4bit(packed, state, torch.float32).double()
    y_ref = lora_linear_ref(x.double(), w_ref, None, a.double(), b.double(), 2.0)
    y_own = lora_linear_ref(x, w_ref.to(dtype), None, a, b, 2.0)
    assert rel_error(y, y_ref) <= 2 * rel_error(y_own, y_ref) + FLOOR[dtype]
