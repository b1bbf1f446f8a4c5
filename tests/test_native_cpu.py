"""The native CPU kernels of csrc/ (fastlora._C) against the PyTorch path: bit for bit where the format is
defined (quantise / dequantise, fp16/bf16 rounding, AVX2 against the portable loops) and against float64
references where arithmetic is (GEMV, merge, lora_linear at decode sizes).

The other native tests: test_native_ops.py (input checks, torch.library), test_native_build.py (loading,
fallbacks, the build, the CUDA sources compiled with nvcc and their SASS), test_native_cuda.py (`gpu`), and
test_cuda_emulated.py (the CUDA kernels on the CPU, through an emulator).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from helpers import DTYPES, FLOOR, id_formatter, rel_error, rounding_cases

from fastlora import dispatch, native
from fastlora.kernels.lora_ref import lora_linear_ref
from fastlora.ops import lora_linear
from fastlora.quant import QuantState, dequantize_4bit, get_code, quantize_4bit
from fastlora.quant.codes import get_bounds
from fastlora.quant.state import NestedState

pytestmark = pytest.mark.usefixtures("native_ext")  # every test here needs the extension built (conftest.py)


def _hard_weight(rows: int, cols: int, dtype: torch.dtype, quant_type: str, blocksize: int) -> torch.Tensor:
    """Random values plus the cases that break quantisers: an all-zero block, a constant block,
    values exactly on the decision boundaries (ties go to the lower code), subnormal and huge values."""
    w = torch.randn(rows, cols)
    flat = w.view(-1)
    flat[:blocksize] = 0.0
    flat[blocksize : 2 * blocksize] = -0.75
    midpoints, _ = get_bounds(quant_type)
    start = 2 * blocksize  # a block with absmax exactly 1: x * (1 / 1) lands on every midpoint
    flat[start : start + blocksize] = midpoints.repeat(blocksize // 15 + 1)[:blocksize]
    flat[start] = 1.0
    flat[3 * blocksize : 3 * blocksize + 7] = torch.tensor([1e-38, -3e-39, 1e-30, 5e4, -6e4, 7e-5, 1e-7])
    return w.to(dtype)


# -- bit-identity with the PyTorch path --------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True], ids=id_formatter("dq"))
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096], ids=id_formatter("bs"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_dequantize_bit_identical(quant_type, blocksize, dtype, double_quant):
    w = _hard_weight(333, 257, dtype, quant_type, blocksize)  # 85,581 values: odd, partial last block
    packed, state = native.quantize_4bit_cpu(w, quant_type, blocksize, double_quant)
    packed_ref, state_ref = quantize_4bit(w, quant_type, blocksize, double_quant, backend="torch")
    assert torch.equal(packed, packed_ref)
    assert torch.equal(state.absmax, state_ref.absmax)
    if double_quant:
        assert torch.equal(state.nested.absmax, state_ref.nested.absmax)
        assert state.nested.offset == state_ref.nested.offset
    for out_dtype in DTYPES:
        got = native.dequantize_4bit_cpu(packed, state, out_dtype)
        assert torch.equal(got, dequantize_4bit(packed_ref, state_ref, out_dtype, backend="torch"))


def test_dequantize_any_statistics_bit_identical():
    """Random bytes and absmax over 60 decades (fp16 overflow to inf, subnormals, zero), plain and
    double-quantised: every rounding of the fp32 -> fp16/bf16 conversion is exercised."""
    n, bs = 100_001, 64
    nblocks = -(-n // bs)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8)
    absmax = torch.exp(torch.empty(nblocks).uniform_(-90, 88)).float()  # fp32 subnormal to 1.6e38
    absmax[::97] = 0.0
    for qt in ("nf4", "fp4"):
        plain = QuantState(absmax, torch.Size((n,)), torch.float32, bs, qt, get_code(qt))
        nested = QuantState(
            torch.randint(0, 256, (nblocks,), dtype=torch.uint8),
            torch.Size((n,)),
            torch.bfloat16,
            bs,
            qt,
            get_code(qt),
            NestedState(
                torch.exp(torch.empty(-(-nblocks // 256)).uniform_(-20, 20)),
                torch.sort(torch.randn(256)).values,
                0.3125,
            ),
        )
        for state in (plain, nested):
            for out_dtype in DTYPES:
                got = native.dequantize_4bit_cpu(packed, state, out_dtype)
                assert torch.equal(got, dequantize_4bit(packed, state, out_dtype, backend="torch")), (qt, out_dtype)


def test_fp16_bf16_rounding_bit_identical():
    """Dequantised outputs equal torch's fp32 -> fp16/bf16 rounding at every boundary: with all
    indices 15 (NF4 code 1.0) the output of block b is exactly absmax[b]."""
    values = rounding_cases()
    bs = 32
    state = QuantState(values, torch.Size((values.numel() * bs,)), torch.float32, bs, "nf4", get_code("nf4"))
    packed = torch.full((values.numel() * bs // 2,), 0xFF, dtype=torch.uint8)
    for out_dtype in (torch.float16, torch.bfloat16):
        got = native.dequantize_4bit_cpu(packed, state, out_dtype).view(-1, bs)
        assert torch.equal(got[:, 0], values.to(out_dtype)), out_dtype
        assert torch.equal(got, got[:, :1].expand(-1, bs))


def test_native_triton_and_reference_agree():
    """The three implementations of the format, on one odd shape (the Triton kernels under the interpreter)."""
    w = torch.randn(37, 129, dtype=torch.bfloat16)
    results = {b: quantize_4bit(w, "nf4", 32, True, backend=b) for b in ("native", "triton", "torch")}
    for packed, state in results.values():
        assert torch.equal(packed, results["torch"][0])
        assert torch.equal(state.absmax, results["torch"][1].absmax)
    packed, state = results["torch"]
    outs = [dequantize_4bit(packed, state, torch.float16, backend=b) for b in ("native", "triton", "torch")]
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])


def test_storage_dtype_and_strided_input():
    w = torch.randn(96, 80)
    packed, state = native.quantize_4bit_cpu(w.T, "fp4", 64, quant_storage=torch.bfloat16)  # non-contiguous
    ref_packed, ref_state = quantize_4bit(w.T.contiguous(), "fp4", 64, backend="torch")
    assert packed.dtype == torch.bfloat16 and torch.equal(packed.view(torch.uint8).view(-1), ref_packed.view(-1))
    assert torch.equal(native.dequantize_4bit_cpu(packed, state), dequantize_4bit(ref_packed, ref_state))


def test_cpu_default_backend_is_native():
    """Built and bit-identical, the native kernels serve CPU tensors by default; "torch" stays selectable."""
    assert dispatch.choose("quantize_4bit", "cpu").backend == "native"
    assert dispatch.choose("quantize_4bit", "cpu", "torch").backend == "torch"
    assert dispatch.choose("lora_linear", "cpu", m=1, quantized=False).backend == "torch"  # no native kernel


_PORTABLE_SCRIPT = """
import sys, torch
from fastlora import native
case = torch.load(sys.argv[1])
packed, state = native.quantize_4bit_cpu(case["w"], "fp4", 64, True)
y = native.gemv_4bit(case["x"], packed, state, case["bias"], lora_a=case["a"], lora_b=case["b"], scale=0.5)
torch.save({"packed": packed, "absmax": state.absmax, "deq": native.dequantize_4bit_cpu(packed, state), "y": y},
           sys.argv[2])
"""


def test_portable_and_avx2_paths_agree():
    """The run-time dispatched AVX2 loops (table lookups, dot products) and the portable loops give
    identical bits: the same case in a subprocess with FASTLORA_NO_AVX2=1."""
    w, x = torch.randn(70, 200).bfloat16(), torch.randn(5, 200).bfloat16()
    case = {"w": w, "x": x, "bias": torch.randn(70).bfloat16(), "a": torch.randn(3, 200).bfloat16(),
            "b": torch.randn(70, 3).bfloat16()}  # fmt: skip
    packed, state = native.quantize_4bit_cpu(w, "fp4", 64, True)
    want = {
        "packed": packed, "absmax": state.absmax, "deq": native.dequantize_4bit_cpu(packed, state),
        "y": native.gemv_4bit(x, packed, state, case["bias"], lora_a=case["a"], lora_b=case["b"], scale=0.5),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        torch.save(case, os.path.join(d, "in.pt"))
        env = {**os.environ, "FASTLORA_NO_AVX2": "1"}
        cmd = [sys.executable, "-c", _PORTABLE_SCRIPT, os.path.join(d, "in.pt"), os.path.join(d, "out.pt")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = torch.load(os.path.join(d, "out.pt"))
    for key, value in want.items():
        assert torch.equal(got[key], value), key


# -- GEMV and merge against float64 references --------------------------------------------------------

GEMV_CASES = {
    # name: (quant_type, blocksize, double_quant, K, N, bias, lora)
    "nf4-K200-N77-bias": ("nf4", 64, False, 200, 77, True, None),  # K % blocksize != 0, N odd
    "fp4-dq-K129-N33-loraA": ("fp4", 32, True, 129, 33, False, "a"),  # K odd: rows start mid-byte
    "nf4-dq-K256-N45-bias-loraU": ("nf4", 128, True, 256, 45, True, "u"),
    "fp4-K96-N130-bias-loraA": ("fp4", 256, False, 96, 130, True, "a"),  # rows straddle blocks
}


def _gemv_case(m, dtype, case):
    qt, bs, dq, k, n, with_bias, lora = GEMV_CASES[case]
    r = 5
    w = torch.randn(n, k) / math.sqrt(k)
    packed, state = quantize_4bit(w.to(dtype), qt, bs, dq, backend="torch")
    x = torch.randn(m, k).to(dtype)
    bias = (torch.randn(n) * 0.1).to(dtype) if with_bias else None
    a = (torch.randn(r, k) / math.sqrt(k)).to(dtype)
    b = (torch.randn(n, r) / math.sqrt(r)).to(dtype)
    u = (x.float() @ a.float().T).to(dtype)
    kwargs = {}
    if lora == "a":
        kwargs = {"lora_a": a, "lora_b": b, "scale": 1.75}
    elif lora == "u":
        kwargs = {"lora_u": u, "lora_b": b, "scale": 1.75}
    return x, packed, state, bias, kwargs


@pytest.mark.parametrize("case", list(GEMV_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("m", [1, 3, 16], ids=id_formatter("M"))
def test_gemv_matches_float64_reference(m, dtype, case):
    x, packed, state, bias, kwargs = _gemv_case(m, dtype, case)
    y = native.gemv_4bit(x, packed, state, bias, **kwargs)
    assert y.shape == (m, state.shape[0]) and y.dtype == dtype
    ref = native.gemv_4bit_ref(x, packed, state, bias, compute_dtype=torch.float64, **kwargs).double()
    # PyTorch's own error in this dtype: the same sum with W rounded to the dtype, computed in it.
    w_dt = dequantize_4bit(packed, state, dtype, backend="torch")
    own = torch.nn.functional.linear(x, w_dt, bias)
    if "lora_b" in kwargs:
        u = kwargs.get("lora_u")
        u = x @ kwargs["lora_a"].T if u is None else u
        own = own + (u * kwargs["scale"]) @ kwargs["lora_b"].T
    assert not torch.isnan(y).any()
    assert rel_error(y, ref) <= 2 * rel_error(own, ref) + FLOOR[dtype], (rel_error(y, ref), rel_error(own, ref))


def test_gemv_leading_dims_any_m_and_strides():
    """(..., K) inputs; on CPU any M (here 40); a row-strided x gives the same result as its copy."""
    w = torch.randn(50, 64)
    packed, state = quantize_4bit(w, "nf4", 64)
    x = torch.randn(2, 20, 128)[..., ::2]  # non-unit stride along K: made contiguous by the wrapper
    y = native.gemv_4bit(x, packed, state)
    assert y.shape == (2, 20, 50)
    ref = native.gemv_4bit_ref(x.reshape(-1, 64), packed, state, compute_dtype=torch.float64).view(2, 20, 50)
    assert rel_error(y, ref) <= FLOOR[torch.float32]
    rows = torch.randn(6, 100)[:, :64]  # unit stride along K, row stride 100: used in place
    assert torch.equal(native.gemv_4bit(rows, packed, state), native.gemv_4bit(rows.contiguous(), packed, state))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=id_formatter("out"))
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("lora"))
def test_merge_matches_float64_reference(dtype, out_dtype):
    n, k, r = 67, 129, 7
    packed, state = quantize_4bit(torch.randn(n, k), "nf4", 32, True)
    a, b = torch.randn(r, k).to(dtype), torch.randn(n, r).to(dtype)
    got = native.merge_4bit(packed, state, a, b, 0.5, out_dtype)
    ref = native.merge_4bit_ref(packed, state, a, b, 0.5, torch.float64, compute_dtype=torch.float64)
    own = native.merge_4bit_ref(packed, state, a, b, 0.5, out_dtype, compute_dtype=dtype)
    assert got.shape == (n, k) and got.dtype == out_dtype
    assert rel_error(got, ref) <= 2 * rel_error(own, ref) + FLOOR[out_dtype]


def test_lora_linear_decode_uses_the_native_gemv(monkeypatch):
    """A 4-bit lora_linear at decode sizes runs the native GEMV (u, with dropout, enters its
    epilogue); the output and every gradient match the float64 reference."""
    calls = []
    real = native.gemv_4bit
    monkeypatch.setattr(native, "gemv_4bit", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    m, k, n, r = 3, 96, 40, 4
    packed, state = quantize_4bit(torch.randn(n, k) / k**0.5, "nf4", 32, True)
    w_ref = dequantize_4bit(packed, state, torch.float32).double()
    leaves = [torch.randn(m, k), torch.randn(n) * 0.1, torch.randn(r, k) / k**0.5, torch.randn(n, r)]
    got = [t.clone().requires_grad_() for t in leaves]
    y = lora_linear(got[0], packed, got[1], got[2], got[3], 2.0, quant_state=state)
    assert calls, "the native GEMV did not run"
    g = torch.randn_like(y)
    y.backward(g)
    ref = [t.double().requires_grad_() for t in leaves]
    y_ref = lora_linear_ref(ref[0], w_ref, ref[1], ref[2], ref[3], 2.0)
    y_ref.backward(g.double())
    assert rel_error(y, y_ref) <= FLOOR[torch.float32]
    for name, a, b in zip(("dx", "db", "dA", "dB"), got, ref, strict=True):
        assert rel_error(a.grad, b.grad) <= FLOOR[torch.float32], name
    # With dropout the native path gets the dropped u: equal to the torch backend's forward.
    calls.clear()
    y_native = lora_linear(
        leaves[0], packed, leaves[1], leaves[2], leaves[3], 2.0, quant_state=state, dropout_p=0.3, seed=11
    )
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    y_torch = lora_linear(
        leaves[0], packed, leaves[1], leaves[2], leaves[3], 2.0, quant_state=state, dropout_p=0.3, seed=11
    )
    assert len(calls) == 1 and rel_error(y_native, y_torch) <= FLOOR[torch.float32]
