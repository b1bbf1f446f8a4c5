"""Triton kernel: the bottleneck adapter's up-shaped GEMM, (M, R)·(R, N) -> (M, N), inner size R = r.

One kernel, a bias + residual epilogue, both directions (:mod:`fastlora.kernels.adapter` holds the
entry points; the reference is :mod:`fastlora.kernels.adapter_ref`):

- forward:  ``y  = res + h W_upᵀ + b_up``;
- backward: ``dx = g + dz W_down`` (serial form; the parallel form has no g term).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora import _alloc, dispatch
from fastlora.kernels.primitives import check_float, launch, mma, round_like
from fastlora.kernels.specs import TL_POINTER, KernelSpec, register


@triton.jit
def _adapter_up_kernel(
    p_ptr,  # (M, R): h (forward) or dz (backward)
    l_ptr,  # L (R, N) read through strides: W_upᵀ (forward) or W_down (backward)
    bias_ptr,  # (N,) b_up (forward)
    res_ptr,  # (M, N): the residual (forward) or g (backward, serial form)
    out_ptr,  # (M, N)
    M,
    N,
    R,
    M_BUCKET,  # autotuning key only: next power of two of M
    stride_pm,
    stride_pr,
    stride_lr,
    stride_ln,
    stride_resm,
    stride_resn,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BR: tl.constexpr,
):
    # N tiles fastest: programs sharing one block of rows of p run together. L (R×N) is small
    # and stays in L2, so no grouped ordering is needed.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BN)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    # 64-bit row base, 32-bit offsets inside the tile: per-element 64-bit pointers cost registers
    row0 = (pid_m * BM).to(tl.int64)
    lm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask = lm < M - row0
    n_mask = rn < N

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        r_mask = rr < R
        p = tl.load(
            p_ptr + row0 * stride_pm + lm[:, None] * stride_pm + rr[None, :] * stride_pr,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        lw = tl.load(
            l_ptr + rr[:, None] * stride_lr + rn[None, :] * stride_ln,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = mma(p, lw, acc, FP32_DOT)

    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        res_rows = res_ptr + row0 * stride_resm
        res = tl.load(res_rows + lm[:, None] * stride_resm + rn[None, :] * stride_resn, mask=mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(
        out_ptr + row0 * stride_om + lm[:, None] * stride_om + rn[None, :] * stride_on,
        round_like(acc, out_ptr).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


# Tuning configs. The kernel is memory-bound at adapter ranks (~r FLOPs per element of the output
# written), so tiles are chosen for occupancy; fp32 runs IEEE FMA dots (no TF32), so smaller tiles.
# Every config compiles without a spill for every r step on sm_80 and sm_90 (tests/test_aot.py). The
# register budget, measured with `python -m fastlora.aot`: a 128x128 tile spills on sm_90 even with
# 32-bit in-tile offsets, so 64x128 on 8 warps; an inner r step of 64 puts 64x128 tiles at 253 of
# 255 registers and fp32 FMA dots at 3.8 KB of stack on sm_80, so the inner step is at most 32
# (r = 64: two steps).
# Under the interpreter one small config runs (triton.autotune with several configs fails there).
UP_R_STEPS = (16, 32)  # the inner r step: next power of two of r, >= 16 (tensor-core K), <= 32
UP_TC_CONFIGS = [
    triton.Config({"BM": 64, "BN": 128}, num_warps=8, num_stages=2),
    triton.Config({"BM": 16, "BN": 64}, num_warps=4, num_stages=2),
]
UP_FP32_CONFIGS = [triton.Config({"BM": 16, "BN": 64}, num_warps=4, num_stages=2)]
UP_INTERPRETER_CONFIG = triton.Config({"BM": 16, "BN": 32}, num_warps=4, num_stages=1)
_UP_KEY = ["M_BUCKET", "N", "R", "HAS_BIAS", "HAS_RES", "BR"]


def up_configs_for(dtype: torch.dtype) -> list[triton.Config]:
    """The configs the up-kernel launcher may pick for ``dtype`` (all compiled ahead of time in CI)."""
    return UP_FP32_CONFIGS if dtype == torch.float32 else UP_TC_CONFIGS


def up_r_step(r: int) -> int:
    """The up kernel's inner step over r: 16 or 32 (larger r loops)."""
    return min(max(triton.next_power_of_2(r), UP_R_STEPS[0]), UP_R_STEPS[-1])


def up_gemm(
    p: torch.Tensor,
    lw: torch.Tensor,
    l_strides: tuple[int, int],
    n: int,
    bias: torch.Tensor | None,
    res: torch.Tensor | None,
) -> torch.Tensor:
    """out (M, n) = p · L + bias + res; see :func:`_adapter_up_kernel`.

    Args:
        p: (M, r) h (forward) or dz (backward), any strides.
        lw: W_up (n, r) (forward) or W_down (r, n) (backward), read as L (r, n) through ``l_strides``.
        bias: (n,) b_up (forward) or None.
        res: (M, n) the residual (forward), g (backward, serial form) or None, any strides.

    Returns:
        (M, n) contiguous, in p's dtype.
    """
    check_float(p, "fastlora adapter")
    m, r = p.shape
    out = _alloc.empty((m, n), dtype=p.dtype, device=p.device)
    if m == 0:
        return out
    args = (
        p,
        lw,
        bias if bias is not None else out,
        res if res is not None else out,
        out,
        m,
        n,
        r,
        triton.next_power_of_2(m),
        p.stride(0),
        p.stride(1),
        *l_strides,
        res.stride(0) if res is not None else 0,
        res.stride(1) if res is not None else 0,
        out.stride(0),
        out.stride(1),
    )
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_RES": res is not None,
        "FP32_DOT": p.dtype == torch.float32 or dispatch.interpreting(),
        "BR": up_r_step(r),
    }
    launch(
        _adapter_up_kernel,
        lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),),
        args,
        flags,
        configs=up_configs_for(p.dtype),
        key=_UP_KEY,
        interpreter_config=UP_INTERPRETER_CONFIG,
    )
    return out


def _register_aot_specs() -> None:
    """Every config x inner r step x direction."""
    ints = ("M", "N", "R", "M_BUCKET", "stride_pm", "stride_pr", "stride_lr", "stride_ln")
    ints += ("stride_resm", "stride_resn", "stride_om", "stride_on")
    flags = ("HAS_BIAS", "HAS_RES", "FP32_DOT", "BM", "BN", "BR")
    for dtype, p in TL_POINTER.items():
        fp32 = dtype == torch.float32
        dt = str(dtype)[6:]
        signature = {
            **dict.fromkeys(("p_ptr", "l_ptr", "bias_ptr", "res_ptr", "out_ptr"), p),
            **dict.fromkeys(ints, "i32"),
            **dict.fromkeys(flags, "constexpr"),
        }
        for backward in (False, True):
            for i, cfg in enumerate(up_configs_for(dtype)):
                for br in UP_R_STEPS:
                    register(
                        KernelSpec(
                            name=f"adapter_up[{dt},{'dx' if backward else 'fwd'},BR={br},cfg{i}]",
                            fn=_adapter_up_kernel,
                            signature=signature,
                            constexprs={
                                "HAS_BIAS": not backward,
                                "HAS_RES": True,
                                "FP32_DOT": fp32,
                                "BR": br,
                                **cfg.kwargs,
                            },
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            tensor_core=not fp32 and cfg.kwargs["BM"] >= 64,
                        )
                    )


_register_aot_specs()
