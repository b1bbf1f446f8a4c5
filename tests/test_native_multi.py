"""The native grouped decode GEMV (csrc/: fastlora.native.gemv_4bit_multi): a 4-bit base and every row's own
adapter from a pool in one kernel, y[m] = x[m] Wᵀ + b + s_i u[m] B_iᵀ with i = adapter_idx[m] (none for -1).

On the CPU kernel: against the float64 reference at odd shapes (K not a multiple of the block, rows starting
mid-byte, N odd), fp32/fp16/bf16, 1..16 rows, mixed slots, rows of the bare base, padded ranks; bit for bit
against one single-adapter GEMV per row; bad inputs; the reference fallback; torch.library's opcheck; the
"native" row of the lora_linear_multi table. The CUDA kernel's epilogue is compiled by test_native_build.py
(nvcc, no spills) and run on the CPU emulator by test_cuda_emulated.py's build of the same source.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers import DTYPES, FLOOR, id_formatter, rel_error

from fastlora import dispatch, native
from fastlora.native import loader
from fastlora.ops import lora_multi_native
from fastlora.quant import dequantize_4bit, quantize_4bit

pytestmark = pytest.mark.usefixtures("native_ext")  # every test here needs the extension built (conftest.py)

# (quant_type, blocksize, double_quant, K, N, bias): K odd (rows start mid-byte, straddle blocks), N odd
CASES = {
    "fp4-dq-K129-N33": ("fp4", 32, True, 129, 33, False),
    "nf4-K200-N45-bias": ("nf4", 64, False, 200, 45, True),
}


def _pool(n: int, k: int, ranks: list[int], dtype: torch.dtype):
    """pool_a (S, R, K), pool_b (S, N, R), scales (S,): slot i of rank ranks[i] zero-padded to R = max rank;
    a rank-0 entry is an empty slot (scale 0, zeros)."""
    r_max = max(ranks)
    pool_a, pool_b = torch.zeros(len(ranks), r_max, k), torch.zeros(len(ranks), n, r_max)
    scales = torch.zeros(len(ranks))
    for i, r in enumerate(ranks):
        if r:
            pool_a[i, :r] = torch.randn(r, k) / math.sqrt(k)
            pool_b[i, :, :r] = torch.randn(n, r) / math.sqrt(r)
            scales[i] = 2.0 / r
    return pool_a.to(dtype), pool_b.to(dtype), scales


def _case(m, dtype, case, ranks=(4, 1, 7, 0, 3), idx=None):
    qt, bs, dq, k, n, with_bias = CASES[case]
    packed, state = quantize_4bit((torch.randn(n, k) / math.sqrt(k)).to(dtype), qt, bs, dq, backend="torch")
    x = torch.randn(m, k).to(dtype)
    bias = (torch.randn(n) * 0.1).to(dtype) if with_bias else None
    pool_a, pool_b, scales = _pool(n, k, list(ranks), dtype)
    if idx is None:  # mixed slots with rows of the bare base: -1, 0, 1, ... cycling
        idx = torch.arange(m, dtype=torch.int32) % (len(ranks) + 1) - 1
    live = idx >= 0
    u = torch.einsum("mk,mrk->mr", x.float(), pool_a.float()[idx.clamp(min=0).long()])
    u = torch.where(live[:, None], u, 0.0).to(dtype)  # the op's u: zero rows for slot -1
    return x, packed, state, bias, u, pool_b, scales, idx


@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
def test_matches_float64_reference(dtype):
    """1..16 rows, mixed slots, rows of -1, ranks padded to the largest, an empty slot, odd shapes."""
    for case in CASES:
        for m in (1, 2, 5, 16):
            args = _case(m, dtype, case)
            y = native.gemv_4bit_multi(*args)
            x, packed, state, bias, u, pool_b, scales, idx = args
            assert y.shape == (m, state.shape[0]) and y.dtype == dtype
            ref = native.gemv_4bit_multi_ref(*args, compute_dtype=torch.float64).double()
            # PyTorch's own error in this dtype: W rounded to it, each row's term computed in it.
            w_dt = dequantize_4bit(packed, state, dtype, backend="torch")
            slot = idx.clamp(min=0).long()
            term = torch.einsum("mr,mnr->mn", u, pool_b[slot]) * scales[slot, None].to(dtype)
            own = torch.nn.functional.linear(x, w_dt, bias) + torch.where((idx >= 0)[:, None], term, 0.0).to(dtype)
            assert not torch.isnan(y).any(), (case, m)
            err, own_err = rel_error(y, ref), rel_error(own, ref)
            assert err <= 2 * own_err + FLOOR[dtype], (case, m, err, own_err)


def test_each_row_equals_its_own_single_adapter_gemv():
    """Row m of the grouped kernel is bit for bit the single-adapter GEMV of that row with its slot's B and
    scale (the same fp32 operations), and a row of -1 the bare base: the gathered epilogue changes nothing
    but which B a row reads. Also with all rows on one slot and with leading dims."""
    for dtype in (torch.float32, torch.bfloat16):
        x, packed, state, bias, u, pool_b, scales, idx = _case(9, dtype, "fp4-dq-K129-N33")
        y = native.gemv_4bit_multi(x, packed, state, bias, u, pool_b, scales, idx)
        for m in range(9):
            i = int(idx[m])
            lora = {} if i < 0 else {"lora_b": pool_b[i], "lora_u": u[m : m + 1], "scale": float(scales[i])}
            single = native.gemv_4bit(x[m : m + 1], packed, state, bias, **lora)
            assert torch.equal(y[m : m + 1], single), (dtype, m, i)
    x, packed, state, bias, u, pool_b, scales, _ = _case(6, torch.float32, "nf4-K200-N45-bias")
    one = torch.full((6,), 2, dtype=torch.int64)  # int64 indices are accepted (cast to int32)
    y = native.gemv_4bit_multi(x.view(2, 3, -1), packed, state, bias, u.view(2, 3, -1), pool_b, scales, one)
    single = native.gemv_4bit(x, packed, state, bias, lora_b=pool_b[2], lora_u=u, scale=float(scales[2]))
    assert y.shape == (2, 3, 45) and torch.equal(y.view(6, 45), single)


def test_no_adapter_rows_and_degenerate_pools():
    """All rows -1, a pool of rank 0 and a pool of no slots: the bare base, bit for bit."""
    x, packed, state, bias, u, pool_b, scales, _ = _case(4, torch.float16, "nf4-K200-N45-bias")
    base = native.gemv_4bit(x, packed, state, bias)
    none = torch.full((4,), -1, dtype=torch.int32)
    assert torch.equal(native.gemv_4bit_multi(x, packed, state, bias, u, pool_b, scales, none), base)
    r0 = native.gemv_4bit_multi(x, packed, state, bias, u[:, :0], pool_b[:, :, :0], scales, none + 1)
    assert torch.equal(r0, base)
    s0 = native.gemv_4bit_multi(x, packed, state, bias, u, pool_b[:0], scales[:0], none)
    assert torch.equal(s0, base)


def test_bad_inputs_raise_clear_errors():
    x, packed, state, bias, u, pool_b, scales, idx = _case(3, torch.float32, "fp4-dq-K129-N33")
    good = (x, packed, state, bias, u, pool_b, scales, idx)

    def call(**changes):
        names = ("x", "packed", "state", "bias", "u", "pool_b", "scales", "idx")
        args = dict(zip(names, good, strict=True)) | changes
        return native.gemv_4bit_multi(*args.values())

    cases = [
        ({"x": x.to(torch.int32)}, TypeError, "x must be a float32/float16/bfloat16"),
        ({"x": x[:, :100]}, ValueError, r"x must be \(\.\.\., 129\)"),
        ({"u": u.half()}, TypeError, "u must be torch.float32"),
        ({"pool_b": pool_b.bfloat16()}, TypeError, "pool_b must be torch.float32"),
        ({"scales": scales.double()}, TypeError, "scales must be float32"),
        ({"idx": idx.float()}, TypeError, "adapter_idx must be int32 or int64"),
        ({"pool_b": pool_b[:, :5]}, ValueError, r"pool_b must have shape \(S, 33, R\)"),
        ({"u": u[:, :2]}, ValueError, r"u must have shape \(3, 7\)"),
        ({"scales": scales[:2]}, ValueError, r"scales must have shape \(5,\)"),
        ({"idx": idx[:2]}, ValueError, r"adapter_idx must have shape \(3,\)"),
        ({"idx": torch.tensor([0, 5, 1], dtype=torch.int32)}, ValueError, r"adapter_idx\[1\] = 5 is not a slot"),
        ({"idx": torch.tensor([0, 1, -2])}, ValueError, r"adapter_idx\[2\] = -2 is not a slot"),
        ({"pool_b": pool_b.to("meta")}, ValueError, "pool_b is on meta"),
    ]
    for changes, error, message in cases:
        with pytest.raises(error, match=message):
            call(**changes)
    # The binding checks on its own (the raw op, without the Python checks), the index values too.
    native.loader.ops(torch.device("cpu"), "checks")
    qs = (state.absmax, state.code, state.nested.absmax, state.nested.code, state.nested.offset, state.blocksize)
    op = torch.ops.fastlora.gemv_4bit_multi_native
    with pytest.raises(ValueError, match=r"adapter_idx\[0\] = 7 is not a slot of the pool"):
        op(x, packed.view(-1), *qs, 33, None, u, pool_b, scales, torch.tensor([7, 0, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="adapter_idx must be Int"):
        op(x, packed.view(-1), *qs, 33, None, u, pool_b, scales, idx.long())
    with pytest.raises(ValueError, match=r"lora_u must have shape \(3, 7\)"):
        op(x, packed.view(-1), *qs, 33, None, u[:, :3].contiguous(), pool_b, scales, idx)


def test_reference_fallback_without_the_kernel(monkeypatch, caplog):
    """An extension built before this kernel (no gemv_4bit_multi_native): the fp32 reference, one warning."""

    class _Old:  # torch.ops.fastlora of an older build: no such op
        pass

    monkeypatch.setattr(loader, "ops", lambda device, what: _Old())
    loader._warn_once.cache_clear()
    args = _case(3, torch.float32, "nf4-K200-N45-bias")
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        y = native.gemv_4bit_multi(*args)
        native.gemv_4bit_multi(*args)
    warnings = [r for r in caplog.records if "gemv_4bit_multi_native" in r.getMessage()]
    assert len(warnings) == 1
    assert torch.equal(y, native.gemv_4bit_multi_ref(*args))


def test_opcheck():
    """Schema, fake (meta) implementation and AOT-dispatch checks of torch.library."""
    x, packed, state, _, u, pool_b, scales, idx = _case(3, torch.float32, "fp4-dq-K129-N33")
    qs = (state.absmax, state.code, state.nested.absmax, state.nested.code, state.nested.offset, state.blocksize)
    native.loader.ops(torch.device("cpu"), "opcheck")  # sync the test poisoning into the extension
    args = (x, packed.view(-1), *qs, 33, torch.randn(33), u, pool_b, scales, idx)
    torch.library.opcheck(torch.ops.fastlora.gemv_4bit_multi_native.default, args)


def test_dispatch_row():
    """The "native" row of lora_linear_multi: the default on CPU and CUDA for a 4-bit weight at decode
    sizes (where the extension has the kernels), not for a dense weight or more than MAX_DECODE_M rows."""
    impl = dispatch.table("lora_linear_multi")["native"]
    assert impl.fn is lora_multi_native._fwd_native and impl.default_on == ("cpu", "cuda")
    cpu = torch.device("cpu")
    assert impl.unmet(cpu, {"m": native.MAX_DECODE_M, "quantized": True}) is None
    assert "4-bit" in impl.unmet(cpu, {"m": 1, "quantized": False})
    assert "at most" in impl.unmet(cpu, {"m": native.MAX_DECODE_M + 1, "quantized": True})
    assert dispatch.choose("lora_linear_multi", cpu, m=4, quantized=True).backend == "native"
    args = _case(5, torch.bfloat16, "fp4-dq-K129-N33")
    assert torch.equal(impl.fn(*args, "fused"), native.gemv_4bit_multi(*args))


def test_lora_linear_multi_decode_runs_the_native_row(monkeypatch):
    """fastlora.ops.lora_multi's op at decode sizes on a 4-bit CPU weight runs this kernel (one call) and
    matches the float64 reference; larger M does not."""
    lora_multi = pytest.importorskip("fastlora.ops.lora_multi")
    calls = []
    real = native.gemv_4bit_multi
    monkeypatch.setattr(native, "gemv_4bit_multi", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, packed, state, bias, u, pool_b, scales, idx = _case(4, torch.float32, "nf4-K200-N45-bias")
    pool_a, _, _ = _pool(45, 200, [4, 1, 7, 0, 3], torch.float32)
    pool_a = torch.randn_like(pool_a) * (pool_a != 0)
    y = lora_multi.lora_linear_multi(x, packed, bias, pool_a, pool_b, scales, idx, quant_state=state)
    assert len(calls) == 1
    slot = idx.clamp(min=0).long()
    u = torch.where((idx >= 0)[:, None], torch.einsum("mk,mrk->mr", x.double(), pool_a.double()[slot]), 0.0)
    ref = native.gemv_4bit_multi_ref(x.double(), packed, state, bias.double(), u, pool_b.double(), scales, idx,
                                     compute_dtype=torch.float64)  # fmt: skip
    assert rel_error(y, ref) <= FLOOR[torch.float32]
