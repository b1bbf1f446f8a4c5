"""The size dispatch of the LoRA linear: both paths (fused, dequant_gemm) against the float64 reference,
forward and every gradient, and :func:`fastlora.plan`, the query that says which path runs and why.

The training-size path runs here on the CPU exactly as on the GPU but for its GEMMs: the Triton
dequantisation and low-rank kernels under the interpreter, the GEMMs through torch.
"""

import pytest
import torch
from helpers import DTYPES, FLOOR, id_formatter, rel_error
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora import native
from fastlora.kernels.lora_ref import lora_linear_ref
from fastlora.ops import crossover_table, lora_paths, scratch
from fastlora.ops import planner as plan_mod
from fastlora.quant import dequantize_4bit, quantize_4bit

WEIGHTS = ["dense", "nf4", "fp4-dq"]


def _make(m, k, n, r, weight_kind, dtype):
    w = torch.randn(n, k) / k**0.5
    state, stored = None, w.to(dtype)
    w_ref = stored.double()
    if weight_kind != "dense":
        stored, state = quantize_4bit(w.to(dtype), weight_kind[:3], 64, weight_kind.endswith("dq"))
        w_ref = dequantize_4bit(stored, state, torch.float32).double()
    leaves = [torch.randn(m, k), torch.randn(n) * 0.1, torch.randn(r, k) / k**0.5, torch.randn(n, r) / r**0.5]
    return stored, state, w_ref, leaves


def _check(name, got, ref, own, dtype):
    err, base = rel_error(got, ref), rel_error(own, ref)
    assert not torch.isnan(got).any(), f"{name}: NaN (an output left unwritten?)"
    assert err <= 2 * base + FLOOR[dtype], f"{name}: rel error {err:.2e} > 2 x torch's {base:.2e} + {FLOOR[dtype]}"


def _compare(m, k, n, r, weight_kind, dtype, p, *, backend, path):
    w, state, w_ref, leaves = _make(m, k, n, r, weight_kind, dtype)
    seed, scale = 1234, 1.75
    got = [t.detach().to(dtype).clone().requires_grad_() for t in leaves]
    y = fastlora.lora_linear(got[0], w, got[1], got[2], got[3], scale, quant_state=state, dropout_p=p, seed=seed,
                             backend=backend, path=path)  # fmt: skip
    g = torch.randn_like(y)
    y.backward(g)
    ref = [t.detach().to(dtype).double().requires_grad_() for t in leaves]
    y_ref = lora_linear_ref(ref[0], w_ref, ref[1], ref[2], ref[3], scale, p, seed)
    y_ref.backward(g.double())
    own = [t.detach().to(dtype).clone().requires_grad_() for t in leaves]
    y_own = lora_linear_ref(own[0], w_ref.to(dtype), own[1], own[2], own[3], scale, p, seed)
    y_own.backward(g)
    assert y.dtype == dtype and y.shape == (m, n)
    _check("y", y, y_ref, y_own, dtype)
    for name, a, b, c in zip(("dx", "dbias", "dA", "dB"), got, ref, own, strict=True):
        _check(name, a.grad, b.grad, c.grad, dtype)


SHAPES = [(1, 128, 96, 8), (33, 192, 83, 16), (130, 64, 45, 3)]  # M: one row to more than a tile; odd N and r
# fp32: every weight kind with and without dropout at the first two shapes; the 130-row shape (3 row tiles, the
# slowest under the interpreter) once per weight kind, dropout alternating. fp16/bf16: dense and nf4 at the 33-row
# shape, each dropout setting once per dtype and per kind.
CASES = [(shape, torch.float32, kind, p) for shape in SHAPES[:2] for kind in WEIGHTS for p in (0.0, 0.1)]
CASES += [(SHAPES[2], torch.float32, kind, (0.1, 0.0, 0.1)[i]) for i, kind in enumerate(WEIGHTS)]
CASES += [(SHAPES[1], dtype, kind, (0.0, 0.1)[(i + j) % 2]) for i, dtype in enumerate(DTYPES[1:])
          for j, kind in enumerate(("dense", "nf4"))]  # fmt: skip


@pytest.mark.parametrize(("shape", "dtype", "weight_kind", "p"), CASES, ids=str)
def test_dequant_gemm_path_matches_float64_reference(shape, dtype, weight_kind, p):
    """The training path at every M, dense and 4-bit, every dtype, with and without dropout."""
    _compare(*shape, weight_kind, dtype, p, backend="triton", path="dequant_gemm")


@pytest.mark.parametrize("weight_kind", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=id_formatter("dtype"))
def test_fused_path_with_dropout_matches_float64_reference(dtype, weight_kind):
    """The fused path keeps dropout on (dx's d'(v A) regenerated in its launch)."""
    _compare(17, 128, 40, 8, weight_kind, dtype, 0.1, backend="triton", path="fused")


@pytest.mark.parametrize("weight_kind", ["dense", "nf4"])
def test_reference_backend_with_dropout(weight_kind):
    _compare(9, 64, 24, 4, weight_kind, torch.float32, 0.2, backend="torch", path=None)


def test_layers_share_the_scratch_and_backward_redequantises():
    """Two 4-bit layers in a row on the training path: the second one's forward reuses the scratch the first
    one dequantised into, and the first one's backward (run after it) is still exact: it dequantises again."""
    torch.manual_seed(0)
    w1, s1, r1, l1 = _make(40, 128, 128, 8, "nf4", torch.float32)
    w2, s2, r2, l2 = _make(40, 128, 64, 8, "nf4", torch.float32)
    seen = []
    real = scratch.dequantized_weight

    def spy(weight, state, dtype, **kw):
        out = real(weight, state, dtype, **kw)
        seen.append(out.untyped_storage().data_ptr())
        return out

    leaves = [t.requires_grad_() for t in (*l1[1:], *l2[1:])]
    x = l1[0].requires_grad_()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scratch, "dequantized_weight", spy)
        h = fastlora.lora_linear(x, w1, leaves[0], leaves[1], leaves[2], 2.0, quant_state=s1, backend="triton",
                                 path="dequant_gemm")  # fmt: skip
        y = fastlora.lora_linear(h, w2, leaves[3], leaves[4], leaves[5], 2.0, quant_state=s2, backend="triton",
                                 path="dequant_gemm")  # fmt: skip
        y.square().sum().backward()
    assert len(seen) == 4 and len(set(seen)) == 1, "every dequantisation goes into the one shared scratch"
    ref = [t.detach().double().requires_grad_() for t in (x, *leaves)]
    h_ref = lora_linear_ref(ref[0], r1, ref[1], ref[2], ref[3], 2.0)
    lora_linear_ref(h_ref, r2, ref[4], ref[5], ref[6], 2.0).square().sum().backward()
    for got, want in zip((x, *leaves), ref, strict=True):
        assert rel_error(got.grad, want.grad) < 1e-5


class _NewBuffers(TorchDispatchMode):
    """Records the shapes of the tensors every aten op returns that are not views or in-place results."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inplace = func._schema.name.endswith("_") or any(a.alias_info and a.alias_info.is_write
                                                         for a in func._schema.arguments)  # fmt: skip
        if isinstance(out, torch.Tensor) and not inplace and not func.is_view:
            self.shapes.append(tuple(out.shape))
        return out


def test_training_path_writes_one_mn_buffer_outside_its_gemm():
    """Forward: the only [M, N] tensor made outside the GEMM is C (s·u Bᵀ + b), which the GEMM then accumulates
    into in place and returns as y; unsloth's path writes y and then reads and writes it again (addmm_)."""
    m, k, n = 48, 128, 96
    w, state, _, (x, bias, a, b) = _make(m, k, n, 8, "nf4", torch.float32)
    u = x @ a.T
    with _NewBuffers() as mode:
        y = lora_paths.forward(x, w, state, bias, u, b, 2.0, backend="triton")
    assert mode.shapes.count((m, n)) == 1, mode.shapes
    assert y.shape == (m, n)


# -- the query ------------------------------------------------------------------------------------------------


def test_plan_small_m_fused_training_m_dequant_gemm():
    cross = plan_mod.crossover(4096, 4096, "nf4", torch.bfloat16)
    assert cross.row is not None and 1 <= cross.fwd_max_m < 4096 and 1 <= cross.dx_max_m < 4096
    for m, want in [(1, "fused"), (cross.fwd_max_m, "fused"), (cross.fwd_max_m + 1, "dequant_gemm"),
                    (4096, "dequant_gemm"), (8192, "dequant_gemm")]:  # fmt: skip
        p = fastlora.plan(m, 4096, 4096, 16, dtype=torch.bfloat16, quant="nf4", device="cuda")
        assert p.forward.path == want, str(p)
        if m <= native.MAX_DECODE_M and native.unavailable_reason("cuda") is None:
            assert p.forward.backend == "native"  # the CUDA decode GEMV, where the extension has it
        else:
            assert p.forward.backend == "triton" and str(cross.fwd_max_m) in p.forward.reason
    p = fastlora.plan(8192, 4096, 14336, 16, quant="nf4", device="cuda", dropout_p=0.05)
    assert p.input_grad.path == "dequant_gemm" and p.lora_grads.backend == "triton"
    assert "one pass over g" in p.lora_grads.how and "why:" in str(p)


def test_plan_override_by_argument_and_environment(monkeypatch):
    assert fastlora.plan(8192, 4096, 4096, device="cuda", path="fused").forward.path == "fused"
    monkeypatch.setenv("FASTLORA_PATH", "dequant_gemm")
    p = fastlora.plan(1, 4096, 4096, device="cuda")
    assert p.forward.path == p.input_grad.path == "dequant_gemm" and "requested" in p.forward.reason
    monkeypatch.setenv("FASTLORA_PATH", "fastest")
    with pytest.raises(ValueError, match="path must be one of"):
        fastlora.plan(1, 4096, 4096, device="cuda")
    with pytest.raises(ValueError, match="path must be one of"):
        fastlora.lora_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(1, 8), torch.randn(4, 1), 1.0)


def test_plan_on_cpu_and_for_the_reference():
    p = fastlora.plan(4096, 4096, 4096, device="cpu", quant="nf4")
    assert p.forward.backend == "torch" and p.forward.path == "dequant_gemm"
    p = fastlora.plan(1, 4096, 4096, device="cuda", backend="torch", path="fused")
    assert p.forward.backend == "torch" and "no fused kernel" in p.forward.reason


def test_plan_uses_the_nearest_row_and_the_op_follows_it(monkeypatch):
    """A shape absent from the table takes the nearest row of its quant and dtype, and the op runs the path
    the plan names (a table with a tiny crossover makes the switch cheap to observe on the CPU)."""
    rows = (
        (90, "nf4", "fp32", 64, 64, 4, 2, "cublas_c", "cublas_c"),
        (90, "nf4", "fp32", 4096, 4096, 64, 32, "kext", "kext"),
    )
    monkeypatch.setattr(crossover_table, "ROWS", rows)
    assert plan_mod.crossover(128, 96, "nf4", torch.float32).row == rows[0]
    assert plan_mod.crossover(3000, 5000, "nf4", torch.float32).row == rows[1]
    assert plan_mod.crossover(128, 96, "fp4", torch.float32).row is None  # no fp4 row: fused only at M <= 16
    calls = []
    for name in ("forward", "input_grad"):
        real = getattr(lora_paths, name)
        monkeypatch.setattr(lora_paths, name, lambda *a, _real=real, _n=name, **kw: calls.append(_n) or _real(*a, **kw))
    for m in (2, 3, 5):
        calls.clear()
        w, state, _, (x, bias, a, b) = _make(m, 128, 96, 4, "nf4", torch.float32)
        x.requires_grad_()
        y = fastlora.lora_linear(x, w, bias, a, b, 1.0, quant_state=state, backend="triton")
        y.sum().backward()
        p = fastlora.plan(m, 128, 96, 4, dtype=torch.float32, quant="nf4", backend="triton", device="cpu")
        want = [n for n, pp in (("forward", p.forward), ("input_grad", p.input_grad)) if pp.path == "dequant_gemm"]
        assert calls == want, (m, calls, str(p))


def test_plan_command(capsys):
    from fastlora.cli import main

    assert main(["plan", "--m", "1", "8192", "--n", "14336", "--dropout", "0.05"]) == 0
    out = capsys.readouterr().out
    assert out.count("fastlora plan: M=") == 2 and "M=8192 K=4096 N=14336" in out
    assert "fused" in out and "dequant_gemm" in out and "why:" in out
    with pytest.raises(ValueError, match="dropout_p must be in"):
        fastlora.plan(1, 64, 64, dropout_p=1.0)


@pytest.mark.parametrize("weight_kind", ["dense", "nf4"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=id_formatter("p"))
def test_dequant_gemm_kext_variant(weight_kind, p, monkeypatch):
    """Where the table names "kext", dequant_gemm runs the K-extended Triton GEMM over the dense scratch (no [M, N]
    pass outside it), forward and dx, dropout included; the plan says so."""
    columns = ("arch", "quant", "dtype", "k", "n", "fwd_max_m", "dx_max_m", "fwd_gemm", "dx_gemm")
    monkeypatch.setattr(crossover_table, "COLUMNS", columns)
    rows = tuple((90, q, "fp32", 128, 40, 0, 0, "kext", "kext") for q in ("nf4", "dense"))
    monkeypatch.setattr(crossover_table, "ROWS", rows)
    calls = []
    for name in ("lora_fwd_triton", "lora_bwd_dx_triton"):
        real = getattr(lora_paths.lora_kernels, name)
        monkeypatch.setattr(lora_paths.lora_kernels, name,
                            lambda *a, _r=real, _n=name, **kw: calls.append((_n, a[2])) or _r(*a, **kw))  # fmt: skip
    _compare(17, 128, 40, 8, weight_kind, torch.float32, p, backend="triton", path=None)
    assert [n for n, _ in calls] == ["lora_fwd_triton", "lora_bwd_dx_triton"]
    assert all(state is None for _, state in calls), "the K-extended GEMM reads the dense scratch"
    plan = fastlora.plan(17, 128, 40, 8, dtype=torch.float32, quant=weight_kind if weight_kind != "dense" else None,
                         device="cuda")  # fmt: skip
    assert plan.forward.path == "dequant_gemm" and "K-extended" in plan.forward.how and "kext" in plan.forward.reason
