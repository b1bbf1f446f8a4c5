"""The gated-linear-unit epilogue of the fused gate/up projection (SwiGLU, GeGLU), forward and backward.

One elementwise pass over the stacked pre-activation ``pre = [gate | up]`` (M, 2I) that the grouped
gate/up GEMM writes (:mod:`fastlora.ops.lora_group`); the spec is :mod:`fastlora.kernels.glu_ref`:

    forward   h = act(gate) · up                                     read 2I, write I elements a row
    backward  [d_gate | d_up] = [dh · up · act'(gate) | dh · act(gate)]  read 3I, write 2I

act(gate) is recomputed in the backward (one sigmoid, or one erf/tanh, a element) instead of being
stored: eager HF keeps gate (for act), act(gate) and up (for the product) beside h (down_proj's
input); the fused op keeps only ``pre`` beside h, one [M, I] tensor less. Arithmetic in fp32, one
rounding on the store (nearest-even; under the interpreter the bf16 bits are rounded first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora import _alloc
from fastlora.functional import ACTIVATIONS, check_activation
from fastlora.kernels.adapter_down import _act, _act_and_grad
from fastlora.kernels.primitives import check_float, round_like
from fastlora.kernels.specs import TL_POINTER, KernelSpec, register

BLOCK = 1024  # columns a program: 8 KiB of bf16 pre read a row per program, 4 warps
WARPS = 4


@triton.jit
def _glu_kernel(
    pre_ptr,  # (M, 2I) [gate | up], row stride stride_pre, unit column stride
    dh_ptr,  # (M, I) backward: dL/dh (unused in the forward)
    out_ptr,  # forward: h (M, I); backward: [d_gate | d_up] (M, 2I)
    I,
    stride_pre,
    stride_dh,
    stride_out,
    ACT: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # rows on axis 0: up to 2**31 - 1 tokens
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    pre = pre_ptr + row * stride_pre + cols
    gate = tl.load(pre, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(pre + I, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + row * stride_out + cols
    if BACKWARD:
        a, da = _act_and_grad(gate, ACT)
        dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out, round_like(dh * up * da, out_ptr).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out + I, round_like(dh * a, out_ptr).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        h = _act(gate, ACT) * up
        tl.store(out, round_like(h, out_ptr).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def glu_forward(pre: torch.Tensor, act: str) -> torch.Tensor:
    """h = act(gate) · up: pre (M, 2I) fp32/fp16/bf16, unit column stride (else copied) -> (M, I) contiguous."""
    check_activation(act, where="fastlora glu_forward")
    check_float(pre, "fastlora glu_forward")
    pre = _rows(pre)
    m, i = pre.shape[0], pre.shape[1] // 2
    h = _alloc.empty((m, i), dtype=pre.dtype, device=pre.device)
    if m and i:
        _glu_kernel[(m, triton.cdiv(i, BLOCK))](
            pre,
            pre,
            h,
            i,
            pre.stride(0),
            0,
            h.stride(0),
            ACT=ACTIVATIONS.index(act),
            BACKWARD=False,
            BLOCK=BLOCK,
            num_warps=WARPS,
        )
    return h


def glu_backward(dh: torch.Tensor, pre: torch.Tensor, act: str) -> torch.Tensor:
    """[dh · up · act'(gate) | dh · act(gate)]: dh (M, I), pre (M, 2I), one dtype -> (M, 2I) contiguous."""
    check_activation(act, where="fastlora glu_backward")
    check_float(pre, "fastlora glu_backward")
    pre, dh = _rows(pre), _rows(dh)
    m, i = dh.shape
    if pre.shape != (m, 2 * i) or pre.dtype != dh.dtype:
        raise ValueError(
            f"fastlora glu_backward: dh {tuple(dh.shape)} {dh.dtype} vs pre {tuple(pre.shape)} {pre.dtype}"
        )
    g = _alloc.empty((m, 2 * i), dtype=dh.dtype, device=dh.device)
    if m and i:
        _glu_kernel[(m, triton.cdiv(i, BLOCK))](
            pre,
            dh,
            g,
            i,
            pre.stride(0),
            dh.stride(0),
            g.stride(0),
            ACT=ACTIVATIONS.index(act),
            BACKWARD=True,
            BLOCK=BLOCK,
            num_warps=WARPS,
        )
    return g


def _register_aot_specs() -> None:
    """Forward and backward x dtype x GLU activation (SiLU, exact and tanh GELU) at the 8B shapes: I = 14336
    and row strides multiples of 16, pointers 16-byte aligned."""
    for dtype, ptr in TL_POINTER.items():
        for act in ("silu", "gelu", "gelu_tanh"):
            for backward in (False, True):
                register(
                    KernelSpec(
                        name=f"glu[{str(dtype)[6:]},{act},{'bwd' if backward else 'fwd'}]",
                        fn=_glu_kernel,
                        signature={
                            "pre_ptr": ptr,
                            "dh_ptr": ptr,
                            "out_ptr": ptr,
                            "I": "i32",
                            "stride_pre": "i32",
                            "stride_dh": "i32",
                            "stride_out": "i32",
                            "ACT": "constexpr",
                            "BACKWARD": "constexpr",
                            "BLOCK": "constexpr",
                        },
                        constexprs={"ACT": ACTIVATIONS.index(act), "BACKWARD": backward, "BLOCK": BLOCK},
                        num_warps=WARPS,
                        div16=("pre_ptr", "dh_ptr", "out_ptr", "I", "stride_pre", "stride_dh", "stride_out"),
                    )
                )


_register_aot_specs()
