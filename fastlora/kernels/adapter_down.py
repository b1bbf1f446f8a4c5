"""Triton kernel: the bottleneck adapter's down-shaped GEMM, (M, K)·(K, R) -> (M, R), inner size K = d.

One kernel, an activation epilogue, both directions (:mod:`fastlora.kernels.adapter` holds the entry
points and why z is saved; the reference is :mod:`fastlora.kernels.adapter_ref`):

- forward:  ``z = x W_downᵀ + b_down``, writes ``h = act(z)`` and (training) ``z``;
- backward: ``dh = g W_up``, reads z, writes ``dz = dh ⊙ act'(z)`` and ``h = act(z)``.

The activations are those of :mod:`fastlora.functional`, evaluated in closed form in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora import _alloc, dispatch
from fastlora.functional import ACTIVATIONS, check_activation
from fastlora.kernels.primitives import check_float, launch, mma, round_like
from fastlora.kernels.specs import TL_POINTER, KernelSpec, register


@triton.jit
def _sigmoid(x):
    # spelled out: tl.sigmoid fails under the interpreter when called from a nested jit function
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(u):
    # tanh(u) = 2σ(2u) − 1: tl has no tanh (libdevice calls fail under the interpreter); absolute error ~1e-7
    return 2.0 * _sigmoid(2.0 * u) - 1.0


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z), fp32. ACT indexes ACTIVATIONS: 0 relu, 1 gelu (erf), 2 gelu_tanh, 3 silu.

    Constants are literals (√(2/π) = 0.79788..., 1/√2 = 0.70710..., 1/√(2π) = 0.39894...): a
    ``tl.constexpr`` global on the left of a tensor product yields a constexpr-wrapped tensor that
    the interpreter's math functions reject.
    """
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        return 0.5 * z * (1.0 + _tanh((z + 0.044715 * z * z * z) * 0.7978845608028654))
    else:
        return z * _sigmoid(z)


@triton.jit
def _act_and_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)), fp32, sharing the transcendental between the two."""
    if ACT == 0:
        return tl.maximum(z, 0.0), tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return z * cdf, cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        t = _tanh((z + 0.044715 * z * z * z) * 0.7978845608028654)
        grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * z * (1.0 + t), grad
    else:
        s = _sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))


@triton.jit
def _adapter_down_kernel(
    a_ptr,  # (M, K): x (forward) or g (backward), any strides
    v_ptr,  # V (K, R) read through strides: W_downᵀ (forward) or W_up (backward)
    bias_ptr,  # (R,) b_down (forward)
    z_ptr,  # (M, R) contiguous pre-activation: written (forward, STORE_Z) or read (backward)
    out_ptr,  # (M, R) contiguous: h = act(z) (forward) or dz = (a·V) ⊙ act'(z) (backward)
    h_ptr,  # (M, R) contiguous, backward: h = act(z) for dW_up
    M,
    R,
    K,
    M_BUCKET,  # autotuning key only: next power of two of M
    stride_am,
    stride_ak,
    stride_vk,
    stride_vr,
    ACT: tl.constexpr,
    BACKWARD: tl.constexpr,
    STORE_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BM: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
):
    # r tiles fastest: the programs sharing one block of rows of x (or g) run together and hit L2.
    pid = tl.program_id(0)
    num_pid_r = tl.cdiv(R, BR)
    pid_m = pid // num_pid_r
    pid_r = pid % num_pid_r

    # 64-bit row base, 32-bit offsets inside the tile: per-element 64-bit pointers cost registers
    row0 = (pid_m * BM).to(tl.int64)
    lm = tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    m_mask = lm < M - row0
    r_mask = rr < R
    a_rows = a_ptr + row0 * stride_am

    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        a = tl.load(
            a_rows + lm[:, None] * stride_am + rk[None, :] * stride_ak,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr + rk[:, None] * stride_vk + rr[None, :] * stride_vr,
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        acc = mma(a, v, acc, FP32_DOT)

    mask = m_mask[:, None] & r_mask[None, :]
    offs = lm[:, None] * R + rr[None, :]  # the (M, R) outputs are contiguous; rows from row0
    base = row0 * R
    if BACKWARD:
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        h, grad = _act_and_grad(z, ACT)
        tl.store(out_ptr + base + offs, round_like(acc * grad, out_ptr).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + base + offs, round_like(h, h_ptr).to(h_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rr, mask=r_mask, other=0.0).to(tl.float32)[None, :]
        z = round_like(acc, out_ptr)  # z as stored; h is the activation of exactly this z
        if STORE_Z:
            tl.store(z_ptr + base + offs, z.to(z_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + base + offs, round_like(_act(z, ACT), out_ptr).to(out_ptr.dtype.element_ty), mask=mask)


# Tuning configs. The kernel is memory-bound at adapter ranks (arithmetic intensity ~r FLOPs per
# element of x read), so tiles are chosen for occupancy: its grid is only cdiv(M, BM)·cdiv(r, BR)
# programs, hence BM = 64 (M = 4096 -> 64 programs) beside BM = 16 (256 programs, and decode sizes).
# fp32 runs IEEE FMA dots (no TF32), so smaller tiles.
# Every config compiles without a spill for every r tile on sm_80 and sm_90 (tests/test_aot.py). The
# register budget, measured with `python -m fastlora.aot`: the backward epilogue at BR = 64 (z, act,
# act', dz live together) spills at 4 warps (255 regs) and needs 8 (128 regs). The 16-row tile runs
# on 8 warps: on 4, ptxas caps some variants at 64 registers and spills on sm_90.
# Under the interpreter one small config runs (triton.autotune with several configs fails there).
R_TILES = (16, 32, 64)  # the r tile: next power of two of r, >= 16 (tensor-core N), <= 64
DOWN_TC_CONFIGS = [
    triton.Config({"BM": 64, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 16, "BK": 64}, num_warps=8, num_stages=3),
]
DOWN_FP32_CONFIGS = [triton.Config({"BM": 16, "BK": 32}, num_warps=4, num_stages=2)]
DOWN_INTERPRETER_CONFIG = triton.Config({"BM": 16, "BK": 32}, num_warps=4, num_stages=1)
_DOWN_KEY = ["M_BUCKET", "K", "R", "ACT", "BACKWARD", "STORE_Z", "BR"]


def down_configs_for(dtype: torch.dtype) -> list[triton.Config]:
    """The configs the down-kernel launcher may pick for ``dtype`` (all compiled ahead of time in CI)."""
    return DOWN_FP32_CONFIGS if dtype == torch.float32 else DOWN_TC_CONFIGS


def r_tile(r: int) -> int:
    """The down kernel's r tile for bottleneck size r: 16, 32 or 64 (r > 64 spreads over a grid dimension)."""
    return min(max(triton.next_power_of_2(r), R_TILES[0]), R_TILES[-1])


def down_gemm(
    a: torch.Tensor,
    v: torch.Tensor,
    v_strides: tuple[int, int],
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    activation: str,
    backward: bool,
    store_z: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out (M, R) [, h] = epilogue(a · V); see :func:`_adapter_down_kernel`.

    Args:
        a: (M, K) x (forward) or g (backward), any strides.
        v: W_down (r, K) (forward) or W_up (K, r) (backward), read as V (K, r) through ``v_strides``.
        bias: (r,) b_down (forward) or None.
        z: (M, r) contiguous pre-activation to write (forward, ``store_z``) or read (backward).
        activation: one of :data:`~fastlora.functional.ACTIVATIONS`.

    Returns:
        out (M, r): h (forward) or dz (backward); and h (M, r) in the backward, else None.
    """
    check_float(a, "fastlora adapter")
    check_activation(activation, where="fastlora adapter")
    m, k = a.shape
    r = v.shape[0] if not backward else v.shape[1]
    out = _alloc.empty((m, r), dtype=a.dtype, device=a.device)
    h = _alloc.empty((m, r), dtype=a.dtype, device=a.device) if backward else None
    if m == 0:
        return out, h
    br = r_tile(r)
    args = (
        a,
        v,
        bias if bias is not None else out,
        z if z is not None else out,
        out,
        h if h is not None else out,
        m,
        r,
        k,
        triton.next_power_of_2(m),
        a.stride(0),
        a.stride(1),
        *v_strides,
    )
    flags = {
        "ACT": ACTIVATIONS.index(activation),
        "BACKWARD": backward,
        "STORE_Z": store_z,
        "HAS_BIAS": bias is not None,
        "FP32_DOT": a.dtype == torch.float32 or dispatch.interpreting(),
        "BR": br,
    }
    launch(
        _adapter_down_kernel,
        lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(r, br),),
        args,
        flags,
        configs=down_configs_for(a.dtype),
        key=_DOWN_KEY,
        interpreter_config=DOWN_INTERPRETER_CONFIG,
    )
    return out, h


def _register_aot_specs() -> None:
    """Every config x r tile x direction for GELU (the default, and the heaviest epilogue); the other
    activations (their code differs only in the elementwise epilogue) in both directions on the
    largest-tile config with BR = 64, where register pressure peaks."""
    ints = ("M", "R", "K", "M_BUCKET", "stride_am", "stride_ak", "stride_vk", "stride_vr")
    flags = ("ACT", "BACKWARD", "STORE_Z", "HAS_BIAS", "FP32_DOT", "BM", "BR", "BK")
    for dtype, p in TL_POINTER.items():
        fp32 = dtype == torch.float32
        dt = str(dtype)[6:]
        signature = {
            **dict.fromkeys(("a_ptr", "v_ptr", "bias_ptr", "z_ptr", "out_ptr", "h_ptr"), p),
            **dict.fromkeys(ints, "i32"),
            **dict.fromkeys(flags, "constexpr"),
        }
        for act in ACTIVATIONS:
            for backward in (False, True):
                for i, cfg in enumerate(down_configs_for(dtype)):
                    for br in R_TILES:
                        if act != "gelu" and (i != 0 or br != R_TILES[-1]):
                            continue
                        register(
                            KernelSpec(
                                name=f"adapter_down[{dt},{act},{'bwd' if backward else 'fwd'},BR={br},cfg{i}]",
                                fn=_adapter_down_kernel,
                                signature=signature,
                                constexprs={
                                    "ACT": ACTIVATIONS.index(act),
                                    "BACKWARD": backward,
                                    "STORE_Z": not backward,
                                    "HAS_BIAS": not backward,
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
