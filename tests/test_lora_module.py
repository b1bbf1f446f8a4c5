"""FastLoRALinear: drop-in behaviour, merge/unmerge, state dicts, devices, autocast, compile, bad input."""

import copy
import dataclasses

import pytest
import torch
from helpers import id_formatter
from torch import nn

from fastlora import FastLoRALinear, native
from fastlora.kernels.lora_ref import lora_linear_ref
from fastlora.ops import lora_linear
from fastlora.quant import dequantize_4bit

QUANTS = [None, "nf4", "fp4"]


def _layer(quant, in_f=64, out_f=48, r=4, **kw):
    linear = nn.Linear(in_f, out_f)
    return FastLoRALinear.from_linear(linear, r=r, lora_alpha=8, quant=quant, init="none", **kw), linear


def _base_weight(m):
    return m.weight if m.quant_state is None else dequantize_4bit(m.weight, m.quant_state, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("quant", QUANTS, ids=id_formatter("quant"))
def test_matches_reference_and_freezes_base(quant, backend, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    m, _ = _layer(quant)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        "adapters.default.lora_A",
        "adapters.default.lora_B",
    ]
    x = torch.randn(2, 3, 64)
    y = m(x)
    ref = lora_linear_ref(x, _base_weight(m), m.bias, m.lora_A, m.lora_B, m.scaling)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert m.weight.grad is None and m.bias.grad is None
    assert m.lora_A.grad is not None and m.lora_B.grad is not None


def test_default_init_starts_as_the_base_layer():
    linear = nn.Linear(32, 16)
    m = FastLoRALinear.from_linear(linear, r=8)
    x = torch.randn(4, 32)
    torch.testing.assert_close(m(x), linear(x))
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
    g = FastLoRALinear.from_linear(linear, r=8, init="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 8) < 0.03


def test_scaling_and_rslora():
    linear = nn.Linear(32, 32)
    assert FastLoRALinear.from_linear(linear, r=16, lora_alpha=32).scaling == 2.0
    assert FastLoRALinear.from_linear(linear, r=16, lora_alpha=32, use_rslora=True).scaling == 8.0


def test_dropout_only_in_training():
    m, _ = _layer(None, lora_dropout=0.5)
    x = torch.randn(8, 64)
    m.eval()
    no_drop = lora_linear_ref(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling)
    torch.testing.assert_close(m(x), no_drop, rtol=1e-5, atol=1e-5)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    assert torch.equal(a, m(x))  # reproducible under a seed
    assert not torch.allclose(a, no_drop, atol=1e-4)


@pytest.mark.parametrize("quant", QUANTS, ids=id_formatter("quant"))
def test_merge_unmerge(quant):
    m, _ = _layer(quant)
    x = torch.randn(5, 64)
    before, weight_before = m(x), m.weight.detach().clone()
    m.merge()
    assert m.merged
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)
    if quant is None:  # merged forward is a plain linear
        torch.testing.assert_close(m(x), nn.functional.linear(x, m.weight, m.bias))
    else:
        assert m.quant_state is None and m.weight.dtype == torch.float32  # 4-bit merges into a dense weight
    m.unmerge()
    assert not m.merged and torch.equal(m.weight, weight_before)  # exact restore
    torch.testing.assert_close(m(x), before)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_4bit_merge_goes_through_the_merge_op(monkeypatch, backend):
    """A 4-bit merge (and merge_and_unload) runs the merge op: the native kernel where built, in one
    pass over the packed weight; the reference otherwise. Both equal W + s·B A in float64."""
    if backend == "native" and not native.is_built():
        pytest.skip(f"native extension not loaded: {native.unavailable_reason()}")
    calls = []
    real = native.merge_4bit
    monkeypatch.setattr(native, "merge_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    m, _ = _layer("nf4", in_f=96, out_f=40)
    w = dequantize_4bit(m.weight, m.quant_state, torch.float32).double()
    exact = w + m.adapter.scaling * (m.adapter.lora_B.detach().double() @ m.adapter.lora_A.detach().double())
    m.merge()
    assert len(calls) == (backend == "native")
    assert m.weight.dtype == torch.float32 and ((m.weight.double() - exact).norm() / exact.norm()).item() < 1e-6


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_merge_requantized_reports_the_added_error(quant):
    m, _ = _layer(quant, in_f=128, out_f=64)
    x = torch.randn(5, 128)
    before = m(x)
    report = m.merge(requantize=True)
    assert m.quant_state is not None and m.weight.dtype == torch.uint8
    exact = dequantize_4bit(*m._stash) + m.delta_weight()  # the merge before re-quantisation
    err = _base_weight(m) - exact
    assert report["requant_max_abs_error"] == pytest.approx(err.abs().max().item())
    assert 0 < report["requant_rel_error"] < 0.2  # 4-bit: ~10% relative error on random weights
    after = m(x)
    assert ((after - before).norm() / before.norm()).item() < 2 * report["requant_rel_error"]
    m.unmerge()
    torch.testing.assert_close(m(x), before)


def test_unmerge_without_original_subtracts():
    m, _ = _layer(None)
    w = m.weight.detach().clone()
    m.merge(keep_original=False)
    m.unmerge()
    torch.testing.assert_close(m.weight, w, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


@pytest.mark.parametrize("quant", QUANTS, ids=id_formatter("quant"))
def test_state_dict_round_trip(quant, tmp_path):
    from safetensors.torch import load_file, save_file

    m, _ = _layer(quant)
    sd = m.state_dict()
    if quant:
        assert f"weight.quant_state.bitsandbytes__{quant}" in sd and sd["weight"].dtype == torch.uint8
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    fresh, _ = _layer(None)  # a dense layer of the same shape takes a 4-bit state dict too
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(3, 64)
    assert (fresh.quant_state is None) == (quant is None)
    torch.testing.assert_close(fresh(x), m(x))


def test_state_dict_of_wrong_shape_is_rejected():
    m, _ = _layer("nf4")
    other, _ = _layer(None, in_f=32)
    with pytest.raises(ValueError, match=r"state dict weight is \(48, 64\), the layer \(48, 32\)"):
        other.load_state_dict(m.state_dict())


@pytest.mark.parametrize("double_quant", [False, True], ids=id_formatter("dq"))
def test_from_bnb_shares_the_packed_weight(double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(128, 40, quant_type="nf4", compress_statistics=double_quant, compute_dtype=torch.float32)
    layer = layer.to("cpu")
    m = FastLoRALinear.from_bnb(layer, r=4, init="none")
    assert m.weight.data_ptr() == layer.weight.data_ptr()
    x = torch.randn(3, 128)
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(m(x), lora_linear_ref(x, w, layer.bias, m.lora_A, m.lora_B, m.scaling))
    unquantised = bnb.nn.Linear4bit(64, 8)
    with pytest.raises(ValueError, match="not quantised yet"):
        FastLoRALinear.from_bnb(unquantised)


@pytest.mark.parametrize("quant", QUANTS, ids=id_formatter("quant"))
def test_meta_device(quant):
    with torch.device("meta"):
        linear = nn.Linear(64, 32)
    m = FastLoRALinear.from_linear(linear, r=4, quant=quant)
    y = m(torch.empty(3, 5, 64, device="meta"))
    assert y.shape == (3, 5, 32) and y.is_meta


@pytest.mark.parametrize("quant", QUANTS, ids=id_formatter("quant"))
def test_autocast_bf16(quant):
    m, _ = _layer(quant)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    ref = m(x)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2
    y.float().sum().backward()
    assert m.lora_A.grad.dtype == torch.float32  # fp32 master LoRA weights get fp32 grads


def test_lora_weights_in_another_dtype_than_compute():
    m, _ = _layer("nf4", lora_dtype=torch.float32)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.lora_B.grad.dtype == torch.float32


def test_compile_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(_layer("nf4")[0], nn.GELU(), FastLoRALinear.from_linear(nn.Linear(48, 16), r=4, init="none"))
    x = torch.randn(5, 64, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    got = [p.grad for p in compiled.parameters() if p.requires_grad] + [x.grad]
    for g, want in zip(got, grads, strict=True):
        torch.testing.assert_close(g, want)


def test_module_moves_keep_statistics_fp32():
    m, _ = _layer("nf4", double_quant=True)
    m = m.to(torch.bfloat16)
    assert m.weight.dtype == torch.uint8 and m.quant_state.nested.absmax.dtype == torch.float32
    assert m.lora_A.dtype == torch.bfloat16
    assert m(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"r must be an int in \[1, min\(in_features, out_features\)\] = \[1, 48\], got 0"),
        ({"r": 49}, r"= \[1, 48\], got 49"),
        ({"r": 2.5}, "got 2.5"),
        ({"lora_alpha": 0}, "lora_alpha must be > 0, got 0"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0"),
        ({"lora_dropout": -0.1}, r"got -0.1"),
        ({"init": "pissa"}, "init must be one of"),
        # issue 18: alpha = inf was accepted and every output was NaN
        ({"lora_alpha": float("inf")}, "lora_alpha must be finite, got inf"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be finite, got nan"),
        ({"lora_alpha": -16.0}, "lora_alpha must be > 0, got -16.0"),
        ({"lora_alpha": "16"}, "lora_alpha must be a number, got '16'"),
        ({"lora_dropout": float("nan")}, r"lora_dropout must be in \[0, 1\), got nan"),
        ({"lora_dropout": float("inf")}, r"lora_dropout must be in \[0, 1\), got inf"),
        ({"lora_dropout": "0.1"}, r"lora_dropout must be in \[0, 1\), got '0.1'"),
        ({"r": True}, "r must be an int"),
        ({"r": -1}, "r must be an int .* got -1"),
    ],
    ids=[
        "r0",
        "r-too-big",
        "r-float",
        "alpha",
        "dropout-1",
        "dropout-neg",
        "init",
        "alpha-inf",
        "alpha-nan",
        "alpha-neg",
        "alpha-str",
        "dropout-nan",
        "dropout-inf",
        "dropout-str",
        "r-bool",
        "r-neg",
    ],
)
def test_bad_hyperparameters(kwargs, match):
    args = {"r": 4, "lora_alpha": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        FastLoRALinear.from_linear(nn.Linear(64, 48), **args)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_custom_quant_map_is_refused(quant):
    """issue 18: a QuantState with another code table was accepted by the constructor; the forward then used the
    standard table (the kernels keep it in registers) while dequantize_4bit and merge() used the custom one (max
    difference 49-61). Refused as QuantState.from_state_dict and from_bnb refuse it, naming the table."""
    m, _ = _layer(quant)
    custom = dataclasses.replace(m.quant_state, code=m.quant_state.code * 1.5)
    with pytest.raises(ValueError, match=rf"FastLoRALinear: quant_map is not the standard {quant} table"):
        FastLoRALinear(m.weight, m.bias, 4, 8, quant_state=custom)
    # the functional entry point refuses it too (checked once per state object)
    with pytest.raises(ValueError, match=rf"lora_linear: quant_map is not the standard {quant} table"):
        lora_linear(torch.randn(2, 64), m.weight, None, m.lora_A, m.lora_B, 2.0, quant_state=custom)
    # the standard table still builds, and a state whose tensors do not fit the packed weight is refused
    FastLoRALinear(m.weight, m.bias, 4, 8, quant_state=m.quant_state)
    with pytest.raises(ValueError, match="packed weight holds"):
        FastLoRALinear(m.weight[:-1], m.bias, 4, 8, quant_state=m.quant_state)


def test_lora_linear_refuses_a_non_finite_scale():
    m, _ = _layer(None)
    with pytest.raises(ValueError, match="scale must be finite, got inf"):
        lora_linear(torch.randn(2, 64), m.weight, None, m.lora_A, m.lora_B, float("inf"))


def test_bad_inputs():
    m, _ = _layer(None)
    with pytest.raises(ValueError, match=r"input has shape \(3, 63\), expected \(\.\.\., 64\)"):
        m(torch.randn(3, 63))
    with pytest.raises(TypeError, match=r"does not match the base weight.s torch\.float32"):
        m(torch.randn(3, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"float32/float16/bfloat16, got torch\.int64"):
        m(torch.ones(3, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="input is on meta, the layer on cpu"):
        m(torch.empty(3, 64, device="meta"))
    with pytest.raises(TypeError, match=r"expected nn\.Linear, got Conv1d"):
        FastLoRALinear.from_linear(nn.Conv1d(3, 3, 1))
