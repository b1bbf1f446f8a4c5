"""AOT compile specs of the mixed-adapter kernels (:mod:`fastlora.kernels.lora_multi`, :mod:`.lora_multi_fused`):
each kernel, variant and config its launcher may pick, compiled as the launcher's JIT specialises them.

The run-time hints come from one representative call per variant (the JIT makes an int argument equal to 1 a
constant and gives every int divisible by 16 and every pointer the divisibility-16 hint): training shapes
M = K = N = 4096 (Llama-3-8B's attention projections), rank R = 16, S = 8 slots, contiguous tensors; the fused
decode kernel at M = 16 rows, and its general 4-bit variant at K = N = 4104 (K not a multiple of the block).
Ranks above 16 run BR = 32 / 64 (lowrank.r_tile): the bf16 specs carry BR = 64 too.
"""

from __future__ import annotations

import itertools

import torch

from fastlora.kernels import lora_multi as grouped
from fastlora.kernels import lora_multi_fused as fused
from fastlora.kernels.specs import TL_POINTER, KernelSpec, register

M, K, N, R, S = 4096, 4096, 4096, 16, 8
KEY = 0x2545F491  # a dropout key: not a multiple of 16 (no hint), as most seeds


def _spec(name, fn, types: dict, values: dict, constexprs: dict, cfg) -> None:
    """Register ``fn`` with argument types ``types`` (in order; ints given by ``values``) and ``cfg``'s tiles."""
    ones = tuple(n for n, v in values.items() if isinstance(v, int) and types[n] == "i32" and v == 1)
    div16 = [n for n, t in types.items() if t.startswith("*")]
    div16 += [n for n, v in values.items() if types[n] == "i32" and v != 1 and v % 16 == 0]
    given = {**types, **dict.fromkeys((*constexprs, *cfg.kwargs), "constexpr")}
    signature = {a: given[a] for a in fn.arg_names}  # the kernel's argument order (a missing one fails here)
    register(KernelSpec(name=name, fn=fn, signature=signature, constexprs={**constexprs, **cfg.kwargs},
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, ones=ones, div16=tuple(div16)))  # fmt: skip


def _ptrs(names: str, t: str) -> dict:
    return dict.fromkeys(names.split(), t)


def _grouped(dtype: torch.dtype, br: int) -> None:
    p, kind = TL_POINTER[dtype], "fp32" if dtype == torch.float32 else "tc"
    tag = f"{str(dtype)[6:]},br{br}"
    fp32_dot = {"FP32_DOT": kind != "tc", "BR": br}
    for what, drop in (("u", False), ("u", True), ("v", False)):
        scale_t = "*fp32" if what == "v" else p
        types = {**_ptrs("x_ptr p_ptr out_ptr", p), **_ptrs("perm_ptr sidx_ptr", "*i32"), "scale_ptr": scale_t,
                 "thr_ptr": "*i32", "inv_ptr": "*fp32" if drop else "*i32"}  # fmt: skip
        ps, pk, pr = (R * K, 1, K) if what == "u" else (N * R, R, 1)
        values = dict(M=M, K=K, R=R, M_BUCKET=M, stride_xm=K, stride_xk=1, stride_ps=ps, stride_pk=pk, stride_pr=pr,
                      key=KEY if drop else 0)  # fmt: skip
        flags = {"HAS_SCALE": what == "v", "DROPOUT": drop, **fp32_dot}
        _spec(f"lora_multi_rows[{tag},{what}{'-drop' if drop else ''}]", grouped._grouped_rows_kernel,
              {**types, **dict.fromkeys(values, "i32")}, values, flags, grouped.ROWS_CONFIGS[kind])  # fmt: skip
    for what, drop, bias in (("fwd", False, False), ("fwd", False, True), ("dx", False, False), ("dx", True, False)):
        fwd = what == "fwd"
        types = {**_ptrs("u_ptr l_ptr bias_ptr out_ptr", p), **_ptrs("perm_ptr sidx_ptr", "*i32"),
                 "scale_ptr": "*fp32" if fwd else p, "thr_ptr": "*i32", "inv_ptr": "*fp32" if drop else "*i32"}  # fmt: skip
        ls, lr, ln = (N * R, 1, R) if fwd else (R * K, K, 1)
        values = dict(M=M, N=N, R=R, M_BUCKET=M, stride_um=R, stride_ur=1, stride_ls=ls, stride_lr=lr, stride_ln=ln,
                      stride_om=N, stride_on=1, key=KEY if drop else 0)  # fmt: skip
        flags = {"HAS_SCALE": fwd, "HAS_BIAS": bias, "DROPOUT": drop, **fp32_dot, "BR": grouped.up_br(br)}
        name = f"lora_multi_up[{tag},{what}{'-bias' if bias else ''}{'-drop' if drop else ''}]"
        _spec(name, grouped._grouped_up_kernel, {**types, **dict.fromkeys(values, "i32")}, values, flags,
              grouped.UP_CONFIGS[kind])  # fmt: skip
    # parts > 1 (training M, few slots): fp32 planes; one part (many slots): the pool's dtype, P = 1 a constant
    for (what, drop), planes in itertools.product((("db", False), ("da", False), ("da", True)), (True, False)):
        db = what == "db"
        types = {**_ptrs("x_ptr y_ptr", p), "out_ptr": "*fp32" if planes else p, **_ptrs("perm_ptr seg_ptr", "*i32"),
                 "scale_ptr": "*fp32" if db else p, "thr_ptr": "*i32", "inv_ptr": "*fp32" if drop else "*i32"}  # fmt: skip
        out_strides = (N * R, R, 1) if db else (R * K, 1, K)
        values = dict(C=N if db else K, R=R, P=2 if planes else 1, stride_xm=K, stride_xc=1, stride_ym=R, stride_yr=1,
                      stride_op=S * K * R if planes else 0, stride_os=out_strides[0], stride_oc=out_strides[1],
                      stride_or=out_strides[2], key=KEY if drop else 0)  # fmt: skip
        flags = {"HAS_SCALE": db, "DROPOUT": drop, **fp32_dot, "BR": grouped.up_br(br)}
        name = f"lora_multi_reduce[{tag},{what}{'-drop' if drop else ''}{'-parts' if planes else ''}]"
        _spec(name, grouped._segment_reduce_kernel, {**types, **dict.fromkeys(values, "i32")}, values, flags,
              grouped.REDUCE_CONFIGS[kind])  # fmt: skip
    for drop in (False, True):
        types = {**_ptrs("x_ptr a_ptr out_ptr", p), "idx_ptr": "*i32", "thr_ptr": "*i32",
                 "inv_ptr": "*fp32" if drop else "*i32"}  # fmt: skip
        values = dict(K=K, R=R, stride_xm=K, stride_xk=1, stride_as=R * K, stride_ar=K, stride_ak=1,
                      key=KEY if drop else 0)  # fmt: skip
        _spec(f"lora_multi_gather_down[{tag}{',drop' if drop else ''}]", grouped._gather_down_kernel,
              {**types, **dict.fromkeys(values, "i32")}, values, {"DROPOUT": drop, "BR": br},
              grouped.GATHER_CONFIGS[kind])  # fmt: skip


def _fused(dtype: torch.dtype) -> None:
    p, kind = TL_POINTER[dtype], "fp32" if dtype == torch.float32 else "tc"
    for variant in ("dense", "nf4-aligned", "nf4-nested-aligned", "nf4-any"):
        w_4bit, nested, aligned = variant != "dense", "nested" in variant, variant.endswith("aligned")
        k = n = K if variant != "nf4-any" else 4104
        if w_4bit:
            stats = {"absmax_ptr": "*u8" if nested else "*fp32", "nested_absmax_ptr": "*fp32",
                     "nested_code_ptr": "*fp32"}  # fmt: skip
        else:
            stats = _ptrs("absmax_ptr nested_absmax_ptr nested_code_ptr", p)
        types = {**_ptrs("x_ptr", p), "w_ptr": "*u8" if w_4bit else p, **_ptrs("u_ptr b_ptr", p),
                 "scale_ptr": "*fp32", "idx_ptr": "*i32", **_ptrs("bias_ptr out_ptr", p), **stats, "offset": "fp32"}  # fmt: skip
        values = dict(log2_blocksize=6 if w_4bit else 0, M=16, N=n, K=k, R=R, M_BUCKET=16, stride_xm=k, stride_xk=1,
                      stride_wk=0 if w_4bit else 1, stride_wn=0 if w_4bit else k, stride_um=R, stride_ur=1,
                      stride_bs=n * R, stride_bn=R, stride_br=1, stride_om=n, stride_on=1)  # fmt: skip
        flags = {"W_4BIT": w_4bit, "FP4": False, "W_ALIGNED": aligned, "NESTED": nested, "HAS_BIAS": False,
                 "ASM_LUT": True, "LORA_FIRST": dtype != torch.float32, "FP32_DOT": kind != "tc", "BR": fused.FUSED_BR}  # fmt: skip
        cfg = fused.FUSED_CONFIGS["general" if w_4bit and not aligned else kind]
        _spec(f"lora_multi_fused[{str(dtype)[6:]},{variant}]", fused._multi_fused_kernel,
              {**types, **dict.fromkeys(values, "i32")}, values, flags, cfg)  # fmt: skip


def _register_aot_specs() -> None:
    for dtype in TL_POINTER:
        _grouped(dtype, 16)
        _fused(dtype)
    _grouped(torch.bfloat16, 64)


_register_aot_specs()
