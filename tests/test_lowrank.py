"""The low-rank LoRA kernels (fastlora.kernels.lowrank) against their float64 reference (lowrank_ref).

Odd shapes: M in {1, 17, 130} (one row, a partial tile, several row blocks and split chunks), K and N
odd and not multiples of any tile, r in {1, 8, 33} (masked below the 16-wide tile, and two r steps /
a second r tile beyond it), every dtype, p in {0, 0.1}; outputs poisoned (conftest).
"""

import inspect

import pytest
import torch
from helpers import DTYPES, FLOOR, id_formatter, rel_error

from fastlora.kernels import lowrank, lowrank_ref

SHAPES = [(1, 45, 37, 8), (17, 83, 75, 1), (130, 53, 70, 33)]  # (M, K, N, r)
PS = [0.0, 0.1]
TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32 against float64


def _check(name, got, ref, own, dtype):
    assert got.dtype == dtype and got.shape == ref.shape, name
    assert not torch.isnan(got).any(), f"{name}: NaN (an output left unwritten?)"
    err, base = rel_error(got, ref), rel_error(own, ref)
    assert err <= 2 * base + FLOOR[dtype], f"{name}: rel error {err:.2e} > 2 x torch's {base:.2e} + {FLOOR[dtype]}"


def _inputs(m, k, n, r, dtype):
    """x, A, B, u, v, g, bias rounded to dtype (the float64 reference sees the same values)."""
    ts = [torch.randn(m, k), torch.randn(r, k) / k**0.5, torch.randn(n, r) / r**0.5, torch.randn(m, r),
          torch.randn(m, r), torch.randn(m, n), torch.randn(n)]  # fmt: skip
    return [t.to(dtype) for t in ts]


@pytest.mark.parametrize("p", PS, ids=id_formatter("p"))
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("shape", SHAPES, ids=id_formatter("MKNr"))
def test_lowrank_kernels_match_float64_reference(shape, dtype, p):
    m, k, n, r = shape
    x, a, b, u, v, g, bias = _inputs(m, k, n, r, dtype)
    seed, s = 1234 + m, 0.75

    def both(fn, *args, **kw):
        """(float64 reference, torch in dtype) of reference fn."""
        ref = fn(*(t.double() if isinstance(t, torch.Tensor) else t for t in args), **kw)
        return ref, fn(*args, **kw)

    _check("u", lowrank.lora_down(x, a, p, seed), *both(lowrank_ref.lora_down, x, a, p, seed), dtype)
    # forward's L = Bᵀ (a transposed view) with bias; dx's L = A with the mask over the output
    got = lowrank.lora_up(u, b.T, s, bias)
    _check("up fwd", got, *both(lowrank_ref.lora_up, u, b.T, s, bias), dtype)
    got = lowrank.lora_up(v, a, 1.0, None, p, seed)
    _check("up dx", got, *both(lowrank_ref.lora_up, v, a, 1.0, None, p, seed), dtype)
    gv, gdb = lowrank.lora_grads(g, b, u, s)
    (rv, rdb), (ov, odb) = both(lowrank_ref.lora_grads, g, b, u, s)
    _check("v", gv, rv, ov, dtype)
    _check("grad_b", gdb, rdb, odb, dtype)
    _check("grad_a", lowrank.lora_grad_a(v, x, p, seed), *both(lowrank_ref.lora_grad_a, v, x, p, seed), dtype)


def test_strided_inputs_and_out_buffer():
    """Row strides wider than the row, column-major operands (read through their strides), and ``out`` a view
    into a wider buffer whose other columns stay untouched."""
    m, k, n, r, p, seed = 9, 40, 23, 8, 0.1, 5
    xw = torch.randn(m, k + 7)[:, :k]
    a = torch.randn(k, r).T  # (r, K), column stride r
    u = lowrank.lora_down(xw, a, p, seed)
    torch.testing.assert_close(u.double(), lowrank_ref.lora_down(xw.double(), a.double(), p, seed), **TOL)
    buf, l, bias = torch.zeros(m, n + 5), torch.randn(n, r).T, torch.randn(n)
    got = lowrank.lora_up(u, l, 2.0, bias, out=buf[:, 2 : 2 + n])
    assert got.data_ptr() == buf[:, 2:].data_ptr()
    torch.testing.assert_close(got.double(), lowrank_ref.lora_up(u.double(), l.double(), 2.0, bias.double()), **TOL)
    assert not buf[:, :2].any() and not buf[:, 2 + n :].any()
    g, bb = torch.randn(n, m).T, torch.randn(r, n).T  # column-major g and B
    want = lowrank_ref.lora_grads(g.double(), bb.double(), u.double(), 0.5)
    for one, ref in zip(lowrank.lora_grads(g, bb, u, 0.5), want, strict=True):
        torch.testing.assert_close(one.double(), ref, **TOL)


def test_dropout_acts_and_follows_the_seed():
    x, a = torch.randn(17, 45), torch.randn(8, 45)
    u0, u1, u1b, u2 = (lowrank.lora_down(x, a, p, s) for p, s in ((0.0, 1), (0.1, 1), (0.1, 1), (0.1, 2)))
    assert torch.equal(u1, u1b) and not torch.allclose(u0, u1) and not torch.allclose(u1, u2)


def test_reductions_are_bit_reproducible_and_split():
    """Two runs give equal bits, and the shapes used do split: several dB row blocks and v chunks
    (lora_grads) and several M chunks (lora_grad_a), each summed in a fixed order."""
    m, n, k, r = 130, 70, 53, 33
    g, b, u, v, x = torch.randn(m, n), torch.randn(n, r), torch.randn(m, r), torch.randn(m, r), torch.randn(m, k)
    kind = lowrank._kind(g.dtype)
    blocks = -(-m // lowrank.GRADS_BM[kind])
    assert blocks > 1 and lowrank._splits(n, blocks * 2, lowrank.CHUNK_ALIGN[kind])[1] > 1
    assert lowrank._splits(m, 2 * 2, lowrank.CHUNK_ALIGN[kind])[1] > 1
    first = (*lowrank.lora_grads(g, b, u, 0.5), lowrank.lora_grad_a(v, x, 0.1, 3))
    second = (*lowrank.lora_grads(g, b, u, 0.5), lowrank.lora_grad_a(v, x, 0.1, 3))
    for one, two in zip(first, second, strict=True):
        assert torch.equal(one, two)


def test_lora_grads_reads_g_once(monkeypatch):
    """One pass over g for r <= 64: a single launch of the main kernel whose grid has one r tile, so each
    element of g belongs to exactly one program (its row block x its N chunk), which loads it once and
    feeds both products from that load (the kernel's loop has one load of g). The other launches are the
    fixed-order sums over fp32 partials, which never touch g."""
    launches = []
    real = lowrank.launch

    def spy(kernel, grid, args, flags, **kw):
        launches.append((kernel, grid(kw["interpreter_config"].kwargs), args))
        return real(kernel, grid, args, flags, **kw)

    monkeypatch.setattr(lowrank, "launch", spy)
    g = torch.randn(130, 70)
    lowrank.lora_grads(g, torch.randn(70, 33), torch.randn(130, 33), 1.0)
    main = [(grid, args) for kernel, grid, args in launches if kernel is lowrank._lora_grads_kernel]
    assert len(main) == 1 and main[0][0][2] == 1
    assert all(args[0] is not g for kernel, _, args in launches if kernel is lowrank._sum_partials_kernel)
    src = inspect.getsource(lowrank._lora_grads_kernel.fn)
    assert src.count("g_rows") == 2 and src.count("_load(g_rows") == 1  # one load of g, in the loop


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="lora_down"):
        lowrank.lora_down(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="lora_grads"):
        lowrank.lora_grads(torch.randn(3, 4), torch.randn(4, 2), torch.randn(3, 3), 1.0)
    with pytest.raises(TypeError):
        lowrank.lora_up(torch.randn(3, 2).double(), torch.randn(2, 4).double())


def test_rank_beyond_one_r_tile():
    """r = 100: two r tiles (64 + a masked 36), a grid dimension in lora_down/lora_grads/lora_grad_a and two
    inner steps in lora_up; fp32 with dropout."""
    m, k, n, r, p, seed = 9, 40, 23, 100, 0.1, 3
    x, a, b, u, v, g = (torch.randn(*s) for s in ((m, k), (r, k), (n, r), (m, r), (m, r), (m, n)))
    d = [t.double() for t in (x, a, b, u, v, g)]
    pairs = [(lowrank.lora_down(x, a, p, seed), lowrank_ref.lora_down(d[0], d[1], p, seed)),
             (lowrank.lora_up(u, b.T, 0.5, None, p, seed), lowrank_ref.lora_up(d[3], d[2].T, 0.5, None, p, seed)),
             *zip(lowrank.lora_grads(g, b, u, 0.5), lowrank_ref.lora_grads(d[5], d[2], d[3], 0.5), strict=True),
             (lowrank.lora_grad_a(v, x, p, seed), lowrank_ref.lora_grad_a(d[4], d[0], p, seed))]  # fmt: skip
    for got, want in pairs:
        torch.testing.assert_close(got.double(), want, **TOL)
