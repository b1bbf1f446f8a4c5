"""The fused LoRA/QLoRA kernels and ops against the float64 reference, forward and every gradient."""

import pytest
import torch
import triton
import triton.language as tl
from helpers import DTYPES, FLOOR, id_formatter, rel_error

from fastlora.functional import apply_dropout, drop_threshold, dropout_keep_mask, seed32
from fastlora.kernels.lora import lora_bwd_dx_triton
from fastlora.kernels.lora_ref import lora_linear_ref
from fastlora.kernels.primitives import keep_mask
from fastlora.ops import lora_linear
from fastlora.quant import QuantArgs, QuantState, dequantize_4bit, quantize_4bit

# (M, K, N, r): M in {1, 2, 3, 17, 257}, r in {1, 8, 64, 256}; K, N not multiples of 16/64 where the 4-bit layout allows
# (K=53: odd rows, blocks straddle rows -> general path; K=128/192: byte- and block-aligned path).
SHAPES = [(1, 128, 96, 8), (3, 53, 37, 1), (17, 192, 83, 64), (257, 64, 45, 8), (2, 256, 272, 256)]
WEIGHTS = ["dense", "nf4", "fp4-dq"]


def _make(m, k, n, r, weight_kind, dtype):
    w = torch.randn(n, k) / k**0.5
    state = None
    stored = w.to(dtype)
    w_ref = stored.double()
    if weight_kind != "dense":
        blocksize = 64 if k % 64 == 0 else 32
        stored, state = quantize_4bit(w.to(dtype), weight_kind[:3], blocksize, weight_kind.endswith("dq"))
        # compare against the already-dequantised weight: quantisation error cannot hide kernel error
        w_ref = dequantize_4bit(stored, state, torch.float32).double()
    x = torch.randn(m, k)
    bias = torch.randn(n) * 0.1
    a = torch.randn(r, k) / k**0.5
    b = torch.randn(n, r) / r**0.5
    return x, stored, state, w_ref, bias, a, b


def _check(name, got, ref, torch_same_dtype, dtype):
    err, base = rel_error(got, ref), rel_error(torch_same_dtype, ref)
    assert not torch.isnan(got).any(), f"{name}: NaN (an output left unwritten?)"
    assert err <= 2 * base + FLOOR[dtype], f"{name}: rel error {err:.2e} > 2 x torch's {base:.2e} + {FLOOR[dtype]}"


def _run(x, w, state, bias, a, b, scale, p, seed, dtype, backend, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, bias, a, b)]
    xs, bs, as_, bs_ = leaves
    y = lora_linear(xs, w, bs, as_, bs_, scale, quant_state=state, dropout_p=p, seed=seed)
    return y, leaves


# Every dtype x weight kind at the small shapes; the two large ones (minutes under the interpreter) once per dtype
# and once per weight kind (a Latin square), which still runs each of their tile paths in every dtype.
FUSED_CASES = [(shape, dtype, kind) for shape in SHAPES[:3] for dtype in DTYPES for kind in WEIGHTS]
FUSED_CASES += [
    (shape, dtype, WEIGHTS[(i + j) % 3]) for j, shape in enumerate(SHAPES[3:]) for i, dtype in enumerate(DTYPES)
]


@pytest.mark.parametrize(
    ("shape", "dtype", "weight_kind"), FUSED_CASES, ids=[f"MKNr={s}-dtype={d}-{w}" for s, d, w in FUSED_CASES]
)
def test_fused_kernel_matches_float64_reference(shape, dtype, weight_kind, monkeypatch):
    m, k, n, r = shape
    x, w, state, w_ref, bias, a, b = _make(m, k, n, r, weight_kind, dtype)
    scale = 2.0
    y, leaves = _run(x, w, state, bias, a, b, scale, 0.0, 0, dtype, "triton", monkeypatch)
    g = torch.randn_like(y)
    y.backward(g)

    # float64 reference, and PyTorch's own result in the same dtype (the error it is allowed)
    ref_leaves = [t.detach().to(dtype).double().requires_grad_() for t in (x, bias, a, b)]
    ref = lora_linear_ref(ref_leaves[0], w_ref, ref_leaves[1], ref_leaves[2], ref_leaves[3], scale)
    ref.backward(g.double())
    low_leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, bias, a, b)]
    low = lora_linear_ref(low_leaves[0], w_ref.to(dtype), low_leaves[1], low_leaves[2], low_leaves[3], scale)
    low.backward(g)

    assert y.dtype == dtype and y.shape == (m, n)
    _check("y", y, ref, low, dtype)
    for name, got, want, own in zip(("dx", "db", "dA", "dB"), leaves, ref_leaves, low_leaves, strict=True):
        assert got.grad is not None and got.grad.dtype == dtype, name
        _check(name, got.grad, want.grad, own.grad, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("weight_kind", ["dense", "nf4"])
def test_dropout_gradients(backend, weight_kind, monkeypatch):
    m, k, n, r, p, seed = 9, 64, 40, 4, 0.3, 1234
    x, w, state, w_ref, bias, a, b = _make(m, k, n, r, weight_kind, torch.float32)
    y, leaves = _run(x, w, state, bias, a, b, 1.5, p, seed, torch.float32, backend, monkeypatch)
    g = torch.randn_like(y)
    y.backward(g)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, bias, a, b)]
    ref = lora_linear_ref(ref_leaves[0], w_ref, ref_leaves[1], ref_leaves[2], ref_leaves[3], 1.5, p, seed)
    ref.backward(g.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
    # dropout really acts: the result differs from p = 0
    y0, _ = _run(x, w, state, bias, a, b, 1.5, 0.0, seed, torch.float32, backend, monkeypatch)
    assert not torch.allclose(y.detach(), y0.detach(), atol=1e-4)


def test_dropout_mask_is_a_function_of_the_seed():
    a = dropout_keep_mask((200, 300), 0.25, 7, "cpu")
    assert torch.equal(a, dropout_keep_mask((200, 300), 0.25, 7, "cpu"))
    assert not torch.equal(a, dropout_keep_mask((200, 300), 0.25, 8, "cpu"))
    kept = a.float().mean().item()
    assert abs(kept - 0.75) < 5 * (0.75 * 0.25 / a.numel()) ** 0.5  # 5 standard errors


def test_leading_dims_and_non_contiguous_input(monkeypatch):
    _, w, state, w_ref, bias, a, b = _make(6, 64, 24, 4, "nf4", torch.float32)
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    x3 = torch.randn(2, 64, 3).transpose(1, 2)  # (2, 3, 64), last dim strided
    y = lora_linear(x3, w, bias, a, b, 0.5, quant_state=state)
    ref = lora_linear_ref(x3.double(), w_ref, bias.double(), a.double(), b.double(), 0.5)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_kind", WEIGHTS)
def test_opcheck(weight_kind):
    """Schema, fake (meta) shapes, autograd registration and AOT dispatch of the custom ops."""
    x, w, state, _, bias, a, b = _make(5, 64, 24, 4, weight_kind, torch.float32)
    quant = QuantArgs.dense(w) if state is None else state.op_args()  # the one codec from a QuantState
    decoded = QuantState.from_op_args(*quant)
    assert decoded is None if state is None else decoded.op_args() == quant
    args = (x.clone().requires_grad_(), w, bias.clone().requires_grad_(), a.clone().requires_grad_(),
            b.clone().requires_grad_(), *quant, 2.0, 0.0, 0, "", "")  # fmt: skip
    torch.library.opcheck(torch.ops.fastlora.lora_linear, args)
    u = x.detach() @ a.detach().T
    bwd_args = (torch.randn(5, 24), x.detach(), w, a.detach(), b.detach(), u, *quant, 2.0, 0.0, 0, "", "", True)
    torch.library.opcheck(torch.ops.fastlora.lora_linear_backward, bwd_args)


@triton.jit
def _mask_kernel(out_ptr, M, N, key, threshold, BM: tl.constexpr, BN: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    kept = keep_mask(rm, rn, key, threshold)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], kept.to(tl.int8), mask=(rm < M)[:, None] & (rn < N)[None, :])


def test_dropout_mask_kernel_twin_is_bit_equal():
    """primitives.keep_mask (what the kernels regenerate in place) equals functional.dropout_keep_mask
    for every element, at odd shapes and seeds past 32 bits; rows and columns are independent draws."""
    for seed, p, (m, n) in [(0, 0.3, (37, 53)), (2**62 + 12345, 0.05, (17, 70)), (2**40, 0.5, (5, 3))]:
        out = torch.full((m, n), 7, dtype=torch.int8)
        _mask_kernel[(triton.cdiv(m, 16), triton.cdiv(n, 16))](out, m, n, seed32(seed), drop_threshold(p), BM=16, BN=16)
        assert torch.equal(out.bool(), dropout_keep_mask((m, n), p, seed, "cpu")), (seed, p)
    mask = dropout_keep_mask((400, 500), 0.25, 3, "cpu").float()
    se = (0.75 * 0.25 / 400) ** 0.5
    assert abs(mask.mean(0).std().item() - se) < 0.2 * se  # column rates scatter as independent draws
    assert abs(mask.mean().item() - 0.75) < 5 * (0.75 * 0.25 / mask.numel()) ** 0.5


@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("shape", [(5, 64, 37, 3), (19, 53, 48, 8)], ids=id_formatter("MKNr"))
def test_input_gradient_with_dropout_in_one_launch(shape, dtype, weight_kind):
    """lora_bwd_dx_triton(..., dropout_p, seed): dx = g W + d'(v A) with the mask of the (M, K) output positions
    regenerated in the kernel, against float64; odd shapes (K = 53: the general 4-bit path), poisoned output."""
    m, k, n, r = shape
    _, w, state, w_ref, _, a, _ = _make(m, k, n, r, weight_kind, dtype)
    g, v = torch.randn(m, n).to(dtype), torch.randn(m, r).to(dtype)
    a = a.to(dtype)
    for p, seed in [(0.1, 2**40 + 7), (0.5, 3)]:
        got = lora_bwd_dx_triton(g, w, state, v, a, dropout_p=p, seed=seed)
        ref = g.double() @ w_ref + apply_dropout(v.double() @ a.double(), p, seed)
        low = g @ w_ref.to(dtype) + apply_dropout(v @ a, p, seed)
        assert got.dtype == dtype and got.shape == (m, k)
        _check(f"dx p={p}", got, ref, low, dtype)
        # the mask acts: the dropped positions hold g W alone
        keep = dropout_keep_mask((m, k), p, seed, "cpu")
        base = g.double() @ w_ref
        assert rel_error(got.double()[~keep], base[~keep]) <= 2 * rel_error(low.double(), ref) + FLOOR[dtype]
    assert torch.equal(lora_bwd_dx_triton(g, w, state, v, a), lora_bwd_dx_triton(g, w, state, v, a, 0.0, 99))
