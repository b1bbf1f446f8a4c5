"""Triton kernels: the fused bottleneck adapter, forward and the M-sized backward GEMMs.

Two GEMM shapes cover all four M-sized products (reference: :mod:`fastlora.kernels.adapter_ref`):

- ``_adapter_down_kernel``, (M, K)·(K, R) -> (M, R), inner size K = d, with an activation epilogue:
    forward:  ``z = x W_downᵀ + b_down``, writes ``h = act(z)`` and (training) ``z``;
    backward: ``dh = g W_up``, reads z, writes ``dz = dh ⊙ act'(z)`` and ``h = act(z)``.
- ``_adapter_up_kernel``, (M, R)·(R, N) -> (M, N), inner size R = r, with a bias + residual epilogue:
    forward:  ``y  = res + h W_upᵀ + b_up``;
    backward: ``dx = g + dz W_down`` (serial form; the parallel form has no g term).

Weights are read through strides, so one kernel serves both directions with no transposed copy.
The r tile is padded to >= 16 (the smallest tensor-core K and N) with masks, so r = 1 or 8 runs.

What the backward needs, and why z is saved rather than recomputed: act'(z) needs the
pre-activation z, which cannot be recovered from h for GELU or SiLU. Recomputing it means a
second ``x W_downᵀ`` GEMM: 2·M·d·r FLOPs and a full read of x (M·d), one sixth of the adapter's
FLOPs per step (forward 2 GEMMs + backward 4 GEMMs of 2·M·d·r each). Saving z costs M·r elements,
r/d of the input x that the backward keeps anyway: at Llama-8B sizes (M = 4096 tokens, d = 4096,
r = 64, bf16) 0.5 MiB per adapter beside 32 MiB for x, and the backward reads z in the epilogue of
a GEMM that streams g (32 MiB) anyway. h is NOT saved: the backward's down-shaped kernel recomputes
``h = act(z)`` in the same epilogue (M·r elementwise work, no GEMM) for ``dW_up = gᵀ h``. z is kept in
the input's dtype and the forward computes h from that rounded z, as PyTorch does, so the backward
differentiates the function the forward evaluated.

The weight gradients ``dW_up = gᵀ h`` (d×r) and ``dW_down = dzᵀ x`` (r×d), and the bias sums, reduce
over M: outputs of a few tiles with a long inner loop, which cuBLAS runs with split-K across the
whole GPU; a Triton kernel would need split-K with atomics (non-deterministic) or a second pass
to fill the machine. They go through torch (see :mod:`fastlora.ops.adapter`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora import _alloc, dispatch
from fastlora.aot import KernelSpec, register
from fastlora.kernels.adapter_ref import ACTIVATIONS, check_activation
from fastlora.kernels.lora import _mma
from fastlora.kernels.quant4 import round_to_bf16_bits


@triton.jit
def _round_like(x, ptr):
    """fp32 x rounded (to nearest) to ``ptr``'s element type, kept in fp32; exact to cast afterwards."""
    if ptr.dtype.element_ty == tl.bfloat16:
        return round_to_bf16_bits(x)  # the interpreter's fp32 -> bf16 cast truncates
    elif ptr.dtype.element_ty == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


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
        acc = _mma(a, v, acc, FP32_DOT)

    mask = m_mask[:, None] & r_mask[None, :]
    offs = lm[:, None] * R + rr[None, :]  # the (M, R) outputs are contiguous; rows from row0
    base = row0 * R
    if BACKWARD:
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        h, grad = _act_and_grad(z, ACT)
        tl.store(out_ptr + base + offs, _round_like(acc * grad, out_ptr).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + base + offs, _round_like(h, h_ptr).to(h_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rr, mask=r_mask, other=0.0).to(tl.float32)[None, :]
        z = _round_like(acc, out_ptr)  # z as stored; h is the activation of exactly this z
        if STORE_Z:
            tl.store(z_ptr + base + offs, z.to(z_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + base + offs, _round_like(_act(z, ACT), out_ptr).to(out_ptr.dtype.element_ty), mask=mask)


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
        acc = _mma(p, lw, acc, FP32_DOT)

    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        res_rows = res_ptr + row0 * stride_resm
        res = tl.load(res_rows + lm[:, None] * stride_resm + rn[None, :] * stride_resn, mask=mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(
        out_ptr + row0 * stride_om + lm[:, None] * stride_om + rn[None, :] * stride_on,
        _round_like(acc, out_ptr).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


# Tuning configs. Both kernels are memory-bound at adapter ranks (arithmetic intensity ~r FLOPs per
# element of x read), so tiles are chosen for occupancy: the down kernel's grid is only
# cdiv(M, BM)·cdiv(r, BR) programs, hence BM = 64 (M = 4096 -> 64 programs) beside BM = 16 (256
# programs, and decode sizes). fp32 runs IEEE FMA dots (no TF32), so smaller tiles.
# Every config compiles without a spill for every r tile on sm_80 and sm_90 (tests/test_aot.py). The
# register budget, measured with `python -m fastlora.aot`: the down kernel's backward epilogue at
# BR = 64 (z, act, act', dz live together) spills at 4 warps (255 regs) and needs 8 (128 regs); a
# 128x128 up tile spills on sm_90 even with 32-bit in-tile offsets, so 64x128 on 8 warps; an inner
# r step of 64 in the up kernel puts 64x128 tiles at 253 of 255 registers and fp32 FMA dots at
# 3.8 KB of stack on sm_80, so its inner step is at most 32 (r = 64: two steps). The 16-row down tile
# runs on 8 warps: on 4, ptxas caps some variants at 64 registers and spills on sm_90.
# Under the interpreter one small config runs (triton.autotune with several configs fails there).
R_TILES = (16, 32, 64)  # the down kernel's r tile: next power of two of r, >= 16 (tensor-core N), <= 64
UP_R_STEPS = (16, 32)  # the up kernel's inner r step: next power of two of r, >= 16 (tensor-core K), <= 32
DOWN_TC_CONFIGS = [
    triton.Config({"BM": 64, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 16, "BK": 64}, num_warps=8, num_stages=3),
]
DOWN_FP32_CONFIGS = [triton.Config({"BM": 16, "BK": 32}, num_warps=4, num_stages=2)]
UP_TC_CONFIGS = [
    triton.Config({"BM": 64, "BN": 128}, num_warps=8, num_stages=2),
    triton.Config({"BM": 16, "BN": 64}, num_warps=4, num_stages=2),
]
UP_FP32_CONFIGS = [triton.Config({"BM": 16, "BN": 64}, num_warps=4, num_stages=2)]
DOWN_INTERPRETER_CONFIG = triton.Config({"BM": 16, "BK": 32}, num_warps=4, num_stages=1)
UP_INTERPRETER_CONFIG = triton.Config({"BM": 16, "BN": 32}, num_warps=4, num_stages=1)
_DOWN_KEY = ["M_BUCKET", "K", "R", "ACT", "BACKWARD", "STORE_Z", "BR"]
_UP_KEY = ["M_BUCKET", "N", "R", "HAS_BIAS", "HAS_RES", "BR"]


def down_configs_for(dtype: torch.dtype) -> list[triton.Config]:
    """The configs the down-kernel launcher may pick for ``dtype`` (all compiled ahead of time in CI)."""
    return DOWN_FP32_CONFIGS if dtype == torch.float32 else DOWN_TC_CONFIGS


def up_configs_for(dtype: torch.dtype) -> list[triton.Config]:
    """The configs the up-kernel launcher may pick for ``dtype`` (all compiled ahead of time in CI)."""
    return UP_FP32_CONFIGS if dtype == torch.float32 else UP_TC_CONFIGS


def r_tile(r: int) -> int:
    """The down kernel's r tile for bottleneck size r: 16, 32 or 64 (r > 64 spreads over a grid dimension)."""
    return min(max(triton.next_power_of_2(r), R_TILES[0]), R_TILES[-1])


def up_r_step(r: int) -> int:
    """The up kernel's inner step over r: 16 or 32 (larger r loops)."""
    return min(max(triton.next_power_of_2(r), UP_R_STEPS[0]), UP_R_STEPS[-1])


_tuned: dict[tuple, object] = {}


def _tuned_kernel(kind: str, dtype: torch.dtype):
    key = (kind, dtype == torch.float32)
    if key not in _tuned:
        if kind == "down":
            _tuned[key] = triton.autotune(configs=down_configs_for(dtype), key=_DOWN_KEY)(_adapter_down_kernel)
        else:
            _tuned[key] = triton.autotune(configs=up_configs_for(dtype), key=_UP_KEY)(_adapter_up_kernel)
    return _tuned[key]


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fastlora adapter: the Triton kernels take float32/float16/bfloat16, got {t.dtype}")


def _down(a, v, v_strides, bias, z, activation, backward, store_z):
    """out (M, R) [, h] = epilogue(a · V); see _adapter_down_kernel."""
    _check_dtype(a)
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
    if dispatch.interpreting():
        cfg = DOWN_INTERPRETER_CONFIG.kwargs
        _adapter_down_kernel[(triton.cdiv(m, cfg["BM"]) * triton.cdiv(r, br),)](*args, **flags, **cfg)
    else:

        def grid(meta):
            return (triton.cdiv(m, meta["BM"]) * triton.cdiv(r, br),)

        _tuned_kernel("down", a.dtype)[grid](*args, **flags)
    return out, h


def _up(p, lw, l_strides, n, bias, res):
    """out (M, n) = p · L + bias + res; see _adapter_up_kernel."""
    _check_dtype(p)
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
    if dispatch.interpreting():
        cfg = UP_INTERPRETER_CONFIG.kwargs
        _adapter_up_kernel[(triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)](*args, **flags, **cfg)
    else:

        def grid(meta):
            return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

        _tuned_kernel("up", p.dtype)[grid](*args, **flags)
    return out


def adapter_down_triton(
    x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, activation: str, store_z: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``z = x W_downᵀ + b_down``, ``h = act(z)`` in one launch.

    Args:
        x: (M, d) fp32/fp16/bf16, any strides.
        w_down: (r, d) in x's dtype, any strides.  b_down: (r,) or None.
        activation: one of ``ACTIVATIONS``.
        store_z: also write z (for the backward).

    Returns:
        h (M, r) and z (M, r) or None, contiguous, in x's dtype.
    """
    m, r = x.shape[0], w_down.shape[0]
    z = _alloc.empty((m, r), dtype=x.dtype, device=x.device) if store_z else None
    h, _ = _down(x, w_down, (w_down.stride(1), w_down.stride(0)), b_down, z, activation, False, store_z)
    return h, z


def adapter_up_triton(
    h: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """``y = residual + h W_upᵀ + b_up`` in one launch.

    Args:
        h: (M, r) fp32/fp16/bf16, any strides.  w_up: (d, r) in h's dtype.  b_up: (d,) or None.
        residual: (M, d), any strides: x (serial adapter) or a module's output (parallel adapter).

    Returns:
        (M, d) contiguous, in h's dtype.
    """
    return _up(h, w_up, (w_up.stride(1), w_up.stride(0)), w_up.shape[0], b_up, residual)


def adapter_dz_triton(
    g: torch.Tensor, w_up: torch.Tensor, z: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dz = (g W_up) ⊙ act'(z)`` and ``h = act(z)`` in one launch.

    Args:
        g: (M, d) gradient of the output, any strides.  w_up: (d, r) in g's dtype.
        z: (M, r) contiguous pre-activation saved by :func:`adapter_down_triton`.

    Returns:
        dz (M, r) and h (M, r), contiguous, in g's dtype.
    """
    if not z.is_contiguous():
        z = z.contiguous()
    dz, h = _down(g, w_up, (w_up.stride(0), w_up.stride(1)), None, z, activation, True, False)
    return dz, h


def adapter_dx_triton(dz: torch.Tensor, w_down: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """``dx = g + dz W_down`` in one launch (``g=None`` for the parallel form: ``dz W_down`` alone).

    Args:
        dz: (M, r).  w_down: (r, d) in dz's dtype.  g: (M, d) or None, any strides.

    Returns:
        (M, d) contiguous, in dz's dtype.
    """
    return _up(dz, w_down, (w_down.stride(0), w_down.stride(1)), w_down.shape[1], None, g)


def _register_aot_specs() -> None:
    """Every config x r tile x direction for GELU (the default, and the heaviest epilogue); the other
    activations (their code differs only in the elementwise epilogue) in both directions on the
    largest-tile config with BR = 64, where register pressure peaks."""
    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    down_ints = ("M", "R", "K", "M_BUCKET", "stride_am", "stride_ak", "stride_vk", "stride_vr")
    down_flags = ("ACT", "BACKWARD", "STORE_Z", "HAS_BIAS", "FP32_DOT", "BM", "BR", "BK")
    up_ints = ("M", "N", "R", "M_BUCKET", "stride_pm", "stride_pr", "stride_lr", "stride_ln")
    up_ints += ("stride_resm", "stride_resn", "stride_om", "stride_on")
    up_flags = ("HAS_BIAS", "HAS_RES", "FP32_DOT", "BM", "BN", "BR")
    for dtype, p in ptr.items():
        fp32 = dtype == torch.float32
        dt = str(dtype)[6:]
        down_sig = {
            **dict.fromkeys(("a_ptr", "v_ptr", "bias_ptr", "z_ptr", "out_ptr", "h_ptr"), p),
            **dict.fromkeys(down_ints, "i32"),
            **dict.fromkeys(down_flags, "constexpr"),
        }
        down_cfgs = down_configs_for(dtype)
        for act in ACTIVATIONS:
            for backward in (False, True):
                for i, cfg in enumerate(down_cfgs):
                    for br in R_TILES:
                        if act != "gelu" and (i != 0 or br != R_TILES[-1]):
                            continue
                        register(
                            KernelSpec(
                                name=f"adapter_down[{dt},{act},{'bwd' if backward else 'fwd'},BR={br},cfg{i}]",
                                fn=_adapter_down_kernel,
                                signature=down_sig,
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
        up_sig = {
            **dict.fromkeys(("p_ptr", "l_ptr", "bias_ptr", "res_ptr", "out_ptr"), p),
            **dict.fromkeys(up_ints, "i32"),
            **dict.fromkeys(up_flags, "constexpr"),
        }
        for backward in (False, True):
            for i, cfg in enumerate(up_configs_for(dtype)):
                for br in UP_R_STEPS:
                    register(
                        KernelSpec(
                            name=f"adapter_up[{dt},{'dx' if backward else 'fwd'},BR={br},cfg{i}]",
                            fn=_adapter_up_kernel,
                            signature=up_sig,
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
