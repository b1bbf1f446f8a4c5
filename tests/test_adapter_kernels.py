"""The fused bottleneck-adapter kernels, op and FastAdapter module against the float64 reference."""

import math

import pytest
import torch
from helpers import DTYPES, FLOOR, id_formatter, rel_error
from torch import nn

from fastlora.functional import ACTIVATIONS, activation_grad, apply_activation
from fastlora.kernels.adapter import adapter_down_triton, adapter_dx_triton, adapter_dz_triton, adapter_up_triton
from fastlora.kernels.adapter_down import r_tile
from fastlora.kernels.adapter_ref import adapter_ref
from fastlora.kernels.adapter_up import up_r_step
from fastlora.modules import FastAdapter
from fastlora.ops.adapter import adapter_forward

# (M, d, r, form): M in {1, 3, 17, 257}; d never a multiple of the 32/64-wide tiles; r in {1, 8, 64} and
# r = 100 (two r tiles: a grid dimension in the down kernel, two inner steps in the up kernel).
SHAPES = [(1, 40, 8, "serial"), (3, 53, 1, "parallel"), (17, 83, 64, "serial"), (257, 45, 8, "parallel"),
          (5, 130, 100, "parallel")]  # fmt: skip
NAMES = ("x", "w_down", "b_down", "w_up", "b_up", "residual")


def _leaves(m, d, r, parallel, scale_up=1.0):
    """Fresh random inputs of a well-conditioned adapter (z of order 1, a delta of order x)."""
    return [
        torch.randn(m, d),
        torch.randn(r, d) / d**0.5,
        torch.randn(r) * 0.5,
        torch.randn(d, r) * scale_up / r**0.5,
        torch.randn(d) * 0.1,
        torch.randn(m, d) if parallel else None,
    ]


def _check(name, got, ref, torch_same_dtype, dtype):
    assert not torch.isnan(got).any(), f"{name}: NaN (an output left unwritten?)"
    err, base = rel_error(got, ref), rel_error(torch_same_dtype, ref)
    assert err <= 2 * base + FLOOR[dtype], f"{name}: rel error {err:.2e} > 2 x torch's {base:.2e} + {FLOOR[dtype]}"


def _grads(leaves, dtype, fn, g):
    """Cast leaves to dtype, run fn, backprop g; returns (y, leaves with .grad)."""
    own = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in leaves]
    y = fn(*own)
    y.backward(g.to(y.dtype))
    return y, own


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("shape", SHAPES, ids=id_formatter("MdR"))
def test_fused_adapter_matches_float64_reference(shape, dtype, activation):
    m, d, r, form = shape
    leaves = _leaves(m, d, r, form == "parallel")
    g = torch.randn(m, d)

    def fused(x, wd, bd, wu, bu, res):
        return adapter_forward(x, wd, bd, wu, bu, activation, res, backend="triton")

    def ref(x, wd, bd, wu, bu, res):
        return adapter_ref(x, wd, bd, wu, bu, activation, res)

    y, got = _grads(leaves, dtype, fused, g)
    # float64 reference on the same (rounded) inputs, and PyTorch's own result in the same dtype
    y_ref, want = _grads([t.to(dtype) if t is not None else None for t in leaves], torch.float64, ref, g)
    y_own, own = _grads(leaves, dtype, ref, g)

    assert y.dtype == dtype and y.shape == (m, d)
    _check("y", y, y_ref, y_own, dtype)
    for name, a, b, c in zip(NAMES, got, want, own, strict=True):
        if a is None:
            continue
        assert a.grad is not None and a.grad.dtype == dtype, name
        _check(f"d{name}", a.grad, b.grad, c.grad, dtype)


def test_each_kernel_writes_every_output():
    """Every output of each launcher against its float64 formula, at odd shapes, on poisoned buffers."""
    m, d, r, act = 19, 37, 5, "silu"
    x, wd, bd, wu, bu, _ = _leaves(m, d, r, False)
    g, res = torch.randn(m, d), torch.randn(m, d)
    z64 = x.double() @ wd.double().T + bd.double()
    h, z = adapter_down_triton(x, wd, bd, act, store_z=True)
    torch.testing.assert_close(z.double(), z64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), apply_activation(z64, act), rtol=1e-5, atol=1e-5)
    h_only, no_z = adapter_down_triton(x, wd, bd, act, store_z=False)
    assert no_z is None and torch.equal(h_only, h)
    y = adapter_up_triton(h, wu, bu, res)
    torch.testing.assert_close(y.double(), res.double() + h.double() @ wu.double().T + bu.double(), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    dz, h_again = adapter_dz_triton(g, wu, z, act)
    torch.testing.assert_close(dz.double(), (g.double() @ wu.double()) * activation_grad(z.double(), act), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    assert torch.equal(h_again, h)  # the backward recomputes exactly the forward's h from the saved z
    dx = adapter_dx_triton(dz, wd, g)
    torch.testing.assert_close(dx.double(), g.double() + dz.double() @ wd.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter_dx_triton(dz, wd, None).double(), dz.double() @ wd.double(), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    assert r_tile(1) == 16 and r_tile(17) == 32 and r_tile(64) == 64 and r_tile(100) == 64
    assert up_r_step(1) == 16 and up_r_step(17) == 32 and up_r_step(100) == 32


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_grad_closed_form(activation):
    z = torch.cat([torch.linspace(-8, 8, 401, dtype=torch.float64), torch.tensor([0.0, 1e-3, -1e-3, 30.0, -30.0])])
    z = z.double().requires_grad_()
    module = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU("tanh"), "silu": nn.SiLU()}[activation]
    h = apply_activation(z, activation)
    assert torch.equal(h, module(z))
    (grad,) = torch.autograd.grad(h.sum(), z)
    torch.testing.assert_close(activation_grad(z.detach(), activation), grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["serial", "parallel"])
def test_torch_backend_gradcheck(form):
    """The hand-written backward (torch path) is the derivative of the forward, dropout included."""
    leaves = [t.double().requires_grad_() if t is not None else None for t in _leaves(4, 7, 3, form == "parallel")]
    for activation in ACTIVATIONS:

        def fn(*args, activation=activation):
            return adapter_forward(*args[:5], activation, args[5], "torch", dropout_p=0.25, seed=11)

        assert torch.autograd.gradcheck(fn, tuple(leaves)), activation


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_acts_on_the_bottleneck(backend):
    m, d, r, p, seed = 9, 24, 6, 0.4, 1234
    leaves = _leaves(m, d, r, False)
    g = torch.randn(m, d)

    def fused(*t, p=p):
        return adapter_forward(*t[:5], "gelu", t[5], backend, dropout_p=p, seed=seed)

    def ref(*t):
        return adapter_ref(*t[:5], "gelu", t[5], p, seed)

    y, got = _grads(leaves, torch.float32, fused, g)
    y_ref, want = _grads(leaves, torch.float64, ref, g)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(NAMES[:5], got, want, strict=False):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-5, msg=name)
    y0, _ = _grads(leaves, torch.float32, lambda *t: fused(*t, p=0.0), g)
    assert not torch.allclose(y.detach(), y0.detach(), atol=1e-3)  # dropout really acts


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_without_biases(backend):
    m, d, r = 7, 29, 3
    x, wd, _, wu, _, res = _leaves(m, d, r, True)
    g = torch.randn(m, d)
    y, got = _grads([x, wd, wu, res], torch.float32,
                    lambda x, wd, wu, res: adapter_forward(x, wd, None, wu, None, "silu", res, backend), g)  # fmt: skip
    y_ref, want = _grads([x, wd, wu, res], torch.float64,
                         lambda x, wd, wu, res: adapter_ref(x, wd, None, wu, None, "silu", res), g)  # fmt: skip
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "w_down", "w_up", "residual"), got, want, strict=True):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_leading_dims_non_contiguous_and_empty():
    d, r = 33, 4
    _, wd, bd, wu, bu, _ = _leaves(6, d, r, False)
    x = torch.randn(2, d, 3).transpose(1, 2)  # (2, 3, d), last dim strided
    res = torch.randn(3, 2, d).transpose(0, 1)  # (2, 3, d), rows strided
    for residual in (None, res):
        y = adapter_forward(x, wd, bd, wu, bu, "gelu_tanh", residual, backend="triton")
        ref = adapter_ref(*(t.double() if t is not None else None for t in (x, wd, bd, wu, bu)), "gelu_tanh",
                          residual.double() if residual is not None else None)  # fmt: skip
        assert y.shape == (2, 3, d)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for backend in ("torch", "triton"):  # no tokens: empty output, zero weight gradients
        params = [t.clone().requires_grad_() for t in (wd, bd, wu, bu)]
        y = adapter_forward(torch.randn(0, d), *params, "relu", backend=backend)
        y.sum().backward()
        assert y.shape == (0, d) and all(p.grad is not None and not p.grad.any() for p in params)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"w_down": torch.randn(4, 31)}, ValueError, r"w_down must have shape \(r, d\) = \(r, 32\)"),
        ({"w_up": torch.randn(32, 5)}, ValueError, r"w_up must have shape \(32, 4\) .* got \(32, 5\)"),
        ({"b_down": torch.randn(5)}, ValueError, r"b_down must have shape \(4,\)"),
        ({"b_up": torch.randn(31)}, ValueError, r"b_up must have shape \(32,\)"),
        ({"residual": torch.randn(3, 32)}, ValueError, r"residual must have shape \(2, 32\)"),
        ({"w_up": torch.randn(32, 4, dtype=torch.float16)}, TypeError, "w_up is torch.float16 but x is torch.float32"),
        ({"activation": "tanh"}, ValueError, "unknown activation 'tanh'; known activations: relu, gelu, gelu_tanh, "
         "silu"),
        ({"cast": torch.float64}, TypeError, "float64 on the torch backend"),
        ({"x": torch.ones(2, 32, dtype=torch.int32)}, TypeError, "w_down is torch.float32 but x is torch.int32"),
        ({"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
        ({"backend": "cutlass"}, ValueError, "backend must be one of"),
    ],
    ids=["w_down", "w_up", "b_down", "b_up", "residual", "dtype", "activation", "float64-triton", "int", "dropout",
         "backend"],
)  # fmt: skip
def test_bad_inputs(change, error, match):
    args = {"x": torch.randn(2, 32), "w_down": torch.randn(4, 32), "b_down": torch.randn(4), "w_up": torch.randn(32, 4),
            "b_up": torch.randn(32), "activation": "gelu", "residual": None, "backend": "triton",
            "dropout_p": 0.0}  # fmt: skip
    cast = change.pop("cast", None) if "cast" in change else None
    args.update(change)
    if cast is not None:  # every tensor in one dtype the backend does not take
        args = {k: v.to(cast) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        adapter_forward(**args)


@pytest.mark.parametrize("form", ["serial", "parallel"])
def test_opcheck(form):
    """Schema, fake (meta) shapes, autograd registration and AOT dispatch of both custom ops."""
    x, wd, bd, wu, bu, res = _leaves(5, 12, 3, form == "parallel")
    args = (x.requires_grad_(), wd.requires_grad_(), bd.requires_grad_(), wu.requires_grad_(), bu.requires_grad_(),
            res, "gelu", 0.0, 0, True, "torch")  # fmt: skip
    torch.library.opcheck(torch.ops.fastlora.adapter, args)
    z = x.detach() @ wd.detach().T + bd.detach()
    bwd = (torch.randn(5, 12), x.detach(), wd.detach(), wu.detach(), z, "silu", 0.0, 0, form == "serial",
           [True, True, False, True, False], "torch")  # two unneeded outputs: distinct placeholders  # fmt: skip
    torch.library.opcheck(torch.ops.fastlora.adapter_backward, bwd)


# -- FastAdapter -----------------------------------------------------------------------------------


def test_fast_adapter_starts_as_the_identity():
    torch.manual_seed(3)
    adapter = FastAdapter(48, 6)
    assert not adapter.w_up.any() and not adapter.b_up.any()
    bound = 1 / math.sqrt(48)  # nn.Linear's init: kaiming_uniform(a=√5) gives U(±1/√fan_in)
    assert adapter.w_down.abs().max() <= bound and adapter.w_down.abs().max() > 0.9 * bound
    assert adapter.b_down.abs().max() <= bound and adapter.w_down.std() > 0.4 * bound
    x, res = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    assert torch.equal(adapter(x), x) and torch.equal(adapter(x, residual=res), res)
    adapter.backend = "triton"
    assert torch.equal(adapter(x), x) and torch.equal(adapter(x, residual=res), res)


@pytest.mark.parametrize("form", ["serial", "parallel"])
def test_fast_adapter_trains_and_backends_agree(form):
    adapter = FastAdapter(40, 8, activation="gelu_tanh")
    with torch.no_grad():
        adapter.w_up.normal_(0, 0.3)
        adapter.b_up.normal_(0, 0.1)
    x = torch.randn(3, 7, 40, requires_grad=True)
    res = torch.randn(3, 7, 40, requires_grad=True) if form == "parallel" else None
    results = {}
    for backend in ("torch", "triton"):
        adapter.backend = backend
        adapter.zero_grad()
        x.grad = None
        y = adapter(x, residual=res)
        (y * torch.linspace(-1, 1, 40)).sum().backward()
        results[backend] = [y.detach(), x.grad.clone(), *(p.grad.clone() for p in adapter.parameters())]
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_fast_adapter_casts_to_the_input_dtype():
    adapter = FastAdapter(32, 4)  # fp32 parameters (for the optimiser)
    with torch.no_grad():
        adapter.w_up.normal_()
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    y = adapter(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert adapter.w_down.grad.dtype == torch.float32 and adapter.w_up.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert adapter(torch.randn(6, 32)).dtype == torch.bfloat16
    adapter.eval()  # dropout only while training
    dropped = FastAdapter(32, 4, dropout=0.5).eval()
    assert torch.equal(dropped(x.float()), x.float())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 16, "r": 0}, r"r must be an int in \[1, d_model - 1\] = \[1, 15\]"),
        ({"d_model": 16, "r": 16}, r"r must be an int in \[1, d_model - 1\] = \[1, 15\] .* got 16"),
        ({"d_model": 16, "r": 2.0}, "r must be an int"),
        ({"d_model": 16, "r": 4, "activation": "swish"}, "unknown activation 'swish'; known activations: relu, gelu"),
        ({"d_model": 16, "r": 4, "dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ],
    ids=["r=0", "r=d", "float-r", "activation", "dropout"],
)
def test_fast_adapter_bad_hparams(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastAdapter(**kwargs)


def test_fast_adapter_bad_input():
    adapter = FastAdapter(16, 4)
    with pytest.raises(ValueError, match=r"input has shape \(2, 15\), expected \(\.\.\., 16\)"):
        adapter(torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"residual must have the input's shape \(2, 16\), got \(1, 16\)"):
        adapter(torch.randn(2, 16), residual=torch.randn(1, 16))
    with pytest.raises(TypeError, match="input must be float32/float16/bfloat16"):
        adapter(torch.ones(2, 16, dtype=torch.long))


# -- compiled kernels on a GPU (make test-gpu) -------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("shape", [(1, 4096, 64, "serial"), (4099, 1024, 8, "parallel"), (1000, 768, 100, "serial")],
                         ids=str)  # fmt: skip
def test_fused_adapter_on_gpu(shape, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 references without TF32
    m, d, r, form = shape
    leaves = [t.cuda() if t is not None else None for t in _leaves(m, d, r, form == "parallel")]
    g = torch.randn(m, d, device="cuda")
    y, got = _grads(leaves, dtype, lambda *t: adapter_forward(*t[:5], "gelu", t[5]), g)
    y_ref, want = _grads([t.to(dtype) if t is not None else None for t in leaves], torch.float64,
                         lambda *t: adapter_ref(*t[:5], "gelu", t[5]), g)  # fmt: skip
    y_own, own = _grads(leaves, dtype, lambda *t: adapter_ref(*t[:5], "gelu", t[5]), g)
    _check("y", y, y_ref, y_own, dtype)
    for name, a, b, c in zip(NAMES, got, want, own, strict=True):
        if a is not None:
            _check(f"d{name}", a.grad, b.grad, c.grad, dtype)
