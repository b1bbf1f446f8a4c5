"""The native kernels of csrc/ (fastlora._C): CPU kernels against the PyTorch path, bit for bit where
the format is defined (quantise / dequantise) and against float64 references where arithmetic is
(GEMV, merge); torch.library registration; the build's fallbacks; the CUDA sources compiled with
plain nvcc for sm_80 / sm_90 (no spills); and `gpu`-marked tests of the CUDA kernels (which
test_cuda_emulated.py also runs on the CPU, through an emulator).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import DTYPES, FLOOR, id_formatter, rel_error

from fastlora import _alloc, dispatch, native
from fastlora.kernels.lora_ref import lora_linear_ref
from fastlora.quant.ref import _blockwise_lut
from fastlora.ops import lora_linear
from fastlora.quant import QuantState, dequantize_4bit, get_code, quantize_4bit
from fastlora.quant.codes import get_bounds, get_dynamic_map
from fastlora.quant.state import NestedState

ROOT = Path(__file__).resolve().parent.parent


def _compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(scope="module", autouse=True)
def built():
    """The CPU extension: the installed build, else a JIT build. A failure with a compiler present
    fails the tests (CI installs with the extension); only a missing toolchain skips them."""
    module = native.load(jit=True)
    if module is None:
        if not _compiler_available():
            pytest.skip(f"no C++ compiler to build the native extension: {native.unavailable_reason()}")
        pytest.fail(f"the native extension did not build or load: {native.unavailable_reason()}")
    return module


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


def _rounding_cases() -> torch.Tensor:
    """fp32 values at every fp16 and bf16 rounding boundary: each tie between neighbouring finite
    values (subnormals included) and the fp32 values just below and above it, both signs."""
    h = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    ties16 = (h[:-1].double() + h[1:].double()) / 2  # exact in fp32 (12 significant bits)
    b = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    ties_bf16 = (b[:-1].double() + b[1:].double()) / 2
    ties = torch.cat([ties16, ties_bf16, torch.tensor([65520.0, 65504.0, 2.0**-25, 2.0**-24, 3.4e38])]).float()
    around = torch.cat([ties, torch.nextafter(ties, torch.tensor(0.0)), torch.nextafter(ties, torch.tensor(1e39))])
    return torch.cat([around, -around])


def test_fp16_bf16_rounding_bit_identical():
    """Dequantised outputs equal torch's fp32 -> fp16/bf16 rounding at every boundary: with all
    indices 15 (NF4 code 1.0) the output of block b is exactly absmax[b]."""
    values = _rounding_cases()
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


# -- errors ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    packed, state = quantize_4bit(torch.randn(20, 64), "nf4", 64)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match=r"x must be a float32/float16/bfloat16 tensor, got torch.int64"):
        native.gemv_4bit(torch.ones(2, 64, dtype=torch.long), packed, state)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 64\) for a weight of shape \(20, 64\), got \(2, 63\)"):
        native.gemv_4bit(torch.randn(2, 63), packed, state)
    with pytest.raises(ValueError, match=r"bias must have shape \(20,\), got \[21\]"):
        native.gemv_4bit(x, packed, state, torch.randn(21))
    with pytest.raises(TypeError, match=r"bias must be BFloat16, got Float"):
        native.gemv_4bit(x.bfloat16(), packed, state, torch.randn(20))
    with pytest.raises(ValueError, match=r"lora_a / lora_u given without lora_b"):
        native.gemv_4bit(x, packed, state, lora_a=torch.randn(3, 64))
    with pytest.raises(ValueError, match=r"exactly one of lora_a \(r, K\) and lora_u \(M, r\)"):
        native.gemv_4bit(
            x, packed, state, lora_a=torch.randn(3, 64), lora_b=torch.randn(20, 3), lora_u=torch.randn(2, 3)
        )
    with pytest.raises(ValueError, match=r"lora_a must have shape \(3, 64\), got \[3, 65\]"):
        native.gemv_4bit(x, packed, state, lora_a=torch.randn(3, 65), lora_b=torch.randn(20, 3))
    with pytest.raises(ValueError, match=r"packed weight holds 639 bytes .* needs ceil\(1280 / 2\) = 640"):
        native.gemv_4bit(x, packed[:-1], state)
    with pytest.raises(ValueError, match=r"x is on meta, the weight on cpu"):
        native.gemv_4bit(x.to("meta"), packed, state)
    bad = torch.randn(300, 7)
    bad[5, 3], bad[200, 0] = float("nan"), float("-inf")  # caught from the kernel's absmax
    with pytest.raises(ValueError, match=r"w has 2 NaN/Inf values; a 4-bit block cannot represent them"):
        native.quantize_4bit_cpu(bad, blocksize=4096)
    with pytest.raises(ValueError, match=r"quantize_4bit_cpu: w must be a CPU tensor, got one on meta"):
        native.quantize_4bit_cpu(torch.empty(4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"need lora_a \(r, 64\) and lora_b \(20, r\)"):
        native.merge_4bit(packed, state, torch.randn(3, 64), torch.randn(20, 4))
    # The ops check on their own (called directly, e.g. from a compiled graph).
    ops = torch.ops.fastlora
    with pytest.raises(ValueError, match=r"blocksize must be a power of two from 32 to 4096, got 48"):
        ops.dequantize_4bit_native(packed.view(-1), state.absmax, state.code, None, None, 0.0, 48, 1280, torch.float32)
    with pytest.raises(TypeError, match=r"absmax must be Float, got Double"):
        ops.dequantize_4bit_native(
            packed.view(-1), state.absmax.double(), state.code, None, None, 0.0, 64, 1280, torch.float32
        )
    with pytest.raises(ValueError, match=r"nested_absmax and nested_code come together"):
        ops.dequantize_4bit_native(
            packed.view(-1), state.absmax, state.code, state.absmax, None, 0.0, 64, 1280, torch.float32
        )
    with pytest.raises(TypeError, match=r"out_dtype must be float32/float16/bfloat16, got Int"):
        ops.dequantize_4bit_native(packed.view(-1), state.absmax, state.code, None, None, 0.0, 64, 1280, torch.int32)
    with pytest.raises(ValueError, match=r"x must be 2-D \(M, K\), got shape \[64\]"):
        ops.gemv_4bit_native(
            x[0], packed.view(-1), state.absmax, state.code, None, None, 0.0, 64, 20, None, None, None, None, 1.0
        )
    with pytest.raises(TypeError, match=r"w must be float32/float16/bfloat16, got Int"):
        ops.quantize_4bit_native(torch.ones(8, dtype=torch.int32), *get_bounds("nf4"), 64)


# -- torch.library: schemas, fake tensors, torch.compile ----------------------------------------------


def _op_samples():
    w = torch.randn(30, 70)
    packed, state = quantize_4bit(w, "nf4", 32, True)
    flat = packed.view(-1)
    qs = (state.absmax, state.code, state.nested.absmax, state.nested.code, state.nested.offset, 32)
    x = torch.randn(3, 70)
    lut = _blockwise_lut(tuple(get_dynamic_map().tolist()))
    lora = (torch.randn(4, 70), torch.randn(30, 4))
    ops = torch.ops.fastlora
    return [
        (ops.quantize_4bit_native.default, (w, *get_bounds("fp4"), 64)),
        (ops.quantize_blockwise_native.default, (torch.randn(300), lut, 256)),
        (ops.dequantize_4bit_native.default, (flat, *qs, w.numel(), torch.bfloat16)),
        (ops.gemv_4bit_native.default, (x, flat, *qs, 30, torch.randn(30), *lora, None, 0.5)),
        (ops.merge_4bit_native.default, (flat, *qs, *lora, 0.5, torch.float16)),
    ]


@pytest.mark.parametrize("index", range(5), ids=["quantize", "quantize_blockwise", "dequantize", "gemv", "merge"])
def test_opcheck(index):
    """Schema, fake (meta) implementation and AOT-dispatch checks of torch.library for every op."""
    op, args = _op_samples()[index]
    native.loader.ops(torch.device("cpu"), "opcheck")  # sync the test poisoning into the extension
    torch.library.opcheck(op, args)


def test_ops_are_opaque_to_torch_compile():
    packed, state = quantize_4bit(torch.randn(48, 96), "fp4", 64)
    x = torch.randn(2, 96)

    def f(x):
        return torch.ops.fastlora.gemv_4bit_native(
            x * 2.0, packed.view(-1), state.absmax, state.code, None, None, 0.0, 64, 48, None, None, None, None, 1.0
        ).relu()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        y = f(torch.empty(5, 96))
    assert y.shape == (5, 48)


# -- loading and fallbacks -----------------------------------------------------------------------------


def test_module_is_current_and_poison_syncs(built):
    assert native.is_built()
    if torch.version.cuda is None:  # a CPU torch builds the CPU kernels only
        assert not native.has_cuda()
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("csrc_build", ROOT / "csrc" / "build.py")
    cfg = module_from_spec(spec)
    spec.loader.exec_module(cfg)
    assert built.source_hash == "h" + cfg.source_hash()
    if sys.platform.startswith("linux"):
        assert built.openmp() and built.max_threads() >= 1
    native.dequantize_4bit_cpu(*quantize_4bit(torch.randn(64), "nf4", 64))
    assert built._set_poison(_alloc._poison) is True  # the wrapper synced the tests' poisoning


def test_fallback_without_the_extension(monkeypatch, caplog):
    """Not built: nothing breaks, the public functions fall back to the reference with one
    warning, and backend="native" falls back to Triton/PyTorch."""
    monkeypatch.setattr(native.loader, "_module", None)
    monkeypatch.setattr(native.loader, "_reason", "simulated: not built")
    monkeypatch.setattr(native.loader, "_jit_tried", True)
    native.loader._warn_once.cache_clear()
    dispatch._warn_once.cache_clear()
    assert not native.is_built() and native.unavailable_reason() == "simulated: not built"
    w = torch.randn(10, 64)
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        packed, state = native.quantize_4bit_cpu(w)
        y1 = native.gemv_4bit(torch.randn(2, 64), packed, state)
        y2 = native.gemv_4bit(torch.randn(2, 64), packed, state)
    assert y1.shape == y2.shape == (2, 10)
    assert torch.equal(packed, quantize_4bit(w, backend="torch")[0])
    warnings = [r.getMessage() for r in caplog.records]
    # one from the dispatcher (quantize), one from native.gemv_4bit; neither repeats
    assert sum("simulated: not built" in w for w in warnings) == 2, warnings
    assert dispatch.choose("dequantize_4bit", "cpu", "native").backend == "triton"
    assert dispatch.choose("dequantize_4bit", "cpu").backend == "torch"
    native.loader._warn_once.cache_clear()
    dispatch._warn_once.cache_clear()


def test_stale_or_disabled_build_is_refused(monkeypatch):
    class Stale:
        @staticmethod
        def source_hash():
            return "0" * 16

    monkeypatch.setattr(native.loader, "_build_config", lambda: Stale())
    module, reason = native.loader._import_built()
    assert module is None and "stale build" in reason and "build_ext --inplace" in reason
    monkeypatch.setattr(native.loader, "_module", None)
    monkeypatch.setenv("FASTLORA_NO_EXT", "1")
    assert native.load() is None and native.unavailable_reason() == "FASTLORA_NO_EXT is set"
    assert not native.is_built() and native.loader._reason is None  # nothing tried: unsetting it loads again


@pytest.mark.slow
def test_cuda_architectures_from_the_environment(monkeypatch):
    """FASTLORA_CUDA_ARCHS: separators and spellings accepted; anything older than sm_80 (no bf16 mma.sync)
    refused by name before nvcc runs."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("csrc_build", ROOT / "csrc" / "build.py")
    cfg = module_from_spec(spec)
    spec.loader.exec_module(cfg)
    monkeypatch.delenv("FASTLORA_CUDA_ARCHS", raising=False)
    assert cfg.cuda_archs() == ["80", "89", "90"]
    monkeypatch.setenv("FASTLORA_CUDA_ARCHS", "sm_80, 9.0")
    assert cfg.cuda_archs() == ["80", "90"]
    for bad, match in (("75;90", "75: the CUDA kernels need compute capability 8.0"), ("hopper", "like '80;90'")):
        monkeypatch.setenv("FASTLORA_CUDA_ARCHS", bad)
        with pytest.raises(ValueError, match=match):
            cfg.cuda_archs()


def test_setup_never_fails_the_install():
    """setup.py with a compiler that fails: a warning and success (pure Python), unless forced."""
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "CXX": "false", "CC": "false", "MAX_JOBS": "1"}
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", d, "--build-temp", d]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "building the native extension failed" in proc.stderr and "installing without native" in proc.stderr
        assert not list(Path(d).rglob("_C*.so"))
        forced = subprocess.run(
            cmd, cwd=ROOT, env={**env, "FASTLORA_FORCE_EXT": "1"}, capture_output=True, text=True, timeout=300
        )
        assert forced.returncode != 0
        skipped = subprocess.run(
            cmd, cwd=ROOT, env={**env, "FASTLORA_NO_EXT": "1"}, capture_output=True, text=True, timeout=300
        )
        assert skipped.returncode == 0 and "FASTLORA_NO_EXT is set" in skipped.stderr


# -- the CUDA sources, compiled with plain nvcc (no GPU, no CUDA torch) ---------------------------------


def _cuda_home() -> str | None:
    """A CUDA toolkit with nvcc and the runtime headers (CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc's)."""
    which = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if which:  # resolves wrapper scripts only as far as symlinks go
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(which))))
    needed = (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    for home in candidates:
        if home and all(os.path.isfile(os.path.join(home, *f)) for f in needed):
            return home
    return None


def _nvcc() -> str | None:
    home = _cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


@pytest.fixture(scope="module")
def cuda_resource_usage():
    """Every csrc/cuda/*.cu compiled for sm_80 and sm_90 (ptxas resource report per kernel)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): the CUDA sources are compiled where it is")
    usage = {}
    with tempfile.TemporaryDirectory() as d:
        for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            gencode = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
            out = os.path.join(d, source.stem + ".o")
            cmd = [nvcc, "-std=c++17", "-O3", "-c", str(source), "-o", out, "--resource-usage", *gencode]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stderr[-4000:]}"
            pattern = (
                r"Compiling entry function '(\S+)' for '(sm_\d+)'.*?(\d+) bytes stack frame, (\d+) bytes spill "
                r"stores, (\d+) bytes spill loads.*?Used (\d+) registers"
            )
            for m in re.finditer(pattern, proc.stdout + proc.stderr, re.S):
                usage[(m.group(1), m.group(2))] = {
                    "stack": int(m.group(3)), "spill_stores": int(m.group(4)), "spill_loads": int(m.group(5)),
                    "registers": int(m.group(6)),
                }  # fmt: skip
    return usage


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile_without_spills(cuda_resource_usage, arch):
    kernels = {name: u for (name, a), u in cuda_resource_usage.items() if a == arch}
    for kind in ("dequantize_4bit_kernel", "gemv_4bit_kernel", "gemv_4bit_mma_kernel", "merge_4bit_kernel"):
        assert any(kind in name for name in kernels), f"no {kind} in the {arch} build"
    assert sum("gemv_4bit_kernel" in name for name in kernels) == 15  # 3 dtypes x M in {1, 2, 4, 8, 16}
    assert sum("gemv_4bit_mma_kernel" in name for name in kernels) == 4  # fp16/bf16 x M <= 8 / 16
    for name, u in kernels.items():
        assert u["spill_stores"] == 0 and u["spill_loads"] == 0 and u["stack"] == 0, f"{name} on {arch}: {u}"
        assert 0 < u["registers"] <= 255, f"{name} on {arch}: {u}"


def _cuda_sass():
    """benchmarks/cuda_sass.py, the static model of the decode GEMV, loaded from its file (not installed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cuda_sass", ROOT / "benchmarks" / "cuda_sass.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_gemv_instruction_budget():
    """The streaming loops of the decode GEMV stay as lean and as deep as in benchmarks/results/
    static-sm90-2026-11-25 (sm_90 SASS, per 16-byte chunk = 32 weights a lane: about 188 instructions for
    the tensor-core kernel at M <= 8 and 196 at M <= 16, 198 for the fp32 CUDA-core kernel at M = 1;
    issue-bound ceilings near 88 / 84 / 83 % of H100 bandwidth), and the tensor-core kernel keeps two
    steps of W in flight (about 4.3 16-byte loads a lane) at 128 registers, two blocks an SM: a guard
    against work creeping into the hot loops and against the prefetch collapsing."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the SASS budget is checked where it is")
    cuda_sass = _cuda_sass()
    rows = cuda_sass.gemv_loops(*cuda_sass.disassemble(nvcc))
    loops = {(r["kernel"], r["dtype"], r["M"]): r for r in rows}
    assert len(loops) == 9  # 16-bit x on the 16-byte path always takes the tensor cores
    for dtype in ("fp16", "bf16"):
        for m, limit, hmma, wavefronts in ((8, 195, 4, 48), (16, 205, 8, 56)):
            r = loops[("tensor cores", dtype, m)]
            assert r["instructions"] <= limit, r
            # one table lookup and one multiply a weight, 8 mma.sync (x 1 or 2 token tiles) per 2 chunks
            assert r["lds"] == 32 and r["fmul"] <= 34 and r["hmma"] == hmma, r
            # W of two steps (2 x 2 loads a lane) outstanding through most of the loop, at two blocks an SM
            assert r["in_flight"] >= 4.0 and r["blocks_per_sm"] >= 2, r
            assert r["wavefronts"] <= wavefronts, r  # L1: 32 table lookups, W, absmax and x (8 or 16) a chunk
            latency = cuda_sass.latency_ceiling(r, sms=132, bandwidth_tbs=3.35, latency_ns=1000)
            assert latency == 1.0, r  # enough in flight for H100 bandwidth even at 1 µs of latency
    m1 = loops[("CUDA cores", "fp32", 1)]
    assert m1["instructions"] <= 210 and m1["lds"] == 32 and m1["fmul"] <= 34, m1


def test_sass_model_counts_loads_in_flight_and_occupancy():
    """The static model's inputs on hand-made cases: load-to-use distance around the back edge, L1
    wavefronts per load, and register-limited occupancy (per-warp allocation in units of 256 registers)."""
    cuda_sass = _cuda_sass()
    loop = [
        "LDG.E.NA.128.CONSTANT R8, desc[UR4][R2.64]",  # used at 3: 3 instructions
        "IMAD R16, R14, 0x2, R1",
        "LDG.E.NA.128.CONSTANT R12, desc[UR4][R4.64]",  # used at 1 of the next iteration: 4 instructions
        "FFMA R20, R11, R20, R21",
        "BRA 0x0",
    ]
    assert cuda_sass._in_flight(loop) == pytest.approx((3 + 4) / 5)
    wavefronts = [cuda_sass._wavefronts(op) for op in (*loop, "LDS R3, [R2]", "@!P1 LDG.E.64 R4, desc[UR4][R6.64]")]
    assert wavefronts == [4, 0, 4, 0, 0, 1, 2]
    assert cuda_sass.blocks_per_sm(128, 256) == 2 and cuda_sass.blocks_per_sm(129, 256) == 1
    assert cuda_sass.blocks_per_sm(124, 128) == 4 and cuda_sass.blocks_per_sm(32, 256) == 8
    row = {"blocks_per_sm": 2, "threads": 256, "in_flight": 4.0}  # 32 KiB an SM x 132 = 4.3 MB
    assert cuda_sass.latency_ceiling(row, sms=132, bandwidth_tbs=3.35, latency_ns=600) == 1.0
    assert cuda_sass.latency_ceiling(row, sms=132, bandwidth_tbs=3.35, latency_ns=2000) == pytest.approx(
        132 * 2 * 256 * 4 * 16 / (3.35e12 * 2e-6)
    )


@pytest.mark.slow
def test_cuda_binding_compiles_against_torch_headers():
    """bindings_cuda.cpp only builds into a CUDA torch; here it is at least parsed and type-checked
    against torch's and CUDA's headers (the CPU wheel lacks one generated CMake header: stubbed)."""
    nvcc = _nvcc()
    if nvcc is None or not _compiler_available():
        pytest.skip("needs nvcc (for the CUDA headers) and a C++ compiler")
    from torch.utils import cpp_extension

    cuda_include = os.path.join(_cuda_home(), "include")
    with tempfile.TemporaryDirectory() as d:
        stub = Path(d, "c10", "cuda", "impl")
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes = [*cpp_extension.include_paths(), d, cuda_include, str(ROOT / "csrc")]
        import sysconfig

        includes.append(sysconfig.get_paths()["include"])
        cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only", "-DFASTLORA_WITH_CUDA",
               *(f"-I{i}" for i in includes), str(ROOT / "csrc" / "bindings_cuda.cpp")]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


# -- the CUDA kernels on a GPU (make test-gpu) -----------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_native():
    if not native.has_cuda():
        pytest.skip(f"fastlora._C has no CUDA kernels here: {native.unavailable_reason('cuda')}")


@pytest.mark.gpu
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


@pytest.mark.gpu
def test_cuda_fp16_bf16_rounding_bit_identical(cuda_native):
    values = _rounding_cases()
    bs = 32
    state = QuantState(values, torch.Size((values.numel() * bs,)), torch.float32, bs, "nf4", get_code("nf4"))
    packed = torch.full((values.numel() * bs // 2,), 0xFF, dtype=torch.uint8)
    for out_dtype in (torch.float16, torch.bfloat16):
        got = dequantize_4bit(packed.cuda(), state.to("cuda"), out_dtype, backend="native").view(-1, bs).cpu()
        assert torch.equal(got, values.to(out_dtype)[:, None].expand(-1, bs)), out_dtype


@pytest.mark.gpu
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


@pytest.mark.gpu
def test_cuda_gemv_rejects_more_than_16_rows(cuda_native):
    packed, state = quantize_4bit(torch.randn(32, 64, device="cuda"), "nf4", 64)
    with pytest.raises(ValueError, match=r"at most 16 rows of x, got 17"):
        native.gemv_4bit(torch.randn(17, 64, device="cuda"), packed, state)


@pytest.mark.gpu
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
