"""The correctness guard: an implementation is compared with the reference before it is timed.

Every implementation's output (and, for training passes, every gradient) is compared with a reference
computed in higher precision on the same weights (fp32 with TF32 off for bf16/fp16 runs, float64 for
fp32 runs). Two errors per tensor, both relative to the reference:

    rel   = ||got - ref|| / ||ref||            (the bulk of the tensor)
    worst = max|got - ref| / max|ref|          (one wrong row or block cannot hide in the norm)

The bound follows the reference's own rounding, as flash-attention's tests do: at most twice the
error of plain PyTorch in the same dtype on the same inputs (``baseline``), and never below a floor
per dtype (bf16 1e-2, fp16 2e-3, fp32 1e-5 for ``rel``; 3x that for ``worst``, a single element's
rounding). A NaN, an Inf, a missing gradient or a wrong shape fails. A failing implementation is
reported as FAILED with the reason and is never timed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch

FLOORS = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
WORST_FACTOR = 3.0  # worst-element floor = 3x the norm floor
BASELINE_FACTOR = 2.0


class WrongResult(AssertionError):
    """An implementation's output or gradient is not the reference's within the bound."""


def errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(rel, worst) of ``got`` against ``ref`` (see the module docstring); NaN if ``got`` is not finite."""
    if ref.numel() == 0:
        return 0.0, 0.0
    if not torch.isfinite(got).all():
        return math.nan, math.nan
    diff = got.detach().to(ref.dtype) - ref
    ref_norm, ref_max = ref.norm().item(), ref.abs().max().item()
    rel = diff.norm().item() / ref_norm if ref_norm > 0 else diff.norm().item()
    worst = diff.abs().max().item() / ref_max if ref_max > 0 else diff.abs().max().item()
    return rel, worst


def bounds(dtype: torch.dtype, baseline: tuple[float, float] | None = None) -> tuple[float, float]:
    """(rel bound, worst bound) for ``dtype``: max(floor, 2 x the baseline's error)."""
    if dtype not in FLOORS:
        raise ValueError(f"fastlora bench: no tolerance for dtype {dtype}; expected one of {list(FLOORS)}")
    floor = FLOORS[dtype]
    rel_bound, worst_bound = floor, WORST_FACTOR * floor
    if baseline is not None:
        rel_bound = max(rel_bound, BASELINE_FACTOR * baseline[0])
        worst_bound = max(worst_bound, BASELINE_FACTOR * baseline[1])
    return rel_bound, worst_bound


def check(
    name: str,
    got: Mapping[str, torch.Tensor | None],
    ref: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    baseline: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, tuple[float, float]]:
    """Compare every tensor of ``ref`` with the one of the same key in ``got``.

    Args:
        name: the implementation, for the message.
        got: key -> tensor computed by the implementation ("y", "dx", "dA"...); None means "not computed".
        ref: key -> reference tensor (fp32 or float64).
        dtype: the dtype the implementation ran in (selects the floor).
        baseline: key -> (rel, worst) error of plain PyTorch in ``dtype`` against the same reference.

    Returns:
        key -> (rel, worst) errors, when every one is within its bound.

    Raises:
        WrongResult: naming the first tensor out of bounds, its errors and the bounds.
    """
    measured = {}
    for key, r in ref.items():
        t = got.get(key)
        if t is None:
            raise WrongResult(f"{name}: {key} was not computed (expected shape {tuple(r.shape)})")
        if tuple(t.shape) != tuple(r.shape):
            raise WrongResult(f"{name}: {key} has shape {tuple(t.shape)}, expected {tuple(r.shape)}")
        rel, worst = errors(t, r)
        rel_bound, worst_bound = bounds(dtype, None if baseline is None else baseline.get(key))
        if not (rel <= rel_bound and worst <= worst_bound):  # NaN fails too
            raise WrongResult(
                f"{name}: {key} differs from the reference: rel {rel:.2e} (bound {rel_bound:.1e}), "
                f"worst {worst:.2e} (bound {worst_bound:.1e})"
            )
        measured[key] = (rel, worst)
    return measured


def baseline(got: Mapping[str, torch.Tensor | None], ref: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """key -> (rel, worst) of plain PyTorch in the run dtype against the reference: the rounding to allow for.

    A non-finite or missing baseline tensor raises: the bound would be meaningless.
    """
    out = {}
    for key, r in ref.items():
        t = got.get(key)
        if t is None or tuple(t.shape) != tuple(r.shape):
            raise WrongResult(f"baseline: {key} missing or of the wrong shape")
        rel, worst = errors(t, r)
        if math.isnan(rel):
            raise WrongResult(f"baseline: plain PyTorch produced non-finite {key}; no bound can be set")
        out[key] = (rel, worst)
    return out


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype references are computed in: float64 for fp32 runs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float32 else torch.float32


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """References in fp32 must be fp32: TF32 off for matmuls and convolutions inside the block."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
