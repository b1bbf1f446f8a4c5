"""The adapter suite: the bottleneck adapter ``y = x + gelu(x W_downᵀ + b_down) W_upᵀ + b_up``, training passes.

    torch      the adapter a user writes: F.linear, exact-erf GELU, F.linear, residual add (autograd)
    fastlora   fastlora.ops.adapter.adapter_forward (the op FastAdapter calls): fused down GEMM + bias + GELU,
               up GEMM + bias + residual in one epilogue, fused backward (where the op exists)

x (M, d) and all four weights receive gradients; W_up is drawn non-zero so every gradient is non-trivial.

    FLOPs  fwd = 4Mdr                        bwd = 8Mdr   (g W_up, gᵀh, dz W_down, dzᵀx)
    bytes  fwd = x + y + weights + z         bwd = g + x + z + dx + weights + their gradients
           (z = the M×r pre-activation; weights = W_down, b_down, W_up, b_up)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fastlora.bench import guard
from fastlora.bench.cases import AdapterCase
from fastlora.bench.harness import Guarded, Skip, time_guarded
from fastlora.bench.layer import Impl, run_once
from fastlora.bench.records import Record
from fastlora.bench.timing import DEFAULT_TIMER, DTYPES, TimerConfig

IMPLS = ("torch", "fastlora")
REFERENCES = ("torch",)


def adapter_flops(m: int, d: int, r: int, pass_: str) -> int:
    fwd, bwd = 4 * m * d * r, 8 * m * d * r
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def adapter_bytes(m: int, d: int, r: int, itemsize: int, pass_: str) -> int:
    weights = (2 * d * r + r + d) * itemsize
    fwd = (2 * m * d + m * r) * itemsize + weights
    bwd = (3 * m * d + m * r) * itemsize + 2 * weights
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def make_weights(d: int, r: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(seed)

    def uniform(*shape: int, fan_in: int) -> torch.Tensor:
        return ((torch.rand(*shape, device=device, generator=gen) * 2 - 1) / math.sqrt(fan_in)).to(dtype)

    return {"w_down": uniform(r, d, fan_in=d), "b_down": uniform(r, fan_in=d),
            "w_up": uniform(d, r, fan_in=r), "b_up": uniform(d, fan_in=r)}  # fmt: skip


def _torch_adapter(x, w_down, b_down, w_up, b_up):
    return x + F.linear(F.gelu(F.linear(x, w_down, b_down)), w_up, b_up)


def build(name: str, weights: dict[str, torch.Tensor]) -> Impl:
    """Build adapter implementation ``name`` (one of :data:`IMPLS`); raises :class:`Skip`."""
    params = {"d" + key.replace("w_", "W_"): t.clone().requires_grad_() for key, t in weights.items()}
    args = tuple(params.values())  # dW_down, db_down, dW_up, db_up
    if name == "torch":
        return Impl(name, lambda x: _torch_adapter(x, *args), params, "adapter")
    if name == "fastlora":
        try:
            from fastlora.ops.adapter import adapter_forward
        except ImportError as e:
            raise Skip(f"fastlora.ops.adapter is not available ({e})") from e
        return Impl(name, lambda x: adapter_forward(x, *args, activation="gelu"), params, "adapter")
    raise ValueError(f"fastlora bench: unknown adapter implementation {name!r}; expected one of {IMPLS}")


def reference(weights: dict[str, torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """y, dx and the four weight gradients in the reference dtype."""
    rd = guard.reference_dtype(x.dtype)
    with guard.no_tf32():
        impl = build("torch", {k: v.to(rd) for k, v in weights.items()})
        xr = x.detach().to(rd).requires_grad_()
        return run_once(impl, xr, g.to(rd))


def _counts(case: AdapterCase, pass_: str) -> tuple[int, int]:
    itemsize = DTYPES[case.dtype].itemsize
    return adapter_flops(case.m, case.d, case.r, pass_), adapter_bytes(case.m, case.d, case.r, itemsize, pass_)


def guarded(
    case: AdapterCase,
    name: str,
    *,
    cuda: bool,
    passes: Sequence[str] = ("fwd", "bwd", "fwd+bwd"),
    cache: dict | None = None,
) -> Guarded:
    """Build adapter ``name`` for ``case``, check y and the five gradients, return the timed callables.

    Raises:
        Skip: it cannot run here.  WrongResult: its output or a gradient is wrong.
    """
    from fastlora.bench.layer import timed_passes

    device, dtype = ("cuda" if cuda else "cpu"), DTYPES[case.dtype]
    cache = {} if cache is None else cache
    if "weights" not in cache:
        cache["weights"] = make_weights(case.d, case.r, dtype, device)
        gen = torch.Generator(device).manual_seed(case.m)
        cache["x"] = torch.randn(case.m, case.d, device=device, generator=gen).to(dtype).requires_grad_()
        cache["g"] = torch.randn(case.m, case.d, device=device, generator=gen).to(dtype)
    weights, x, g = cache["weights"], cache["x"], cache["g"]
    impl = build(name, weights)
    if "ref" not in cache:
        cache["ref"] = reference(weights, x, g)
        cache["baseline"] = guard.baseline(run_once(build("torch", weights), x, g), cache["ref"])
    errors = guard.check(name, run_once(impl, x, g), cache["ref"], dtype, cache["baseline"])
    counts = {p: _counts(case, p) for p in passes}
    return Guarded(timed_passes(impl, x, g, passes), [x, *impl.params.values()], counts, errors)


def run(
    cases: Sequence[AdapterCase],
    *,
    cuda: bool,
    timer: TimerConfig = DEFAULT_TIMER,
    passes: Sequence[str] = ("fwd", "bwd", "fwd+bwd"),
    impls: Sequence[str] = IMPLS,
    on_record: Callable[[Record], None] = lambda r: None,
) -> list[Record]:
    """Run the adapter suite: guard each implementation's output and five gradients, then time each pass."""
    records = []
    for case in cases:
        cache: dict = {}
        for name in impls:
            base = dict(suite="adapter", case=case.id, impl=name, shape=case.shape, m=case.m, r=case.r)
            base["dtype"] = case.dtype
            make = functools.partial(guarded, case, name, cuda=cuda, passes=passes, cache=cache)
            for rec in time_guarded(base, passes, make, cuda=cuda, timer=timer):
                records.append(rec)
                on_record(rec)
        del cache
        if cuda:
            torch.cuda.empty_cache()
    return records
