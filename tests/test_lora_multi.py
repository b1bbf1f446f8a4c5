"""The mixed-adapter LoRA op (fastlora.ops.lora_multi) and its grouped kernels against a float64 row-by-row
reference: odd shapes, 1-row and empty segments, all rows one slot, rows on the bare base (-1), different ranks
in one pool, dense and NF4, every gradient, per-slot dropout."""

import pytest
import torch
from helpers import FLOOR, rel_error

from fastlora import lora_linear_multi
from fastlora.functional import dropout_keep_mask
from fastlora.kernels.lora_multi_ref import keep_rows, lora_linear_multi_ref, thresholds
from fastlora.quant import dequantize_4bit, quantize_4bit

# (M, K, N, S, R, idx pattern); K=53 (odd, blocks across rows: the general 4-bit path), K=64 aligned
CASES = {
    "mixed": (9, 64, 37, 5, 6, [3, 0, -1, 3, 3, 1, 0, -1, 3]),  # slot 2 and 4 empty, 1-row segment (1)
    "one-slot": (17, 53, 45, 3, 16, [1] * 17),
    "decode": (5, 64, 70, 8, 8, [7, 2, -1, 5, 0]),
    "all-base": (3, 53, 20, 2, 4, [-1, -1, -1]),
    # 33 rows (segment-grouped): slot 0 one row, slots 2 and 4 empty, base rows, interleaved
    "segments": (
        33,
        64,
        29,
        6,
        8,
        [5, 3, -1, 5, 1, 3, 3, 5, 0, 1, 5, 3, -1, 3, 5, 1, 3, 3, 5, 1, 3, 5, 3, -1, 5, 1, 3, 5, 3, 1, 3, 5, 3],
    ),
}


def _pool(s, r, k, n, ranks):
    """A padded pool: slot i of rank ranks[i] (zeros beyond it), one empty slot (rank 0, scale 0)."""
    pool_a = torch.zeros(s, r, k)
    pool_b = torch.zeros(s, n, r)
    scales = torch.zeros(s)
    for i, ri in enumerate(ranks):
        pool_a[i, :ri] = torch.randn(ri, k) / k**0.5
        pool_b[i, :, :ri] = torch.randn(n, ri) / max(ri, 1) ** 0.5
        scales[i] = 2.0 / max(ri, 1) ** 0.5 if ri else 0.0
    return pool_a, pool_b, scales


def _make(case, weight_kind, dtype):
    m, k, n, s, r, idx = CASES[case]
    ranks = [r - (i % 3) if i % 4 != 2 else 0 for i in range(s)]  # different ranks; slot 2 empty
    w = torch.randn(n, k) / k**0.5
    state, stored, w_ref = None, w.to(dtype), w.to(dtype).double()
    if weight_kind == "nf4":
        stored, state = quantize_4bit(w.to(dtype), "nf4", 64 if k % 64 == 0 else 32, False)
        w_ref = dequantize_4bit(stored, state, torch.float32).double()  # kernel error, not quantisation error
    pool_a, pool_b, scales = _pool(s, r, k, n, ranks)
    x = torch.randn(m, k)
    bias = torch.randn(n) * 0.1
    return x, stored, state, w_ref, bias, pool_a, pool_b, scales, torch.tensor(idx, dtype=torch.int32)


def _run_and_check(case, weight_kind, dtype, backend, dropout, monkeypatch, path=None):
    x, w, state, w_ref, bias, pool_a, pool_b, scales, idx = _make(case, weight_kind, dtype)
    p = torch.tensor([0.1, 0.5, 0.0, 0.25, 0.3, 0.0, 0.2, 0.4][: scales.shape[0]]) if dropout else None
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    leaves = [t.to(dtype).clone().requires_grad_() for t in (x, bias, pool_a, pool_b)]
    y = lora_linear_multi(leaves[0], w, leaves[1], leaves[2], leaves[3], scales, idx, quant_state=state, dropout_p=p,
                          seed=11, path=path)  # fmt: skip
    g = torch.randn_like(y)
    y.backward(g)

    def reference(cast):
        ls = [t.detach().to(dtype).to(cast).requires_grad_() for t in (x, bias, pool_a, pool_b)]
        out = lora_linear_multi_ref(ls[0], w_ref.to(cast), ls[1], ls[2], ls[3], scales.to(cast), idx, p, 11)
        out.backward(g.to(cast))
        for t in ls:  # a pool no row uses (every row on the base) gets no gradient from the loop: zero
            t.grad = torch.zeros_like(t) if t.grad is None else t.grad
        return out, ls

    ref, ref_leaves = reference(torch.float64)
    low, low_leaves = reference(dtype)
    assert y.dtype == dtype and y.shape == ref.shape
    pairs = [("y", y, ref, low)] + [
        (name, got.grad, want.grad, own.grad)
        for name, got, want, own in zip(("dx", "db", "dA", "dB"), leaves, ref_leaves, low_leaves, strict=True)
    ]
    for name, got, want, own in pairs:
        assert got is not None and got.dtype == dtype and got.shape == want.shape, name
        assert not torch.isnan(got).any(), f"{name}: NaN (an output left unwritten?)"
        err, base, floor = rel_error(got, want), rel_error(own, want), FLOOR.get(dtype, 1e-12)
        assert err <= 2 * base + floor, f"{name}: rel error {err:.2e} > 2 x torch's {base:.2e} + {floor}"
    # unused slots (no rows) and rank padding get exactly zero gradient
    used = set(idx[idx >= 0].tolist())
    for i in range(scales.shape[0]):
        if i not in used:
            assert not leaves[2].grad[i].any() and not leaves[3].grad[i].any(), f"slot {i} has no rows"


@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "drop"])
@pytest.mark.parametrize("weight_kind", ["dense", "nf4"])
@pytest.mark.parametrize("case", ["mixed", "one-slot", "all-base", "segments"])
def test_torch_row_matches_row_by_row_reference(case, weight_kind, dropout, monkeypatch):
    _run_and_check(case, weight_kind, torch.float64 if weight_kind == "dense" else torch.float32, "torch", dropout,
                   monkeypatch)  # fmt: skip


# The Triton row under the interpreter: gathered u (M <= 16) and segment-grouped u (M = 17, 33); the fused
# one-launch forward (aligned and general 4-bit, dense) and the scratch + GEMM path; one dtype sweep.
TRITON_CASES = [
    ("mixed", "nf4", torch.float32, True, None),
    ("mixed", "dense", torch.bfloat16, False, None),
    ("decode", "nf4", torch.float16, False, "fused"),
    ("one-slot", "nf4", torch.float32, False, "fused"),
    ("all-base", "dense", torch.float32, False, None),
    ("segments", "nf4", torch.float32, True, "dequant_gemm"),
    ("segments", "dense", torch.float16, True, "fused"),
    ("segments", "nf4", torch.bfloat16, False, "dequant_gemm"),
]


@pytest.mark.parametrize(
    ("case", "weight_kind", "dtype", "dropout", "path"),
    TRITON_CASES,
    ids=[f"{c}-{w}-{str(d)[6:]}-{'drop' if p else 'nodrop'}-{x}" for c, w, d, p, x in TRITON_CASES],
)
def test_triton_row_matches_float64_reference(case, weight_kind, dtype, dropout, path, monkeypatch):
    _run_and_check(case, weight_kind, dtype, "triton", dropout, monkeypatch, path=path)


def test_cpu_default_decode_row_matches_float64_reference(monkeypatch):
    """The CPU default for a 4-bit decode batch (the native grouped GEMV when the extension is built)."""
    _run_and_check("decode", "nf4", torch.float32, "", True, monkeypatch)


def test_grouped_grads_split_segments_match_float64_reference():
    """dA, dB with each segment split in parts (fp32 planes summed in order: M > 64 rows a slot here), and v."""
    from fastlora.kernels import lora_multi, lora_multi_ref

    m, k, n, s, r = 150, 40, 24, 2, 36  # parts = cdiv(M, S·4·BM) = 2 (interpreter BM = 16); r tiles of 32: 2
    g, x, u = torch.randn(m, n), torch.randn(m, k), torch.randn(m, r)
    pool_a, pool_b, scales = torch.randn(s, r, k), torch.randn(s, n, r), torch.rand(s)
    idx = torch.randint(-1, 1, (m,), dtype=torch.int32)  # slot 1 empty
    p = torch.tensor([0.2, 0.5])
    got = lora_multi.multi_grads(g, x, pool_a, pool_b, u, scales, idx, p, 7)
    want = lora_multi_ref.multi_grads(*(t.double() for t in (g, x, pool_a, pool_b, u)), scales, idx, p, 7)
    for name, a, b in zip(("v", "dA", "dB"), got, want, strict=True):
        assert rel_error(a, b) < 1e-5, name
    assert not got[1][1].any() and not got[2][1].any()
    again = lora_multi.multi_grads(g, x, pool_a, pool_b, u, scales, idx, p, 7)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True)), "not reproducible"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_rows(backend, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    x = torch.randn(0, 16, requires_grad=True)
    pa, pb = torch.randn(4, 8, 16, requires_grad=True), torch.randn(4, 12, 8, requires_grad=True)
    y = lora_linear_multi(x, torch.randn(12, 16), None, pa, pb, torch.rand(4), torch.zeros(0, dtype=torch.int32))
    y.sum().backward()
    assert y.shape == (0, 12) and not pa.grad.any() and not pb.grad.any() and x.grad.shape == (0, 16)


def test_per_row_mask_is_the_single_adapter_mask():
    """Row m of slot i keeps exactly where dropout_keep_mask at p_i keeps (the same counter-based hash)."""
    p = torch.tensor([0.1, 0.5, 0.3])
    idx = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    thr, _ = thresholds(p)
    got = keep_rows((7, 29), thr[idx.long()], 123, torch.device("cpu"))
    for i in range(3):
        want = dropout_keep_mask((7, 29), float(p[i]), 123, "cpu")
        assert torch.equal(got[idx == i], want[idx == i])


def test_bad_inputs_raise_naming_what_was_expected():
    x = torch.randn(4, 8)
    w = torch.randn(6, 8)
    pa, pb, sc = torch.randn(3, 2, 8), torch.randn(3, 6, 2), torch.ones(3)
    idx = torch.tensor([0, 1, 2, -1])
    lora_linear_multi(x, w, None, pa, pb, sc, idx)  # fine
    cases = [
        (dict(adapter_idx=torch.tensor([0, 1, 3, -1])), ValueError, r"\[-1, 3\)"),
        (dict(adapter_idx=torch.tensor([0, -2, 1, 1])), ValueError, "adapter_idx values"),
        (dict(adapter_idx=torch.tensor([0, 1, 2])), ValueError, r"\(4,\) int32/int64"),
        (dict(adapter_idx=idx.float()), ValueError, "int32/int64"),
        (dict(pool_b=torch.randn(3, 5, 2)), ValueError, r"pool_b must be \(S, N, R\)"),
        (dict(pool_a=torch.randn(3, 2, 7)), ValueError, "x has K = 8"),
        (dict(pool_a=torch.randn(2, 8)), ValueError, r"pool_a must be \(S, R, K\)"),
        (dict(scales=torch.ones(3, dtype=torch.float64)), ValueError, "float32"),
        (dict(scales=torch.ones(2)), ValueError, r"\(3,\) float32"),
        (dict(pool_a=pa.half()), TypeError, "pool_a must be in x's dtype"),
        (dict(dropout_p=torch.tensor([0.1, 1.0, 0.0])), ValueError, r"\[0, 1\)"),
    ]
    base = dict(adapter_idx=idx, pool_a=pa, pool_b=pb, scales=sc, dropout_p=None)
    for change, error, match in cases:
        a = {**base, **change}
        with pytest.raises(error, match=match):
            lora_linear_multi(x, w, None, a["pool_a"], a["pool_b"], a["scales"], a["adapter_idx"],
                              dropout_p=a["dropout_p"])  # fmt: skip


def test_compiles_fullgraph_without_graph_breaks():
    import torch._dynamo

    x = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.randn(12, 16)
    pa = torch.randn(4, 8, 16, requires_grad=True)
    pb = torch.randn(4, 12, 8, requires_grad=True)
    sc = torch.rand(4)
    idx = torch.tensor([1, 1, 1, -1, 3, 3], dtype=torch.int32)

    def f(x, pa, pb, idx):
        return lora_linear_multi(x, w, None, pa, pb, sc, idx, dropout_p=torch.full((4,), 0.1), seed=3).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, pa, pb, idx)
    got.backward()
    grads = [t.grad.clone() for t in (x, pa, pb)]
    for t in (x, pa, pb):
        t.grad = None
    want = f(x, pa, pb, idx)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, (x.grad, pa.grad, pb.grad), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", ["mixed", "segments", "all-base"])
def test_cpu_segment_row_equals_the_reference(case):
    """The CPU torch row (a loop over the slots present: one adapter's FLOPs) equals the sync-free reference in
    float64, dropout included: every product, slots without rows and rank padding exactly zero."""
    from fastlora.kernels import lora_multi_ref, lora_multi_seg

    m, k, n, s, r, rows = CASES[case]
    idx = torch.tensor(rows, dtype=torch.int32)
    pool_a, pool_b, scales = (
        t.double() for t in _pool(s, r, k, n, [r - (i % 3) if i % 4 != 2 else 0 for i in range(s)])
    )
    x, g, u, v = torch.randn(m, k, dtype=torch.float64), torch.randn(m, n, dtype=torch.float64), None, None
    p = torch.tensor([0.1, 0.5, 0.0, 0.25, 0.3, 0.0][:s])
    u = lora_multi_seg.multi_down(x, pool_a, idx, p, 3)
    torch.testing.assert_close(u, lora_multi_ref.multi_down(x, pool_a, idx, p, 3), rtol=1e-12, atol=1e-12)
    bias = torch.randn(n, dtype=torch.float64)
    up = lora_multi_seg.multi_up(u, pool_b, scales, idx, bias)
    torch.testing.assert_close(up, lora_multi_ref.multi_up(u, pool_b, scales, idx, bias), rtol=1e-12, atol=1e-12)
    got = lora_multi_seg.multi_grads(g, x, pool_a, pool_b, u, scales, idx, p, 3)
    want = lora_multi_ref.multi_grads(g, x, pool_a, pool_b, u, scales, idx, p, 3)
    for name, a, b in zip(("v", "dA", "dB"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    v = got[0]
    dx = lora_multi_seg.multi_dx_term(v, pool_a, idx, p, 3)
    torch.testing.assert_close(dx, lora_multi_ref.multi_dx_term(v, pool_a, idx, p, 3), rtol=1e-12, atol=1e-12)
    empty = [i for i in range(s) if i not in set(rows)]
    assert all(not got[1][i].any() and not got[2][i].any() for i in empty)
