"""DoRA (``use_dora=True``) against peft's DoRA: layer and model outputs and every gradient (x, A, B, m), dense fp32
(tight), bf16 (error against a float64 reference at most 2x peft's own), NF4 (against peft on the dequantised base),
LoRA dropout, adapter files both ways, merge/unmerge, torch.compile, and the norm's allocations."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_error
from models import minilm, tiny_llama
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora import FastLoRALinear
from fastlora.functional import apply_dropout
from fastlora.ops.dora import dora_linear, dora_weight_norm, weight_row_sqnorm
from fastlora.quant import dequantize_4bit

peft = pytest.importorskip("peft")


def _peft_layer(linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
    host = peft.get_peft_model(nn.Sequential(copy.deepcopy(linear)),
                               peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["0"],
                                               use_dora=True, init_lora_weights=False))  # fmt: skip
    return host.base_model.model[0]


def _copy_to_peft(fast: FastLoRALinear, layer, name: str = "default") -> None:
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(fast.adapters[name].lora_A)
        layer.lora_B[name].weight.copy_(fast.adapters[name].lora_B)
        layer.lora_magnitude_vector[name].weight.copy_(fast.adapters[name].lora_magnitude_vector)


def _grads(layer_params, x):
    return [p.grad for p in layer_params] + [x.grad]


def _pair(in_f=37, out_f=23, r=5, bias=True, quant=None, dtype=torch.float32):
    torch.manual_seed(1)
    linear = nn.Linear(in_f, out_f, bias=bias)
    fast = FastLoRALinear.from_linear(linear, r, 2.0 * r, quant=quant, init="none", use_dora=True)
    with torch.no_grad():
        fast.lora_magnitude_vector.mul_(torch.rand(out_f) + 0.5)  # a trained-looking magnitude
    if quant is not None:  # peft on the dequantised base: the same W, so quantisation error cannot hide
        with torch.no_grad():
            linear.weight.copy_(dequantize_4bit(fast.weight, fast.quant_state, torch.float32))
    ref = _peft_layer(linear, r, 2.0 * r)
    _copy_to_peft(fast, ref)
    return fast.to(dtype), ref.to(dtype)


def _params(fast, ref):
    return ([fast.lora_A, fast.lora_B, fast.lora_magnitude_vector],
            [ref.lora_A["default"].weight, ref.lora_B["default"].weight,
             ref.lora_magnitude_vector["default"].weight])  # fmt: skip


@pytest.mark.parametrize("quant", [None, "nf4"], ids=["dense", "nf4"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_matches_peft_fp32(quant, bias):
    fast, ref = _pair(bias=bias, quant=quant)
    x = torch.randn(3, 7, 37)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    g = torch.randn(3, 7, 23)
    (fast(xs[0]) * g).sum().backward()
    (ref(xs[1]) * g).sum().backward()
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    pf, pr = _params(fast, ref)
    for name, got, want in zip(("A", "B", "m", "x"), _grads(pf, xs[0]), _grads(pr, xs[1]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("quant", [None, "nf4"], ids=["dense", "nf4"])
def test_layer_bf16_error_within_twice_peft(quant):
    fast, ref = _pair(quant=quant)
    ref64 = copy.deepcopy(ref).double()
    fast16, ref16 = fast.to(torch.bfloat16), ref.to(torch.bfloat16)  # NF4: the statistics stay, the compute is bf16
    x = torch.randn(9, 37)
    g = torch.randn(9, 23)
    outs, grads = [], []
    for model, dtype in ((fast16, torch.bfloat16), (ref16, torch.bfloat16), (ref64, torch.float64)):
        xi = x.to(dtype).requires_grad_()
        y = model(xi)
        (y * g.to(dtype)).sum().backward()
        outs.append(y)
        params = _params(fast16, ref16)[0] if model is fast16 else _params(fast16, model)[1]
        grads.append(_grads(params, xi))
    assert rel_error(outs[0], outs[2]) <= 2 * rel_error(outs[1], outs[2]) + 1e-2
    for got, theirs, want in zip(*grads, strict=True):
        assert rel_error(got, want) <= 2 * rel_error(theirs, want) + 1e-2


def test_dropout_matches_peft_with_the_same_mask():
    p = 0.3
    fast, ref = _pair()
    ref = _peft_layer(nn.Linear(37, 23), 5, 10.0, dropout=p)
    with torch.no_grad():
        ref.base_layer.weight.copy_(fast.weight)
        ref.base_layer.bias.copy_(fast.bias)
    _copy_to_peft(fast, ref)
    fast.adapter.lora_dropout = p
    fast.train(), ref.train()
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # the seed FastLoRALinear draws after manual_seed(5)

    class SameMask(nn.Module):
        def forward(self, x):
            return apply_dropout(x.reshape(-1, x.shape[-1]), p, seed).view(x.shape)

    ref.lora_dropout["default"] = SameMask()
    x = torch.randn(6, 37)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    g = torch.randn(6, 23)
    torch.manual_seed(5)
    y = fast(xs[0])
    torch.testing.assert_close(y, ref(xs[1]), rtol=1e-5, atol=1e-5)
    (y * g).sum().backward()
    (ref(xs[1]) * g).sum().backward()
    for got, want in zip(_grads(_params(fast, ref)[0], xs[0]), _grads(_params(fast, ref)[1], xs[1]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", [None, "nf4"], ids=["dense", "nf4"])
def test_norm_equals_the_materialised_one(quant):
    fast, _ = _pair(in_f=130, out_f=19, r=3, quant=quant)
    w = fast.weight.double() if quant is None else dequantize_4bit(fast.weight, fast.quant_state, torch.float32)
    want = (w.double() + fast.scaling * fast.lora_B.double() @ fast.lora_A.double()).norm(dim=1)
    sq = weight_row_sqnorm(fast.weight, fast.quant_state)
    got = dora_weight_norm(fast.weight, fast.lora_A, fast.lora_B, fast.scaling, sq, quant_state=fast.quant_state)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)


class _Sizes(TorchDispatchMode):
    """Every tensor an op returns, by op name (a custom op counts as one op: its insides run below the mode)."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.numel()))
        return out


def test_4bit_norm_allocates_no_weight_sized_tensor():
    """What is measured: the numel of every tensor each aten/custom op returns while the DoRA forward and the
    norm run on a 4-bit (N, K) = (96, 256) base. Outside fastlora::lora_linear nothing reaches N·K (nor N·K/8);
    lora_linear itself, with r = 4 ≤ 16 rows on the CPU, is the native GEMV reading W packed."""
    fast, _ = _pair(in_f=256, out_f=96, r=4, quant="nf4")
    x = torch.randn(2, 256)
    fast.forward(x)  # the frozen ‖W_n‖² cache is built once per base weight (row-chunked), before measuring
    with _Sizes() as sizes:
        fast(x)
    big = [(op, n) for op, n in sizes.outputs if n >= 96 * 256 // 8]
    assert not big, big
    assert any("lora_linear" in op for op, _ in sizes.outputs)
    from fastlora import dispatch, native

    if native.unavailable_reason() is None:  # the norm's W Aᵀ (r = 4 rows) is the native GEMV: W read packed
        assert dispatch.choose("lora_linear", x.device, None, m=4, quantized=True).backend == "native"


def test_compile_fullgraph_matches_eager():
    fast, _ = _pair(quant="nf4")
    x = torch.randn(4, 37, requires_grad=True)
    eager = fast(x)
    eager.sum().backward()
    own = [fast.lora_A, fast.lora_B, fast.lora_magnitude_vector]
    want = [w.clone() for w in _grads(own, x)]
    fast.zero_grad()
    x.grad = None
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for got, w in zip(_grads(own, x), want, strict=True):
        torch.testing.assert_close(got, w)


@pytest.mark.slow  # inductor's C++ compile: ~10 s a graph with a warm cache, minutes cold on 2 cores
@pytest.mark.parametrize("path", [None, "dequant_gemm"], ids=["default", "dequant_gemm"])
def test_compile_inductor_fullgraph_forward_backward(path, monkeypatch):
    """The default backend (inductor) on the CPU, fullgraph: fastlora's ops stay opaque (their fakes give the
    shapes), inductor compiles the elementwise DoRA epilogue (g = m / norm, z ⊙ g + b) and its backward."""
    from helpers import compiler_available

    if not compiler_available():
        pytest.skip("inductor needs a C++ compiler on the CPU")
    if path:
        monkeypatch.setenv("FASTLORA_BACKEND", "triton")
        monkeypatch.setenv("FASTLORA_PATH", path)
    fast, _ = _pair(quant="nf4")
    x = torch.randn(4, 37, requires_grad=True)
    eager = fast(x)
    (eager * torch.linspace(-1, 1, 23)).sum().backward()
    own = [fast.lora_A, fast.lora_B, fast.lora_magnitude_vector]
    want = [w.clone() for w in _grads(own, x)]
    fast.zero_grad()
    x.grad = None
    torch._dynamo.reset()
    out = torch.compile(fast, fullgraph=True)(x)
    (out * torch.linspace(-1, 1, 23)).sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for got, w in zip(_grads(own, x), want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_float_exact_and_4bit_dense():
    fast, ref = _pair()
    x = torch.randn(5, 37)
    y = fast(x)
    w0 = fast.weight.clone()
    fast.merge()
    torch.testing.assert_close(fast(x), y, rtol=1e-5, atol=1e-5)
    ref.merge()  # peft's DoRA merge: the same weight
    torch.testing.assert_close(fast.weight, ref.base_layer.weight, rtol=1e-6, atol=1e-6)
    fast.unmerge()
    assert torch.equal(fast.weight, w0)
    fast.merge(keep_original=False)
    fast.unmerge()
    torch.testing.assert_close(fast.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast(x), y)
    q, _ = _pair(quant="nf4")
    yq = q(x)
    q.merge()
    assert q.quant_state is None
    torch.testing.assert_close(q(x), yq, rtol=1e-5, atol=1e-5)


# -- models --------------------------------------------------------------------------------------------


def _models(build, quantize=None, targets="all-linear"):
    host = build()
    fast = fastlora.inject(copy.deepcopy(host), r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                           target_modules=targets, quantize=quantize)  # fmt: skip
    layers = dict(fast.lora_layers())
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_magnitude_vector.mul_(torch.rand_like(layer.lora_magnitude_vector) + 0.5)
            if quantize:
                host.get_submodule(_path(layer, layers)).weight.copy_(
                    dequantize_4bit(layer.weight, layer.quant_state, torch.float32))  # fmt: skip
    ref = peft.get_peft_model(host, peft.LoraConfig(r=4, lora_alpha=8, target_modules=sorted(layers), use_dora=True,
                                                    init_lora_weights=False))  # fmt: skip
    for path, layer in layers.items():
        _copy_to_peft(layer, ref.base_model.model.get_submodule(path))
    return fast, ref, layers


def _path(layer, layers):
    return next(p for p, m in layers.items() if m is layer)


def _loss(model, ids):
    out = model(input_ids=ids)
    h = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return h, (h * torch.linspace(-1, 1, h.shape[-1])).sum()


@pytest.mark.parametrize("build,quantize", [(tiny_llama, None), (tiny_llama, "nf4"), (minilm, None)],
                         ids=["llama", "llama-nf4", "minilm"])  # fmt: skip
def test_model_matches_peft_fp32(build, quantize):
    fast, ref, layers = _models(build, quantize)
    ids = torch.randint(0, 100, (2, 9))
    hf, lf = _loss(fast, ids)
    hr, lr = _loss(ref, ids)
    torch.testing.assert_close(hf, hr, rtol=2e-5, atol=2e-5)
    lf.backward()
    lr.backward()
    for path, layer in layers.items():
        theirs = ref.base_model.model.get_submodule(path)
        for got, want in zip(_params(layer, theirs)[0], _params(layer, theirs)[1], strict=True):
            # fp32 through 6 real layers (MiniLM): each gradient within 1e-4 of peft's, as a relative norm
            if want.grad is None:  # MiniLM's pooler: not in the loss
                assert got.grad is None or not got.grad.any()
                continue
            assert rel_error(got.grad, want.grad) < 1e-4, (path, rel_error(got.grad, want.grad))


def test_llama_bf16_error_within_twice_peft():
    fast, ref, _ = _models(tiny_llama)
    ref64 = copy.deepcopy(ref).double()
    ids = torch.randint(0, 100, (2, 9))
    hf, _ = _loss(fast.to(torch.bfloat16), ids)
    hr, _ = _loss(ref.to(torch.bfloat16), ids)
    h64, _ = _loss(ref64, ids)
    assert rel_error(hf, h64) <= 2 * rel_error(hr, h64) + 1e-2


def test_adapter_files_round_trip_both_ways(tmp_path):
    fast, ref, _ = _models(tiny_llama)
    ids = torch.randint(0, 100, (2, 9))
    want = _loss(ref, ids)[0]
    ref.save_pretrained(tmp_path / "peft")
    loaded = fastlora.LoraModel.load(tiny_llama(), str(tmp_path / "peft"))
    assert next(iter(dict(loaded.lora_layers()).values())).use_dora
    torch.testing.assert_close(_loss(loaded, ids)[0], want, rtol=2e-5, atol=2e-5)
    fast.save(str(tmp_path / "fast"))
    back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "fast"))
    torch.testing.assert_close(_loss(back, ids)[0], want, rtol=2e-5, atol=2e-5)


def test_merge_and_unload_4bit_is_the_forward():
    fast, _, _ = _models(tiny_llama, "nf4")
    ids = torch.randint(0, 100, (2, 9))
    want = _loss(fast, ids)[0]
    torch.testing.assert_close(_loss(fast.merge_and_unload(), ids)[0], want, rtol=1e-4, atol=1e-4)


def test_functional_dora_linear_leading_dims():
    fast, _ = _pair(bias=False)
    x = torch.randn(2, 3, 37)
    y = dora_linear(x, fast.weight, None, fast.lora_A, fast.lora_B, fast.lora_magnitude_vector, fast.scaling,
                    weight_row_sqnorm(fast.weight))  # fmt: skip
    torch.testing.assert_close(y, fast(x))


def test_qlora_mixed_precision_fp32_adapter_bf16_compute():
    """The QLoRA training setup: NF4 base, fp32 A/B/m (the optimiser's), bf16 activations under autocast."""
    fast, _ = _pair(quant="nf4")
    x = torch.randn(6, 37)
    want = fast(x)
    want.sum().backward()
    grads = [p.grad.clone() for p in (fast.lora_A, fast.lora_B, fast.lora_magnitude_vector)]
    fast.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert rel_error(y, want) < 2e-2
    for p, g in zip((fast.lora_A, fast.lora_B, fast.lora_magnitude_vector), grads, strict=True):
        assert p.grad.dtype == torch.float32 and rel_error(p.grad, g) < 3e-2


# -- the training-size 4-bit path: the norm from the dequantisation pass (fastlora.kernels.dora_norm) -----------


@pytest.fixture
def dequant_gemm(monkeypatch):
    """The Triton training-size path at any M (as on a GPU at M > the crossover), under the interpreter."""
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    monkeypatch.setenv("FASTLORA_PATH", "dequant_gemm")


@pytest.mark.parametrize(
    "dtype,nested,n,k,r",
    [(torch.float32, True, 70, 256, 5), (torch.bfloat16, False, 33, 128, 17), (torch.float16, True, 19, 37, 3),
     (torch.bfloat16, True, 20, 320, 8)],
    ids=["fp32", "bf16-plain-r17", "fp16-odd-K", "bf16-split-K"],
)  # fmt: skip
def test_dora_norm_kernels_match_reference(dtype, nested, n, k, r, monkeypatch):
    """norm_terms (‖W_n‖², W·Aᵀ from one read of the packed W) against the float64 reference; the scaled
    dequantisation diag(g)·W bit-equal to the reference's one rounding, written beside other columns untouched."""
    from fastlora.kernels import dora_norm
    from fastlora.kernels.dora_norm import dequantize_scaled_into, k_split, norm_terms
    from fastlora.kernels.dora_norm_ref import dequant_norm, dequant_scaled
    from fastlora.quant import quantize_4bit

    assert k_split(64, 4096) == 4 and k_split(14336, 4096) == 3 and k_split(20, 1000) == 1
    if k == 320:  # two K ranges of 192 and 128 columns: the partial sums and their addition
        monkeypatch.setattr(dora_norm, "k_split", lambda n, k: 2)
    packed, state = quantize_4bit(torch.randn(n, k), "nf4", 64, nested)
    a = torch.randn(r, k).to(dtype)
    sq, wa = norm_terms(packed, state, a, dtype)
    _, want_sq, want_wa = dequant_norm(packed, state, a, dtype, torch.float64)
    assert sq.dtype == wa.dtype == torch.float32 and wa.shape == (n, r)
    assert rel_error(sq, want_sq) < 1e-6 and rel_error(wa, want_wa) < 1e-6
    g = torch.rand(n) + 0.5
    full = torch.full((n, k + 3), float("nan"), dtype=dtype)
    w = dequantize_scaled_into(packed, state, g, full[:, :k])  # a row stride above K
    assert torch.equal(w, dequant_scaled(packed, state, g, dtype)) and full[:, k:].isnan().all()


@pytest.mark.parametrize("quant_bias", [(True, torch.float32), (False, torch.float32)], ids=["bias", "nobias"])
def test_fused_norm_path_matches_peft_fp32(dequant_gemm, quant_bias):
    bias, _ = quant_bias
    fast, ref = _pair(in_f=128, out_f=23, bias=bias, quant="nf4")
    x = torch.randn(3, 5, 128)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    g = torch.randn(3, 5, 23)
    with _Sizes() as sizes:
        y = fast(xs[0])
    assert any("dora_dequant_gemm" in op for op, _ in sizes.outputs)  # the path under test ran
    (y * g).sum().backward()
    (ref(xs[1]) * g).sum().backward()
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    pf, pr = _params(fast, ref)
    for name, got, want in zip(("A", "B", "m", "x"), _grads(pf, xs[0]), _grads(pr, xs[1]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_fused_norm_path_bf16_error_within_twice_peft(dequant_gemm):
    fast, ref = _pair(in_f=128, out_f=23, quant="nf4")
    ref64 = copy.deepcopy(ref).double()
    fast16, ref16 = fast.to(torch.bfloat16), ref.to(torch.bfloat16)
    x, g = torch.randn(9, 128), torch.randn(9, 23)
    outs, grads = [], []
    for model, dtype in ((fast16, torch.bfloat16), (ref16, torch.bfloat16), (ref64, torch.float64)):
        xi = x.to(dtype).requires_grad_()
        y = model(xi)
        (y * g.to(dtype)).sum().backward()
        outs.append(y)
        grads.append(_grads(_params(fast16, ref16)[0] if model is fast16 else _params(fast16, model)[1], xi))
    assert rel_error(outs[0], outs[2]) <= 2 * rel_error(outs[1], outs[2]) + 1e-2
    for got, theirs, want in zip(*grads, strict=True):
        assert rel_error(got, want) <= 2 * rel_error(theirs, want) + 1e-2


class _Storages(TorchDispatchMode):
    """Bytes of every new storage an op returns (an output whose storage is none of the op's inputs': views and
    in-place results do not count), with fastlora's DoRA ops entered (their Python bodies run under this mode), so
    the allocations inside them count too."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from fastlora.ops.dora import _dora_backward_op, _dora_dequant_gemm_op

        ops = {"fastlora.dora_dequant_gemm.default": _dora_dequant_gemm_op,
               "fastlora.dora_dequant_gemm_backward.default": _dora_backward_op}  # fmt: skip
        if str(func) in ops:
            with self:
                out = ops[str(func)]._init_fn(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        flat = [t for a in flat for t in (a if isinstance(a, (tuple, list)) else [a])]
        seen = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append((str(func), t.untyped_storage().nbytes()))
        return out


def test_fused_norm_path_never_allocates_the_merged_weight(dequant_gemm, monkeypatch):
    """What is measured: the bytes of every new tensor any aten/custom op returns, inside fastlora's DoRA op too,
    and every fastlora._alloc.empty, during a forward+backward on a 4-bit (N, K) = (64, 256) base with M = 4 rows
    (so M·N and M·K stay below N·K / 2). The shared dequantisation scratch is grown by a first call (LoRA uses
    the same buffer); afterwards nothing of N·K elements (any dtype: >= N·K·2 bytes) is created."""
    import fastlora._alloc as alloc

    fast, _ = _pair(in_f=256, out_f=64, r=4, quant="nf4")
    x = torch.randn(4, 256, requires_grad=True)
    fast(x).sum().backward()  # grows the scratch
    made = []
    empty = alloc.empty
    monkeypatch.setattr(alloc, "empty", lambda shape, **kw: made.append(shape) or empty(shape, **kw))
    with _Storages() as mode:
        fast(x).sum().backward()
    nk = 64 * 256
    big = [(op, b) for op, b in mode.sizes if b >= nk * 2] + [s for s in made if torch.Size(s).numel() >= nk]
    assert not big, big
    ran = {op for op, _ in mode.sizes}
    assert "fastlora.dora_dequant_gemm.default" in ran and "fastlora.dora_dequant_gemm_backward.default" in ran


def test_dora_ops_opcheck(dequant_gemm):
    """torch.library.opcheck of the training-size DoRA op and its backward: schema, fakes, autograd registration."""
    from fastlora.ops.dora import norm_from  # noqa: F401  (registers the ops)
    from fastlora.quant import quantize_4bit

    packed, state = quantize_4bit(torch.randn(20, 64), "nf4", 64, True)
    x = torch.randn(3, 64, requires_grad=True)
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(20, 4, requires_grad=True)
    m = (torch.rand(20) + 0.5).requires_grad_()
    args = (x, packed, a, b, m, *state.op_args(), 0.5, "triton")
    torch.library.opcheck(torch.ops.fastlora.dora_dequant_gemm.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))  # fmt: skip


def test_zero_magnitude_row_gives_finite_gradients(dequant_gemm):
    """A magnitude exactly 0: that output column is 0 (as peft), and its dm is taken as 0 (the folded path keeps
    no z to form Σ dy·z / norm); every other gradient stays finite and equal to peft's."""
    fast, ref = _pair(in_f=128, out_f=23, bias=False, quant="nf4")
    with torch.no_grad():
        fast.lora_magnitude_vector[3] = 0.0
    _copy_to_peft(fast, ref)
    x = torch.randn(6, 128)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y = fast(xs[0])
    assert (y[:, 3] == 0).all()
    y.sum().backward()
    ref(xs[1]).sum().backward()
    dm = fast.lora_magnitude_vector.grad
    assert torch.isfinite(dm).all() and dm[3] == 0
    keep = torch.arange(23) != 3
    torch.testing.assert_close(dm[keep], ref.lora_magnitude_vector["default"].weight.grad[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_small_m_stacked_pass_matches_peft(backend, monkeypatch):
    """Small M: x and A's rows in one call over the packed W ([x; A], W read once): fp32 equal to peft, every
    gradient; the Triton fused kernel and (where built) the native GEMV (M + r <= 16)."""
    from fastlora import native
    from fastlora.ops import dora

    if backend == "native" and native.unavailable_reason() is not None:
        pytest.skip(native.unavailable_reason())
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    if backend == "triton":
        monkeypatch.setenv("FASTLORA_PATH", "fused")
    seen = []
    real = dora.stacked_applies
    monkeypatch.setattr(dora, "stacked_applies", lambda *a: seen.append(real(*a)) or seen[-1])
    fast, ref = _pair(in_f=64, out_f=23, r=5, quant="nf4")
    x = torch.randn(3, 64)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    y = fast(xs[0])
    assert seen == [True]
    torch.testing.assert_close(y, ref(xs[1]), rtol=1e-5, atol=1e-5)
    g = torch.randn(3, 23)
    (y * g).sum().backward()
    (ref(xs[1]) * g).sum().backward()
    pf, pr = _params(fast, ref)
    for name, got, want in zip(("A", "B", "m", "x"), _grads(pf, xs[0]), _grads(pr, xs[1]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")
