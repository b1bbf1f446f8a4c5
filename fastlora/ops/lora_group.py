"""The grouped LoRA linear: the projections that read one input (q/k/v; gate/up) as ONE op.

Members i = 1..n share x (M, K); each has its own frozen W_i (N_i, K) (dense, or 4-bit), bias b_i, and
LoRA factors A_i (r_i, K), B_i (N_i, r_i), scale s_i, dropout p_i (r_i = 0: no adapter, a plain frozen
linear). The op returns the stacked Y = [y_1 | ... | y_n] (M, ΣN), or with ``act`` (two members gate,
up of equal N = I) the gated unit h = act(y_gate)·y_up (M, I) (:mod:`fastlora.kernels.glu`).

    u      = [u_1 | ... | u_n] (M, Σr): members without dropout from ONE skinny GEMM x·[A_1; A_2; ...]ᵀ;
             a member with dropout draws its own mask (its own seed, as peft's per-projection dropout):
             u_i = d_i(x)·A_iᵀ on its own
    Y      large M (dequant_gemm): C = [s_1·u_1·B_1ᵀ + b_1 | ...] written into Y's column slices, every 4-bit
             W_i dequantised into its row slice of ONE stacked [ΣN, K] scratch, then ONE GEMM
             Y += x·W_stackedᵀ (a dense member: its own addmm_ into its slice of Y, W never copied);
             small M (fused): the fused kernel per member (W dequantised in registers), into one output
    backward v_i = s_i·g_i·B_i and dB_i = s_i·g_iᵀ·u_i per member (one pass over g_i), dA_i = v_iᵀ·d_i(x);
             dx = ONE GEMM g·W_stacked with C = [v_1 | ...]·[A_1; ...] (one skinny GEMM for the members
             without dropout, + d'_i(v_i·A_i) for each with dropout)

Saved for backward: x, u, and with ``act`` the stacked pre-activation [M, 2I] (act(gate) is recomputed);
never a dequantised W. The path is :func:`fastlora.ops.planner.decide_path`'s, asked at (M, K, ΣN).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from fastlora import dispatch
from fastlora.functional import check_activation
from fastlora.kernels import glu as glu_kernels
from fastlora.kernels import glu_ref
from fastlora.ops import lora_paths
from fastlora.ops.lora import _check_code_table
from fastlora.ops.lora_group_paths import (
    DTYPES,
    OP_GROUP,
    OP_GROUP_DX,
    QUANTS,
    GroupMember,
    down,
    group_quant,
    members_of,
)
from fastlora.ops.planner import OP, OP_DX, decide_path, requested_path


def _glu(choice_backend: str, pre: torch.Tensor, act: str) -> torch.Tensor:
    return glu_kernels.glu_forward(pre, act) if choice_backend == "triton" else glu_ref.glu_forward(pre, act)


def _path(op, backend, path, m, k, n, ms, dtype) -> str:
    return decide_path(op, backend, path or None, m, k, n, group_quant(ms), dtype)[0]


# -- the custom ops ----------------------------------------------------------------------------


@torch.library.custom_op("fastlora::lora_group", mutates_args=())
def _lora_group_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    absmax: list[torch.Tensor | None],
    nested_absmax: list[torch.Tensor | None],
    nested_code: list[torch.Tensor | None],
    quants: list[int],
    blocksizes: list[int],
    shapes: list[int],
    dtypes: list[int],
    offsets: list[float],
    scales: list[float],
    dropout_ps: list[float],
    seeds: list[int],
    act: str,
    backend: str,
    path: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ms = members_of(weights, biases, lora_as, lora_bs, absmax, nested_absmax, nested_code, quants, blocksizes, shapes,
                  dtypes, offsets, scales, dropout_ps, seeds)  # fmt: skip
    quantized = all(m.state is not None for m in ms)
    choice = dispatch.choose(OP_GROUP, x.device, backend or None, m=x.shape[0], quantized=quantized)
    u = down(x, ms, "torch" if choice.backend == "native" else choice.backend)
    chosen = _path(OP, choice.backend, path, x.shape[0], x.shape[1], ms[-1].hi, ms, x.dtype)
    y = choice.fn(x, ms, u, choice.backend, chosen)
    if not act:
        return y, u, x.new_empty((0,))
    return _glu(choice.backend, y, act), u, y  # y, the stacked pre-activation, is saved for the backward


@_lora_group_op.register_fake
def _(x, weights, biases, lora_as, lora_bs, absmax, nested_absmax, nested_code, quants, blocksizes, shapes, dtypes,
      offsets, scales, dropout_ps, seeds, act, backend, path):  # fmt: skip
    n, r, m = sum(shapes[0::2]), sum(a.shape[0] for a in lora_as), x.shape[0]
    if not act:
        return x.new_empty((m, n)), x.new_empty((m, r)), x.new_empty((0,))
    return x.new_empty((m, n // 2)), x.new_empty((m, r)), x.new_empty((m, n))


@torch.library.custom_op("fastlora::lora_group_backward", mutates_args=())
def _lora_group_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    pre: torch.Tensor,
    weights: list[torch.Tensor],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    absmax: list[torch.Tensor | None],
    nested_absmax: list[torch.Tensor | None],
    nested_code: list[torch.Tensor | None],
    quants: list[int],
    blocksizes: list[int],
    shapes: list[int],
    dtypes: list[int],
    offsets: list[float],
    scales: list[float],
    dropout_ps: list[float],
    seeds: list[int],
    act: str,
    backend: str,
    path: str,
    needs_dx: bool,
    needs_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    ms = members_of(weights, [None] * len(weights), lora_as, lora_bs, absmax, nested_absmax, nested_code, quants,
                  blocksizes, shapes, dtypes, offsets, scales, dropout_ps, seeds)  # fmt: skip
    choice = dispatch.choose(OP_GROUP_DX, grad.device, None if backend == "native" else backend or None)
    if act:  # the stacked gradient [d_gate | d_up] from dh, act(gate) recomputed from the saved pre-activation
        glu = glu_kernels.glu_backward if choice.backend == "triton" else glu_ref.glu_backward
        grad = glu(grad, pre, act)
    vs, grad_as, grad_bs = [], [], []
    for m in ms:  # v_i and dB_i in one pass over g_i, dA_i with the member's mask regenerated
        if m.a.shape[0] == 0:
            vs.append(None)
            grad_as.append(torch.zeros_like(m.a))
            grad_bs.append(torch.zeros_like(m.b))
            continue
        v, ga, gb = lora_paths.lora_grads(grad[:, m.lo : m.hi], x, m.a, m.b, u[:, m.ulo : m.uhi], m.scale, m.p,
                                          m.seed, choice.backend)  # fmt: skip
        vs.append(v)
        grad_as.append(ga)
        grad_bs.append(gb)
    grad_bias = grad.sum(0) if needs_bias else x.new_empty((0,))
    if not needs_dx:
        return x.new_empty((0,)), grad_bias, grad_as, grad_bs
    chosen = _path(OP_DX, choice.backend, path, grad.shape[0], x.shape[1], ms[-1].hi, ms, grad.dtype)
    return choice.fn(grad, ms, vs, choice.backend, chosen), grad_bias, grad_as, grad_bs


@_lora_group_backward_op.register_fake
def _(grad, x, u, pre, weights, lora_as, lora_bs, absmax, nested_absmax, nested_code, quants, blocksizes, shapes,
      dtypes, offsets, scales, dropout_ps, seeds, act, backend, path, needs_dx, needs_bias):  # fmt: skip
    grad_x = torch.empty_like(x) if needs_dx else x.new_empty((0,))
    grad_bias = x.new_empty((sum(shapes[0::2]),)) if needs_bias else x.new_empty((0,))
    return grad_x, grad_bias, [torch.empty_like(a) for a in lora_as], [torch.empty_like(b) for b in lora_bs]


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_as, lora_bs, absmax, nested_absmax, nested_code, *rest = inputs
    n = len(weights)
    ctx.n = n
    ctx.save_for_backward(x, output[1], output[2], *weights, *lora_as, *lora_bs, *absmax, *nested_absmax,
                          *nested_code)  # fmt: skip
    ctx.args = rest  # quants, blocksizes, shapes, dtypes, offsets, scales, dropout_ps, seeds, act, backend, path
    ctx.bias_grad = [b is not None and b.requires_grad for b in biases]


def _backward(ctx, grad_y, grad_u, grad_pre):
    x, u, pre, *lists = ctx.saved_tensors
    n = ctx.n
    weights, lora_as, lora_bs, absmax, nested_absmax, nested_code = (lists[i * n : (i + 1) * n] for i in range(6))
    grad_y = grad_y.contiguous() if grad_y.stride(-1) != 1 else grad_y
    needs_bias = any(ctx.bias_grad)
    grad_x, grad_bias, grad_as, grad_bs = torch.ops.fastlora.lora_group_backward(
        grad_y, x, u, pre, weights, lora_as, lora_bs, absmax, nested_absmax, nested_code, *ctx.args,
        ctx.needs_input_grad[0], needs_bias,
    )  # fmt: skip
    shapes = ctx.args[2]
    bounds = [sum(shapes[0 : 2 * i : 2]) for i in range(n + 1)]
    grad_biases = [grad_bias[bounds[i] : bounds[i + 1]] if ctx.bias_grad[i] else None for i in range(n)]
    grad_x = grad_x if ctx.needs_input_grad[0] else None
    # in the inputs' structure (torch.library's: a list holding a None is one leaf); no gradient for the weights,
    # the statistics and the non-tensor arguments
    grads = [grad_x, None, grad_biases, list(grad_as), list(grad_bs)]
    structure = ctx.needs_input_grad
    return tuple(_like(g, need) for g, need in itertools.zip_longest(grads, structure[: len(structure)]))


def _like(grad, need):
    if isinstance(need, (list, tuple)):
        return list(grad) if isinstance(grad, list) else [None] * len(need)
    return None if isinstance(grad, list) else grad


_lora_group_op.register_autograd(_backward, setup_context=_setup_context)


# -- the functional entry point ---------------------------------------------------------------------


def lora_group(
    x: torch.Tensor,
    members: Sequence[GroupMember],
    *,
    act: str | None = None,
    backend: str | None = None,
    path: str | None = None,
) -> tuple[torch.Tensor, ...] | torch.Tensor:
    """The projections of ``members`` over one input x, as ONE op (see the module docstring).

    Args:
        x: (..., K) fp32/fp16/bf16, any leading shape.
        members: the :class:`GroupMember` s, in output order; dense W in x's dtype, LoRA factors in x's dtype.
        act: None; or "silu" / "gelu" / "gelu_tanh" with two members (gate, up) of equal out_features I:
            the result is act(gate)·up (SwiGLU / GeGLU).
        backend: "torch" or "triton" for every pass (default ``FASTLORA_BACKEND``, else by device).
        path: "fused" or "dequant_gemm" for the Triton passes (default ``FASTLORA_PATH``, else by size at ΣN).

    Returns:
        act None: one (..., N_i) tensor a member (views of one stacked output); else h (..., I).
        Differentiable in x, the biases and every lora_a / lora_b.
    """
    if not members:
        raise ValueError("fastlora lora_group: no members")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    dispatch.requested_backend(backend, op=OP_GROUP)
    requested_path(path)
    args = {name: [] for name in ("w", "bias", "a", "b", "am", "nam", "nc", "q", "bs", "sh", "dt", "off", "s", "p",
                                  "seed")}  # fmt: skip
    for i, m in enumerate(members):
        state = m.quant_state
        n = state.shape[0] if state is not None else m.weight.shape[0]
        kk = state.shape[1] if state is not None else m.weight.shape[1]
        if kk != k:
            raise ValueError(f"fastlora lora_group: member {i} has in_features {kk}, x has {k}")
        if not math.isfinite(m.scale):
            raise ValueError(f"fastlora lora_group: member {i}'s scale must be finite, got {m.scale!r}")
        if not 0.0 <= m.dropout_p < 1.0:
            raise ValueError(f"fastlora lora_group: member {i}'s dropout_p must be in [0, 1), got {m.dropout_p!r}")
        a = m.lora_a if m.lora_a is not None else x2.new_zeros((0, k))
        b = m.lora_b if m.lora_b is not None else x2.new_zeros((n, 0))
        if state is not None:
            _check_code_table(state)
            q = state.op_args()
            args["am"].append(q.absmax)
            args["nam"].append(q.nested_absmax)
            args["nc"].append(q.nested_code)
            args["q"].append(QUANTS.index(state.quant_type))
            args["bs"].append(state.blocksize)
            args["dt"].append(DTYPES.index(state.dtype))
            args["off"].append(q.nested_offset)
        else:
            for key, value in (("am", None), ("nam", None), ("nc", None), ("q", 0), ("bs", 0), ("dt", 0),
                               ("off", 0.0)):  # fmt: skip
                args[key].append(value)
        for key, value in (("w", m.weight), ("bias", m.bias), ("a", a), ("b", b), ("sh", n), ("sh", k),
                           ("s", float(m.scale)), ("p", float(m.dropout_p)), ("seed", int(m.seed))):  # fmt: skip
            args[key].append(value)
    if act:
        check_activation(act, where="fastlora lora_group")
        if len(members) != 2 or args["sh"][0] != args["sh"][2]:
            raise ValueError("fastlora lora_group: act takes two members (gate, up) of equal out_features")
    y, _, _ = torch.ops.fastlora.lora_group(x2, *args.values(), act or "", backend or "", path or "")
    if act:
        return y.view(*lead, y.shape[-1])
    y = y.view(*lead, y.shape[-1])
    return tuple(y.split(args["sh"][0::2], dim=-1))
