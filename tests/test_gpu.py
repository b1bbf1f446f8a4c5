"""The compiled Triton kernels on a CUDA device (``make test-gpu``); skipped elsewhere.

Same rules as the interpreter tests: float64 references, odd shapes, every gradient, poisoned
outputs; here the autotuned GPU configs (wgmma on Hopper) run instead of the interpreter's one.
"""

import pytest
import torch
from helpers import DTYPES, FLOOR, id_formatter

from fastlora.kernels.lora_ref import lora_linear_ref
from fastlora.ops import lora_linear
from fastlora.quant import absmax_fp32, dequantize_4bit, quantize_4bit
from fastlora.quant.ref import dequantize_4bit_ref, quantize_4bit_ref

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("blocksize", [32, 64, 4096], ids=id_formatter("bs"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quant_kernels_bit_exact_on_gpu(quant_type, blocksize, dtype):
    w = torch.randn(333, 4097).to(dtype)
    packed_ref, absmax_ref = quantize_4bit_ref(w, quant_type, blocksize)
    for dq in (False, True):
        packed, state = quantize_4bit(w.cuda(), quant_type, blocksize, dq)
        assert torch.equal(packed.view(-1).cpu(), packed_ref)
        if not dq:
            assert torch.equal(state.absmax.cpu(), absmax_ref)
        expected = dequantize_4bit_ref(
            packed.view(-1).cpu(), absmax_fp32(state.to("cpu")), state.code.cpu(), blocksize, tuple(w.shape), dtype
        )
        assert torch.equal(dequantize_4bit(packed, state).cpu(), expected)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=id_formatter("p"))
@pytest.mark.parametrize("path", [None, "fused", "dequant_gemm"], ids=id_formatter("path"))
@pytest.mark.parametrize("weight_kind", ["dense", "nf4", "nf4-dq", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize(
    "shape", [(1, 1024, 768, 16), (16, 4096, 1000, 8), (1000, 1024, 1536, 64), (257, 53, 37, 1)], ids=str
)
def test_fused_lora_on_gpu(shape, dtype, weight_kind, path, p, monkeypatch):
    """Every path (None: the size dispatch's choice), with and without dropout."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 references without TF32
    m, k, n, r = shape
    w = torch.randn(n, k, device="cuda") / k**0.5
    state, stored, w_ref = None, w.to(dtype), w.to(dtype).double()
    if weight_kind != "dense":
        blocksize = 64 if k % 64 == 0 else 32
        stored, state = quantize_4bit(w.to(dtype), weight_kind[:3], blocksize, weight_kind.endswith("dq"))
        w_ref = dequantize_4bit(stored, state, torch.float32).double()
    leaves = [torch.randn(m, k), torch.randn(n) * 0.1, torch.randn(r, k) / k**0.5, torch.randn(n, r) / r**0.5]
    leaves = [t.cuda() for t in leaves]
    got = [t.to(dtype).clone().requires_grad_() for t in leaves]
    y = lora_linear(got[0], stored, got[1], got[2], got[3], 2.0, quant_state=state, dropout_p=p, seed=77, path=path)
    g = torch.randn_like(y)
    y.backward(g)
    ref = [t.to(dtype).double().requires_grad_() for t in leaves]
    y_ref = lora_linear_ref(ref[0], w_ref, ref[1], ref[2], ref[3], 2.0, p, 77)
    y_ref.backward(g.double())
    own = [t.to(dtype).clone().requires_grad_() for t in leaves]
    y_own = lora_linear_ref(own[0], w_ref.to(dtype), own[1], own[2], own[3], 2.0, p, 77)
    y_own.backward(g)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert not torch.isnan(y).any()
    assert rel(y, y_ref) <= 2 * rel(y_own, y_ref) + FLOOR[dtype]
    for name, a, b, c in zip(("dx", "db", "dA", "dB"), got, ref, own, strict=True):
        assert rel(a.grad, b.grad) <= 2 * rel(c.grad, b.grad) + FLOOR[dtype], name
