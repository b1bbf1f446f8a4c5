"""AOT compile specs of the fused LoRA GEMM (:mod:`fastlora.kernels.lora`): every variant and config its
launcher may pick, compiled as the launcher's JIT specialises them at the training/decode shapes."""

from __future__ import annotations

import torch

from fastlora.kernels.lora import BR, _lora_matmul_kernel, configs_for
from fastlora.kernels.specs import TL_POINTER, KernelSpec, register


def _runtime_hints(w_4bit: bool, aligned: bool, trans: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(ones, div16) of the binary the JIT builds at the training/decode shapes: x, u, out contiguous; dense W
    (N, K) contiguous, read as V = Wᵀ (forward: stride_wk = 1) or W (dx: stride_wn = 1); the low-rank weight
    lora_b (N, r) read as Bᵀ (stride_lr = 1) or lora_a (r, K) (stride_ln = 1); M, N, K, r = 16, the row
    strides and every pointer divisible by 16 (Llama-3-8B: K, N in {4096, 14336}, M a multiple of 16).
    The general 4-bit variant runs at odd K: only the ints independent of K keep the hint there."""
    ones = ["stride_xk", "stride_ur", "stride_on", "stride_lr" if trans else "stride_ln"]
    if not w_4bit:
        ones.append("stride_wk" if trans else "stride_wn")
    ptrs = ("x_ptr", "w_ptr", "u_ptr", "l_ptr", "bias_ptr", "out_ptr", "absmax_ptr", "nested_absmax_ptr")
    ints = ["M", "R", "M_BUCKET", "stride_um", "stride_wk", "stride_wn", "stride_lr" if trans else "stride_ln"]
    if not w_4bit or aligned:  # K (and N) multiples of 16
        ints += ["N", "K", "stride_xm", "W_ROWS", "W_COLS", "stride_om", "stride_ln" if trans else "stride_lr"]
    # The general 4-bit variant runs at odd shapes: no hint on the sizes and row strides (with them, triton 3.6
    # allocates fp32 NF4 dx on sm_80 128 registers and spills one).
    div16 = (*ptrs, "nested_code_ptr", *(n for n in ints if n not in ones))
    return tuple(ones), div16


def _register_aot_specs() -> None:
    ints = ("M", "N", "K", "R", "M_BUCKET", "stride_xm", "stride_xk", "stride_wk", "stride_wn", "W_ROWS", "W_COLS")
    ints += tuple(f"stride_{s}" for s in ("um", "ur", "lr", "ln", "om", "on"))
    flags = (
        "W_4BIT",
        "FP4",
        "W_ALIGNED",
        "W_TRANS",
        "NESTED",
        "HAS_BIAS",
        "HAS_LORA",
        "ASM_LUT",
        "LORA_FIRST",
        "DROPOUT",
        "FP32_DOT",
    )
    # dense: the forward (V = Wᵀ) and the input gradient (V = W) read W through different unit strides
    variants = [("dense", False, False, True, False), ("dense-dx", False, False, False, False)]
    for trans in (True, False):
        for aligned in (True, False):
            for nested in (False, True):
                name = (
                    f"nf4{'-nested' if nested else ''}{'-aligned' if aligned else '-any'}{'-fwd' if trans else '-dx'}"
                )
                variants.append((name, True, aligned, trans, nested))
    for dtype, p in TL_POINTER.items():
        for kind, w_4bit, aligned, trans, nested in variants:
            signature = {
                "x_ptr": p,
                "w_ptr": "*u8" if w_4bit else p,
                "u_ptr": p,
                "l_ptr": p,
                "bias_ptr": p,
                "out_ptr": p,
                "absmax_ptr": "*u8" if nested else "*fp32",
                "nested_absmax_ptr": "*fp32",
                "nested_code_ptr": "*fp32",
                "offset": "fp32",
                "log2_blocksize": "i32",
                "lora_scale": "fp32",
                "drop_key": "i32",
                "drop_threshold": "i32",
                "drop_scale": "fp32",
                **dict.fromkeys(ints, "i32"),
                **dict.fromkeys((*flags, "BM", "BN", "BK", "BR", "GROUP_M"), "constexpr"),
            }
            # the input gradient also with LoRA dropout (a separate binary: DROPOUT is a constexpr)
            for dropout in (False, True) if not trans else (False,):
                values = dict(
                    zip(
                        flags,
                        (
                            w_4bit,
                            False,
                            aligned,
                            trans,
                            nested,
                            True,
                            True,
                            True,
                            dtype != torch.float32,
                            dropout,
                            dtype == torch.float32,
                        ),
                        strict=True,
                    )
                )
                ones, div16 = _runtime_hints(w_4bit, aligned, trans)
                if not dropout:  # key and threshold 0: divisible by 16 for the JIT
                    div16 += ("drop_key", "drop_threshold")
                for i, cfg in enumerate(configs_for(dtype, w_4bit, aligned)):
                    register(
                        KernelSpec(
                            name=f"lora_matmul[{str(dtype)[6:]},{kind}{'-drop' if dropout else ''},cfg{i}]",
                            fn=_lora_matmul_kernel,
                            signature=signature,
                            constexprs={**values, "BR": BR, **cfg.kwargs},
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            # training-size tiles must use wgmma on Hopper and no stack at all
                            tensor_core=dtype != torch.float32 and cfg.kwargs["BM"] >= 64,
                            ones=ones,
                            div16=div16,
                        )
                    )


_register_aot_specs()
