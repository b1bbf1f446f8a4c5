"""The grouped LoRA op (fastlora.ops.lora_group) and the GLU epilogue (fastlora.kernels.glu) against their
float64 references: every output and gradient, odd shapes, dense and NF4 members, mixed ranks, dropout, a
member without an adapter, both backends and both Triton paths (the stacked scratch GEMM and the fused kernel).
"""

import pytest
import torch
from helpers import DTYPES, FLOOR, id_formatter, rel_error

from fastlora.kernels import glu, glu_ref
from fastlora.ops.lora_group import GroupMember, lora_group
from fastlora.ops.lora_group_ref import lora_group_ref
from fastlora.quant import quantize_4bit

M, K = 13, 72  # odd rows; K not a multiple of the 64-value 4-bit block


def _member(n, r, quant, p, bias, dtype, seed):
    w = torch.randn(n, K) * 0.2
    state = None
    if quant:
        w, state = quantize_4bit(w.to(dtype), quant, 64, True)
    else:
        w = w.to(dtype)
    a = (torch.randn(r, K) * 0.2).to(dtype).requires_grad_() if r else None
    b = (torch.randn(n, r) * 0.2).to(dtype).requires_grad_() if r else None
    return GroupMember(w, torch.randn(n).to(dtype) if bias else None, a, b, 1.5 / max(r, 1), state, p, seed)


def _as(m, dtype):
    """The member in ``dtype`` (a 4-bit W stays packed), fresh leaves for the LoRA factors."""
    leaf = lambda t: None if t is None else t.detach().to(dtype).requires_grad_()  # noqa: E731
    weight = m.weight if m.quant_state is not None else m.weight.to(dtype)
    return m._replace(weight=weight, bias=None if m.bias is None else m.bias.to(dtype), lora_a=leaf(m.lora_a),
                      lora_b=leaf(m.lora_b))  # fmt: skip


def _run(fn, x, members, act):
    x = x.detach().requires_grad_()
    out = fn(x, members, act)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    res = [*outs, x.grad]
    for m in members:
        if m.lora_a is not None:
            res += [m.lora_a.grad, m.lora_b.grad]
    return res


def _compare(members, act, dtype, backend, path):
    x = torch.randn(M, K).to(dtype)
    got = _run(lambda x, ms, a: lora_group(x, ms, act=a, backend=backend, path=path), x,
               [_as(m, dtype) for m in members], act)  # fmt: skip
    ref = _run(lora_group_ref, x.double(), [_as(m, torch.float64) for m in members], act)
    own = _run(lora_group_ref, x, [_as(m, dtype) for m in members], act)  # PyTorch's own error in this dtype
    assert len(got) == len(ref)
    for i, (g, r, o) in enumerate(zip(got, ref, own, strict=True)):
        assert torch.isfinite(g).all(), i
        bound = 2 * rel_error(o, r) + FLOOR[dtype]
        assert rel_error(g, r) <= bound, (i, rel_error(g, r), bound)


CASES = [("torch", None), ("triton", "dequant_gemm"), ("triton", "fused")]


@pytest.mark.parametrize(("backend", "path"), CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_qkv_group_matches_reference(backend, path):
    """q: NF4, r=4, bias; k: NF4 without an adapter; v: dense, r=3, dropout (its own mask); w: NF4 r=1 dropout."""
    members = [
        _member(24, 4, "nf4", 0.0, True, torch.float32, 1),
        _member(16, 0, "nf4", 0.0, False, torch.float32, 2),
        _member(17, 3, None, 0.25, True, torch.float32, 3),
        _member(8, 1, "fp4", 0.1, False, torch.float32, 4),
    ]
    _compare(members, None, torch.float32, backend, path)


GATED = [("torch", None, "silu"), ("triton", "dequant_gemm", "gelu_tanh"), ("triton", "fused", "gelu")]


@pytest.mark.parametrize(("backend", "path", "act"), GATED, ids=[f"{b}-{p}-{a}" for b, p, a in GATED])
def test_gated_group_matches_reference(backend, path, act):
    """gate: NF4 r=4 with dropout; up: dense r=2: h = act(gate)·up, every gradient through the epilogue."""
    members = [_member(40, 4, "nf4", 0.2, False, torch.float32, 5), _member(40, 2, None, 0.0, True, torch.float32, 6)]
    _compare(members, act, torch.float32, backend, path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=id_formatter("dtype"))
def test_half_dtypes_on_the_stacked_path(dtype):
    members = [_member(24, 4, "nf4", 0.0, False, dtype, 1), _member(24, 2, "nf4", 0.0, False, dtype, 2)]
    _compare(members, "silu", dtype, "triton", "dequant_gemm")


@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_glu_kernel_matches_reference(act, dtype):
    pre, dh = torch.randn(5, 2 * 37).to(dtype), torch.randn(5, 37).to(dtype)
    h, g = glu.glu_forward(pre, act), glu.glu_backward(dh, pre, act)
    h_ref, g_ref = glu_ref.glu_forward(pre.double(), act), glu_ref.glu_backward(dh.double(), pre.double(), act)
    h_own, g_own = glu_ref.glu_forward(pre, act), glu_ref.glu_backward(dh, pre, act)
    for got, ref, own in ((h, h_ref, h_own), (g, g_ref, g_own)):
        assert rel_error(got, ref) <= 2 * rel_error(own, ref) + FLOOR[dtype]
    # the backward is the derivative of the forward
    p64 = pre.double().requires_grad_()
    glu_ref.glu_forward(p64, act).backward(dh.double())
    torch.testing.assert_close(glu_ref.glu_backward(dh.double(), pre.double(), act), p64.grad)


def test_outputs_are_views_of_one_stacked_tensor_and_checks():
    members = [_member(8, 2, None, 0.0, False, torch.float32, 1), _member(5, 0, None, 0.0, False, torch.float32, 2)]
    x = torch.randn(2, 3, K)
    q, k = lora_group(x, members)
    assert q.shape == (2, 3, 8) and k.shape == (2, 3, 5)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="act takes two members"):
        lora_group(x, members, act="silu")
    with pytest.raises(ValueError, match="in_features"):
        lora_group(torch.randn(3, K + 1), members)
    with pytest.raises(ValueError, match="unknown activation"):
        lora_group(x, members[:1] * 2, act="tanh")


def test_opcheck():
    members = [_member(8, 2, "nf4", 0.0, True, torch.float32, 1), _member(8, 3, None, 0.0, False, torch.float32, 2)]
    x = torch.randn(4, K, requires_grad=True)
    from fastlora.ops.lora_group_paths import DTYPES as CODES

    args = (x, [m.weight for m in members], [m.bias for m in members], [m.lora_a for m in members],
            [m.lora_b for m in members], [members[0].quant_state.absmax, None],
            [members[0].quant_state.nested.absmax, None], [members[0].quant_state.nested.code, None], [1, 0],
            [64, 0], [8, K, 8, K], [CODES.index(torch.float32)] * 2,
            [float(members[0].quant_state.nested.offset), 0.0], [0.5, 2.0], [0.0, 0.0], [0, 0], "silu", "torch",
            "")  # fmt: skip
    torch.library.opcheck(torch.ops.fastlora.lora_group.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))  # fmt: skip


def test_native_decode_row():
    """4-bit members at decode size on a CPU: the native GEMV per member (the default where the extension is built)."""
    from fastlora import dispatch, native
    from fastlora.ops.lora_group_paths import OP_GROUP

    if not native.is_built():
        pytest.skip("the native extension is not built")
    assert dispatch.choose(OP_GROUP, "cpu", None, m=3, quantized=True).backend == "native"
    members = [_member(24, 4, "nf4", 0.0, True, torch.float32, 1), _member(16, 0, "nf4", 0.0, False, torch.float32, 2)]
    x = torch.randn(3, K)
    got = _run(lambda x, ms, a: lora_group(x, ms), x, [_as(m, torch.float32) for m in members], None)
    ref = _run(lora_group_ref, x.double(), [_as(m, torch.float64) for m in members], None)
    for g, r in zip(got, ref, strict=True):
        assert rel_error(g, r) <= FLOOR[torch.float32]
