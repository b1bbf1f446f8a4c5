"""The bandwidth-bound dequantisation kernel (fastlora.kernels.dequant) and the shared scratch (fastlora.ops.scratch).

Bit-equality against the PyTorch reference, fast (K % 32 == 0) and general variants, every quant type,
nesting, blocksize and output dtype, written into strided, poisoned buffers; the scratch's reuse rules.
"""

import pytest
import torch
from helpers import id_formatter

from fastlora import _alloc, dispatch
from fastlora.kernels.dequant import bandwidth_ceiling, dequantize_4bit_fast, dequantize_4bit_into
from fastlora.ops import scratch as scratch_mod
from fastlora.ops.scratch import dequantized_weight, release, scratch
from fastlora.quant import absmax_fp32, quantize_4bit
from fastlora.quant.ref import dequantize_4bit_ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _quantized(n, k, quant_type, blocksize, nested):
    w = torch.randn(n, k) * torch.linspace(0.1, 3.0, n * k).view(n, k)
    w[0, : min(k, blocksize)] = 0.0  # an all-zero block: absmax 0
    return quantize_4bit(w, quant_type, blocksize, nested, backend="torch")


def _reference(packed, state, dtype):
    return dequantize_4bit_ref(packed, absmax_fp32(state), state.code, state.blocksize, tuple(state.shape), dtype)


# (N, K, blocksize): fast variant (K % 32 == 0: blocks straddle rows when K % blocksize != 0), general
# variant (K odd, K not a multiple of 32), N = 1.
SHAPES = [
    (3, 64, 64),
    (5, 96, 64),  # 96 = 1.5 blocks a row
    (2, 160, 128),
    (1, 4096, 4096),
    (3, 32, 4096),  # the whole weight one partial block
    (4, 33, 64),  # K odd: bytes straddle rows
    (3, 45, 128),
    (1, 7, 64),
    (6, 48, 32),  # K % 32 == 16: general variant, blocksize 32
]


@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("nested", [False, True], ids=id_formatter("nested"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("n,k,blocksize", SHAPES)
def test_dequantize_into_bit_equal(n, k, blocksize, quant_type, nested, dtype):
    packed, state = _quantized(n, k, quant_type, blocksize, nested)
    ref = _reference(packed, state, dtype)
    pad = 3 if k % 2 else 16  # row stride > K: the columns beside W must stay untouched
    buffer = _alloc.empty((n, k + pad), dtype=dtype, device="cpu")
    assert buffer.isnan().all()  # poisoned
    out = dequantize_4bit_into(packed, state, buffer[:, :k])
    assert out.data_ptr() == buffer.data_ptr()
    assert torch.equal(_bits(out), _bits(ref))
    assert buffer[:, k:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=id_formatter("dtype"))
def test_dequantize_into_rounds_to_nearest(dtype):
    # values straddling bf16/fp16 rounding boundaries: a truncating cast would differ in the last bit
    packed, state = _quantized(8, 256, "nf4", 64, False)
    state = type(state)(
        absmax=state.absmax * 1.0009765625 + 1e-3,
        shape=state.shape,
        dtype=state.dtype,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        code=state.code,
    )
    out = dequantize_4bit_into(packed, state, _alloc.empty((8, 256), dtype=dtype, device="cpu"))
    assert torch.equal(_bits(out), _bits(_reference(packed, state, dtype)))


@pytest.mark.parametrize("shape", [(2, 3, 32), (77,), (4, 64)], ids=str)
def test_dequantize_fast_any_shape(shape):
    # the dispatch-signature wrapper: a new poisoned tensor of any shape
    w = torch.randn(shape)
    packed, state = quantize_4bit(w, "fp4", 64, True, backend="torch")
    out = dequantize_4bit_fast(packed, state, torch.bfloat16)
    assert out.shape == shape
    assert torch.equal(_bits(out), _bits(_reference(packed, state, torch.bfloat16)))


def test_dequantize_into_checks():
    packed, state = _quantized(4, 64, "nf4", 64, False)
    with pytest.raises(ValueError, match="shape"):
        dequantize_4bit_into(packed, state, torch.empty(4, 32))
    with pytest.raises(ValueError, match="column stride"):
        dequantize_4bit_into(packed, state, torch.empty(64, 4).t())
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        dequantize_4bit_into(packed, state, torch.empty(4, 64, dtype=torch.float64))


def test_scratch_reuse_grow_release():
    release()
    a = scratch((16, 32), torch.bfloat16, "cpu")
    b = scratch((8, 32), torch.bfloat16, "cpu")  # smaller: the same storage
    assert b.data_ptr() == a.data_ptr() and b.shape == (8, 32) and b.is_contiguous()
    assert not b.requires_grad
    c = scratch((16, 32), torch.bfloat16, "cpu")  # same size: the same storage
    assert c.data_ptr() == a.data_ptr()
    other = scratch((16, 32), torch.float32, "cpu")  # one buffer per dtype
    assert other.data_ptr() != a.data_ptr()
    big = scratch((64, 64), torch.bfloat16, "cpu")  # grows
    assert big.numel() == 64 * 64
    assert scratch_mod._BUFFERS[(torch.device("cpu"), torch.bfloat16)].numel() == 64 * 64
    assert scratch((16, 32), torch.bfloat16, "cpu").data_ptr() == big.data_ptr()
    release("cpu")
    assert not scratch_mod._BUFFERS
    release()


@pytest.mark.parametrize("backend", ["torch", "native", "triton", None], ids=id_formatter("backend"))
@pytest.mark.parametrize("n,k,blocksize", [(6, 64, 64), (5, 33, 64)])
def test_dequantized_weight_cpu(n, k, blocksize, backend):
    release()
    packed, state = _quantized(n, k, "nf4", blocksize, True)
    first = dequantized_weight(packed, state, torch.bfloat16, backend=backend)
    assert torch.equal(_bits(first), _bits(_reference(packed, state, torch.bfloat16)))
    assert first.shape == (n, k) and not first.requires_grad
    # a second layer of the same size shares the memory
    packed2, state2 = _quantized(n, k, "fp4", blocksize, False)
    second = dequantized_weight(packed2, state2, torch.bfloat16, backend=backend)
    assert second.data_ptr() == first.data_ptr()
    assert torch.equal(_bits(second), _bits(_reference(packed2, state2, torch.bfloat16)))
    release()


def test_dequantized_weight_dense_unchanged():
    w = torch.randn(4, 8)
    assert dequantized_weight(w, None, torch.bfloat16) is w


def test_dequantized_weight_triton_needs_interpreter(monkeypatch):
    packed, state = _quantized(2, 32, "nf4", 64, False)
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="CUDA tensor"):
        dequantized_weight(packed, state, torch.bfloat16, backend="triton")


def test_bandwidth_model():
    # 370 instructions a chunk (the bf16 binary's count): far under the issue budget, so HBM-bound
    assert bandwidth_ceiling(370) == 1.0
    # an issue-bound loop: 32 weights a lane-chunk cost 2000 instructions -> about 41 % of HBM
    assert 0.35 < bandwidth_ceiling(2000) < 0.45


def test_unsloth_style_reference_and_path_scope(monkeypatch):
    # the bench's unsloth-style layer against float64 autograd, every gradient
    import os

    from fastlora.bench.unsloth_style import PATH_ENV, path_scope, unsloth_style_lora

    monkeypatch.delenv(PATH_ENV, raising=False)
    m, k, n, r, s = 5, 64, 24, 4, 2.0
    packed, state = _quantized(n, k, "nf4", 64, True)
    w = _reference(packed, state, torch.float64)
    x, a, b, g = torch.randn(m, k), torch.randn(r, k) / 8, torch.randn(n, r) / 2, torch.randn(m, n)
    xr, ar, br = (t.double().requires_grad_() for t in (x, a, b))
    (xr @ w.T + s * (xr @ ar.T) @ br.T).backward(g.double())
    seen = []

    def fwd(t):
        seen.append(("forward", os.environ.get(PATH_ENV)))
        y = unsloth_style_lora(t, a, b, packed, state, s)
        y.register_hook(lambda grad: seen.append(("backward", os.environ.get(PATH_ENV))))
        return y

    a.requires_grad_(), b.requires_grad_(), x.requires_grad_()
    y = path_scope(fwd, "dequant_gemm")(x)
    assert os.environ.get(PATH_ENV) is None  # restored after the forward
    y.backward(g)
    assert os.environ.get(PATH_ENV) is None  # and after the backward
    assert seen == [("forward", "dequant_gemm"), ("backward", "dequant_gemm")]
    for got, ref in ((y, xr @ w.T + s * (xr @ ar.T) @ br.T), (x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 14336), (33, 4095)])
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
def test_dequantize_into_cuda(n, k, dtype):
    # the compiled kernels at the 8B shapes (and an odd K), written beside 16 extra columns
    w = torch.randn(n, k, device="cuda")
    packed, state = quantize_4bit(w, "nf4", 64, True)
    buffer = torch.full((n, k + 16), float("nan"), dtype=dtype, device="cuda")
    out = dequantize_4bit_into(packed, state, buffer[:, :k])
    assert torch.equal(_bits(out), _bits(_reference(packed, state, dtype)))
    assert buffer[:, k:].isnan().all()
    release()
    dense = dequantized_weight(packed, state, dtype)
    assert torch.equal(_bits(dense), _bits(out))
    release()
