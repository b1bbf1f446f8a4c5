"""fp16 at its limits: the LoRA scale is applied where it cannot overflow when the exact result fits (issue 18).

Applying s to an fp16 operand, ``(s·u) Bᵀ``, overflows as soon as |s·u| > 65504: with lora_alpha 2048, r 8 and
|x| ≈ 300 every output was inf/NaN (a fresh adapter's B is zero, and inf · 0 = NaN) although the exact result is
the base output, at most ~700. fastlora now applies s on the fp32 accumulator of the product it scales (torch:
addmm's alpha; Triton: the fp32 sum of the u Bᵀ steps; native: fp32 throughout), in the forward and in the
backward (``v = s·g B``, ``dB = s·gᵀ u``).

Every backend (torch, Triton under the interpreter, native) and a dense or NF4 base, forward and every gradient:
no non-finite value wherever the float64 result fits in fp16, the error against float64 within fp16's bound, and
never more non-finite outputs than peft's order of operations (``B(A x) · s``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import FLOOR, rel_error
from torch import nn

from fastlora.kernels.lora_ref import lora_linear_ref
from fastlora.modules.lora import FastLoRALinear
from fastlora.ops import lora_linear
from fastlora.quant import dequantize_4bit, quantize_4bit

FP16 = torch.float16
# |exact| below this rounds to a finite fp16 even after the few ulps by which a sum in another order may differ
# (65504 is fp16's largest value; from 65520 on, round-to-nearest gives inf).
FITS = 65504 * (1 - 2**-8)
M, K, N = 16, 64, 48  # M = 16: the native GEMV's largest decode size

# name: (lora_alpha, r, |x|, |g|, B's scale (0: a fresh adapter), the issue's finding)
CASES = {
    # the issue's first repro: s = 256, |s·u| up to ~1.8e5 while the exact y stays below ~1000
    "alpha2048-r8-x300-freshB": (2048.0, 8, 300.0, 1e-2, 0.0),
    "alpha2048-r8-x300": (2048.0, 8, 300.0, 1e-2, 2e-3),
    # the issue's second: s = 2, |x| ≈ 2e4: some exact outputs overflow, the others must not
    "alpha16-r8-x2e4": (16.0, 8, 2e4, 1e-3, 0.35),
    # s < 1: gᵀu (up to ~1e6) overflows before s = 1/32 brings dB back into range
    "alpha1-r32-g1e3": (1.0, 32, 300.0, 1e3, 0.35),
}


def _signed(shape, low, high, gen):
    """Values of magnitude in [low, high) with random signs, float64."""
    mag = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, -mag, mag)


def _case(name, weight_kind):
    alpha, r, x_mag, g_mag, b_mag = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    bound = K**-0.5  # nn.Linear's (and a fresh A's) uniform bound
    w = ((torch.rand(N, K, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(FP16)
    a = ((torch.rand(r, K, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(FP16)
    b = ((torch.rand(N, r, generator=gen, dtype=torch.float64) * 2 - 1) * b_mag).to(FP16)
    bias = ((torch.rand(N, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(FP16)
    x = _signed((M, K), 0.5 * x_mag, 1.5 * x_mag, gen).to(FP16)
    g = _signed((M, N), 0.5 * g_mag, 1.5 * g_mag, gen).to(FP16)
    state, stored, w_exact = None, w, w.double()
    if weight_kind == "nf4":
        stored, state = quantize_4bit(w, "nf4", 64, True)
        w_exact = dequantize_4bit(stored, state, torch.float32).double()  # the base the kernels compute with
    return dict(x=x, w=stored, state=state, w_exact=w_exact, bias=bias, a=a, b=b, g=g, scale=alpha / r)


def _exact(c):
    """float64 output and gradients (dx, db, dA, dB) of the fp16 inputs."""
    leaves = [t.double().requires_grad_() for t in (c["x"], c["bias"], c["a"], c["b"])]
    y = lora_linear_ref(leaves[0], c["w_exact"], leaves[1], leaves[2], leaves[3], c["scale"])
    y.backward(c["g"].double())
    return y.detach(), [t.grad for t in leaves]


def _peft_order(c):
    """peft's order in fp16 (``base + B(A x) · s``, each op rounded to fp16): output and gradients."""
    leaves = [t.clone().requires_grad_() for t in (c["x"], c["bias"], c["a"], c["b"])]
    x, bias, a, b = leaves
    y = nn.functional.linear(x, c["w_exact"].to(FP16), bias) + (x @ a.T) @ b.T * c["scale"]
    y.backward(c["g"])
    return y.detach(), [t.grad for t in leaves]


def _ours(c, backend):
    leaves = [t.clone().requires_grad_() for t in (c["x"], c["bias"], c["a"], c["b"])]
    with warnings.catch_warnings():  # native: the backward has no native kernel and says so once
        warnings.simplefilter("ignore")
        y = lora_linear(*leaves[:1], c["w"], *leaves[1:], c["scale"], quant_state=c["state"], backend=backend)
        y.backward(c["g"])
    return y.detach(), [t.grad for t in leaves]


def _check(what, got, exact, peft):
    fits = exact.abs() < FITS
    assert got.dtype == FP16
    bad = ~torch.isfinite(got) & fits
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite values where the exact result fits fp16"
    # never worse than peft's order (which has its own overflows in some cases)
    assert int((~torch.isfinite(got)).sum()) <= int((~torch.isfinite(peft)).sum()), what
    if fits.any():
        err = rel_error(got[fits], exact[fits])
        assert err <= FLOOR[FP16], f"{what}: relative error {err:.2e} against float64 > {FLOOR[FP16]}"


def _params():
    for name in CASES:
        for backend in ("torch", "triton", "native"):
            for kind in ("dense", "nf4"):
                if backend == "native" and kind == "dense":
                    continue  # the native GEMV takes a 4-bit base
                yield pytest.param(name, backend, kind, id=f"{name}-{backend}-{kind}")


@pytest.mark.parametrize(("name", "backend", "weight_kind"), list(_params()))
def test_fp16_limits_forward_and_gradients(name, backend, weight_kind, native_ext_or_skip):
    if backend == "native":
        native_ext_or_skip()
    c = _case(name, weight_kind)
    exact_y, exact_grads = _exact(c)
    peft_y, peft_grads = _peft_order(c)
    y, grads = _ours(c, backend)
    _check("y", y, exact_y, peft_y)
    for what, got, want, peft in zip(("dx", "db", "dA", "dB"), grads, exact_grads, peft_grads, strict=True):
        _check(what, got, want, peft)


def test_the_issue_reproduces_with_the_scale_on_u():
    """The order fastlora used, ``(s·u) Bᵀ`` in fp16, gave most outputs inf/NaN in the first repro (528 of
    768 here; all of them in the issue's) and non-finite outputs where peft has none in the second, although
    every exact result fits (see the test above)."""
    c = _case("alpha2048-r8-x300-freshB", "dense")
    u = c["x"] @ c["a"].T
    old = nn.functional.linear(c["x"], c["w"], c["bias"]) + (u * c["scale"]) @ c["b"].T
    assert (~torch.isfinite(old)).float().mean() > 0.5
    exact, _ = _exact(c)
    assert exact.abs().max() < 1000
    c = _case("alpha16-r8-x2e4", "dense")
    u = c["x"] @ c["a"].T
    old = nn.functional.linear(c["x"], c["w"], c["bias"]) + (u * c["scale"]) @ c["b"].T
    peft, _ = _peft_order(c)
    assert int((~torch.isfinite(old)).sum()) > int((~torch.isfinite(peft)).sum())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fresh_module_at_alpha_2048_is_the_base(backend, monkeypatch):
    """The issue's repro through FastLoRALinear: a fresh adapter (B = 0) with lora_alpha 2048, r 8 and
    |x| ≈ 300 in fp16 gives the base layer's output (it gave NaN everywhere)."""
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    linear = nn.Linear(K, N).to(FP16)
    layer = FastLoRALinear.from_linear(linear, r=8, lora_alpha=2048)
    x = _signed((M, K), 150.0, 450.0, torch.Generator().manual_seed(0)).to(FP16).requires_grad_()
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, linear(x), rtol=2e-3, atol=0.5)
    y.backward(torch.full_like(y, 1e-2))
    for t in (x.grad, layer.lora_A.grad, layer.lora_B.grad):
        assert torch.isfinite(t).all()


@pytest.fixture
def native_ext_or_skip(request):
    """A callable that gets the native extension (building it like the native tests do) or skips."""

    def get():
        return request.getfixturevalue("native_ext")

    return get
