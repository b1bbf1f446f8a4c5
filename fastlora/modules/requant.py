"""Error-compensated 4-bit re-quantisation (LoftQ's alternation, Li et al. 2023), used by
``FastLoRALinear.merge(requantize=True, refit_rank=k)`` and by the LoftQ start (methods/lora/init.py).

Given a float W (N, K): Q = quant(W − L R), L R = best rank-k fit of W − dequant(Q), ``iters`` times, so that
dequant(Q) + L R ≈ W better than dequant(quant(W)) alone (k = 0: the plain re-quantisation).
"""

from __future__ import annotations

import torch

from fastlora.quant import QuantState, dequantize_4bit, quantize_4bit


def rank_fit(res: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (N, r), R (r, K)) fp32 with L R the best rank-r fit of res (N, K): L = U_r √S_r, R = √S_r V_rᵀ."""
    u, s, vh = torch.linalg.svd(res.float(), full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root[None, :], root[:, None] * vh[:r]


@torch.no_grad()
def quantize_with_residual(
    w: torch.Tensor,
    r: int,
    iters: int = 1,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, QuantState, torch.Tensor, torch.Tensor, list[float]]:
    """LoftQ's alternation on a float (N, K) weight.

    Args:
        w: (N, K) float (the target, used in fp32).  r: residual rank (0: plain quantisation, no L R).
        iters: alternations (>= 1).  quant_type, blocksize, double_quant: the 4-bit format.
        dtype: the dtype the 4-bit state records (default w's).

    Returns:
        (packed, state, L (N, r) fp32, R (r, K) fp32, errors), ``errors[i]`` = ‖W − (dequant(Q_i) + L_i R_i)‖_F /
        ‖W‖_F after iteration i. The iterate returned is the one with the smallest error: the alternation is not
        monotone (a W that is nearly representable in 4 bits gets worse with every iteration).
    """
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"fastlora: the LoftQ iteration count must be an int >= 1, got {iters!r}")
    target, dtype = w.float(), dtype or w.dtype
    n, k = target.shape
    lo, ro = target.new_zeros((n, 0)), target.new_zeros((0, k))
    errors: list[float] = []
    best = None
    for _ in range(iters if r > 0 else 1):
        packed, state = quantize_4bit((target - lo @ ro).to(dtype), quant_type, blocksize, double_quant)
        res = target - dequantize_4bit(packed, state, torch.float32)
        if r > 0:
            lo, ro = rank_fit(res, r)
        errors.append(((res - lo @ ro).norm() / target.norm().clamp_min(1e-30)).item())
        if best is None or errors[-1] < best[0]:
            best = (errors[-1], packed, state, lo, ro)
    _, packed, state, lo, ro = best
    return packed, state, lo, ro, errors


@torch.no_grad()
def requantize_merged(
    merged: torch.Tensor,
    state: QuantState,
    refit_rank: int = 0,
    refit_iters: int = 1,
    sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, QuantState, tuple[torch.Tensor, torch.Tensor] | None, dict[str, float]]:
    """Re-quantise a merged fp32 (N, K) weight in ``state``'s format, optionally with a rank-``refit_rank`` residual.

    Returns:
        (packed, new_state, residual, report): residual None or (R (k, K), L (N, k)) fp32, so the layer computes
        x dequant(Q)ᵀ + (x Rᵀ) Lᵀ; report: "requant_max_abs_error", "requant_rel_error" (the plain
        re-quantisation), with a refit "refit_rel_error" (‖W − (Q + L R)‖ / ‖W‖), and with ``sample`` (M, K)
        "sample_rel_error_before" / "sample_rel_error_after": ‖x Ŵᵀ − x Wᵀ‖ / ‖x Wᵀ‖ without and with the refit.
    """
    if not isinstance(refit_rank, int) or refit_rank < 0 or refit_rank > min(merged.shape):
        raise ValueError(f"FastLoRALinear.merge: refit_rank must be an int in [0, {min(merged.shape)}], "
                         f"got {refit_rank!r}")  # fmt: skip
    fmt = dict(quant_type=state.quant_type, blocksize=state.blocksize, double_quant=state.nested is not None,
               dtype=state.dtype)  # fmt: skip
    packed, new_state, _, _, _ = quantize_with_residual(merged, 0, **fmt)
    plain = dequantize_4bit(packed, new_state, torch.float32)
    err = plain - merged
    report = {"requant_max_abs_error": err.abs().max().item(), "requant_rel_error": (err.norm() / merged.norm()).item()}
    residual, approx = None, plain
    if refit_rank > 0:
        packed2, state2, lo, ro, errors = quantize_with_residual(merged, refit_rank, refit_iters, **fmt)
        report["refit_rel_error"] = min(errors)
        report["refit_kept"] = float(min(errors) < report["requant_rel_error"])
        if report["refit_kept"]:  # else the plain re-quantisation is the better weight: no residual
            packed, new_state, residual = packed2, state2, (ro.contiguous(), lo.contiguous())
            approx = dequantize_4bit(packed, new_state, torch.float32) + lo @ ro
    if sample is not None:
        x = sample.reshape(-1, merged.shape[1]).float()
        want = x @ merged.T
        report["sample_rel_error_before"] = ((x @ plain.T - want).norm() / want.norm()).item()
        report["sample_rel_error_after"] = ((x @ approx.T - want).norm() / want.norm()).item()
    return packed, new_state, residual, report
