"""FastLoRALinear against PEFT's LoRA on the same weights: outputs and gradients (x, lora_A, lora_B).

Peers: PEFT's ``lora.Linear`` over an ``nn.Linear`` (fp32 and bf16) and PEFT's ``lora.bnb.Linear4bit``
over a ``bitsandbytes.nn.Linear4bit`` (NF4/FP4, with and without double quantisation), all on the CPU.
"""

import copy
import math

import pytest
import torch
from helpers import id_formatter, rel_error
from torch import nn

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from fastlora import FastLoRALinear  # noqa: E402

BACKENDS = ["torch", "triton"]
ADAPTER = "default"
# fp32: both sides compute the same products in float32, only the summation order may differ, so the
# errors are a few ulps of the largest accumulated terms (~1e-6 of the tensor's scale at these sizes;
# measured: dA up to ~110 in magnitude, both sides 1.5e-5 off float64). An element that cancels to a
# small value keeps an error of that absolute size, so atol is relative to the tensor's largest
# magnitude: 1e-5 of it leaves margin, while an off-by-one scaling, a missing term or a wrong
# dequantisation fails by orders of magnitude.
RTOL, ATOL = 1e-5, 1e-5
# bf16 (flash-attention's rule): fastlora's relative error against a float64 reference may be at most
# 2x PEFT's own bf16 error plus a floor of 1e-2 (~2.5x bf16's unit roundoff 2**-8 = 3.9e-3; both measure ~3e-3).
BF16_FLOOR = 1e-2


class _Holder(nn.Module):
    """The smallest model PEFT can wrap: one linear layer named ``proj``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_lora(layer, r, alpha, use_rslora, *, loaded_in_4bit=False, autocast_adapter_dtype=True):
    """PEFT's LoRA around ``layer`` (a deep copy), returning PEFT's LoRA layer."""
    holder = _Holder(copy.deepcopy(layer))
    if loaded_in_4bit:
        # PEFT dispatches to its bnb Linear4bit LoRA layer only for models flagged as 4-bit, the flag
        # transformers sets on models loaded with load_in_4bit (peft/tuners/lora/model.py).
        holder.is_loaded_in_4bit = True
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=["proj"],
        lora_dropout=0.0,
        use_rslora=use_rslora,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(holder, config, autocast_adapter_dtype=autocast_adapter_dtype)
    return model.base_model.model.proj


def _set_same_lora_weights(fast, peft_layer, r, in_f, out_f):
    """Random A and a NON-zero B (a zero B would make dL/dA vanish), identical on both sides."""
    a = torch.randn(r, in_f) / math.sqrt(in_f)
    b = torch.randn(out_f, r) / math.sqrt(r)
    with torch.no_grad():
        for dst, src in (
            (peft_layer.lora_A[ADAPTER].weight, a),
            (peft_layer.lora_B[ADAPTER].weight, b),
            (fast.lora_A, a),
            (fast.lora_B, b),
        ):
            dst.copy_(src.to(dst.dtype))


def _run(module, lora_a, lora_b, x, g):
    """Forward, backward with upstream gradient g; returns (y, dx, dA, dB)."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad, lora_a.grad, lora_b.grad


def _assert_close_fp32(name, got, want):
    assert got.dtype == want.dtype == torch.float32, name
    atol = ATOL * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda m: f"{name}: {m}")


def _check_frozen_base(fast):
    assert [n for n, p in fast.named_parameters() if p.requires_grad] == [
        "adapters.default.lora_A",
        "adapters.default.lora_B",
    ]
    assert fast.weight.grad is None
    assert fast.bias is None or fast.bias.grad is None


# -- plain nn.Linear ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=id_formatter("bias"))
@pytest.mark.parametrize("use_rslora", [False, True], ids=id_formatter("rslora"))
@pytest.mark.parametrize("backend", BACKENDS, ids=id_formatter("backend"))
def test_matches_peft_linear_fp32(backend, use_rslora, bias, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    in_f, out_f, r, alpha = 53, 37, 8, 12
    linear = nn.Linear(in_f, out_f, bias=bias)
    ref = _peft_lora(linear, r, alpha, use_rslora)
    fast = FastLoRALinear.from_linear(linear, r=r, lora_alpha=alpha, use_rslora=use_rslora, init="none")
    assert fast.scaling == pytest.approx(ref.scaling[ADAPTER])
    _set_same_lora_weights(fast, ref, r, in_f, out_f)

    x = torch.randn(2, 5, in_f)
    g = torch.randn(2, 5, out_f)
    want = _run(ref, ref.lora_A[ADAPTER].weight, ref.lora_B[ADAPTER].weight, x, g)
    got = _run(fast, fast.lora_A, fast.lora_B, x, g)

    # The LoRA branch must matter, or the comparison would not test it.
    assert (want[0] - linear(x)).norm() > 0.1 * want[0].norm()
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        _assert_close_fp32(name, a, b)
    _check_frozen_base(fast)


@pytest.mark.parametrize("use_rslora", [False, True], ids=id_formatter("rslora"))
@pytest.mark.parametrize("backend", BACKENDS, ids=id_formatter("backend"))
def test_matches_peft_linear_bf16(backend, use_rslora, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    in_f, out_f, r, alpha = 53, 37, 8, 12
    linear = nn.Linear(in_f, out_f).to(torch.bfloat16)
    # autocast_adapter_dtype=False keeps PEFT's adapter in bf16 (by default PEFT upcasts it to fp32),
    # so PEFT's error is that of an all-bf16 LoRA layer, the same thing fastlora computes.
    ref = _peft_lora(linear, r, alpha, use_rslora, autocast_adapter_dtype=False)
    fast = FastLoRALinear.from_linear(linear, r=r, lora_alpha=alpha, use_rslora=use_rslora, init="none")
    assert ref.lora_A[ADAPTER].weight.dtype == fast.lora_A.dtype == torch.bfloat16
    _set_same_lora_weights(fast, ref, r, in_f, out_f)

    x = torch.randn(2, 5, in_f).to(torch.bfloat16)
    g = torch.randn(2, 5, out_f).to(torch.bfloat16)
    want = _run(ref, ref.lora_A[ADAPTER].weight, ref.lora_B[ADAPTER].weight, x, g)
    got = _run(fast, fast.lora_A, fast.lora_B, x, g)

    # float64 reference from the same bf16 values, by autograd
    x64 = x.double().requires_grad_()
    a64 = fast.lora_A.detach().double().requires_grad_()
    b64 = fast.lora_B.detach().double().requires_grad_()
    y64 = x64 @ linear.weight.double().T + linear.bias.double() + fast.scaling * (x64 @ a64.T) @ b64.T
    y64.backward(g.double())
    exact = (y64.detach(), x64.grad, a64.grad, b64.grad)

    for name, a, b, e in zip(("y", "dx", "dA", "dB"), got, want, exact, strict=True):
        assert a.dtype == torch.bfloat16 and not torch.isnan(a).any(), name
        err, base = rel_error(a, e), rel_error(b, e)
        assert err <= 2 * base + BF16_FLOOR, f"{name}: rel error {err:.2e} > 2 x PEFT's {base:.2e} + {BF16_FLOOR}"
    _check_frozen_base(fast)


# -- bitsandbytes Linear4bit --------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True], ids=id_formatter("rslora"))
@pytest.mark.parametrize("double_quant", [False, True], ids=id_formatter("dq"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"], ids=id_formatter("quant"))
@pytest.mark.parametrize("backend", BACKENDS, ids=id_formatter("backend"))
def test_matches_peft_bnb_linear4bit(backend, quant_type, double_quant, use_rslora, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    # in_features a multiple of 64: bitsandbytes 0.50.2's CPU dequantiser is wrong when rows straddle blocks.
    in_f, out_f, r, alpha = 128, 48, 8, 12
    w = torch.randn(out_f, in_f) / math.sqrt(in_f)
    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=True, quant_type=quant_type, compress_statistics=double_quant, compute_dtype=torch.float32
    )
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(out_f) * 0.1)
    layer = layer.to("cpu")  # quantises
    assert layer.weight.quant_state is not None

    ref = _peft_lora(layer, r, alpha, use_rslora, loaded_in_4bit=True)
    assert isinstance(ref, peft.tuners.lora.bnb.Linear4bit), type(ref)
    fast = FastLoRALinear.from_bnb(layer, r=r, lora_alpha=alpha, use_rslora=use_rslora, init="none")
    assert fast.quant_state is not None and fast.quant_state.quant_type == quant_type
    assert fast.scaling == pytest.approx(ref.scaling[ADAPTER])
    _set_same_lora_weights(fast, ref, r, in_f, out_f)

    x = torch.randn(2, 5, in_f)
    g = torch.randn(2, 5, out_f)
    want = _run(ref, ref.lora_A[ADAPTER].weight, ref.lora_B[ADAPTER].weight, x, g)
    got = _run(fast, fast.lora_A, fast.lora_B, x, g)

    # The 4-bit base must matter: with the unquantised weight the output is far outside the tolerance.
    with torch.no_grad():
        dense = x @ w.T + layer.bias + fast.scaling * (x @ fast.lora_A.T) @ fast.lora_B.T
    assert (dense - want[0]).abs().max() > 100 * ATOL * want[0].abs().max()
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        _assert_close_fp32(name, a, b)
    _check_frozen_base(fast)
