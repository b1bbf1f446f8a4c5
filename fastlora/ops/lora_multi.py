"""The mixed-adapter LoRA linear op: one base, many adapters in one batch, each row its own adapter.

    y[m] = x[m]·Wᵀ + b + s_i·d_i(x[m])·A_iᵀ·B_iᵀ,   i = adapter_idx[m]   (no LoRA term when i == -1)

The adapters are stacked in a padded pool: pool_a (S, R, K), pool_b (S, N, R) (R the largest rank; a slot of
rank r < R has zeros beyond r), scales (S,) fp32 (0 for an empty slot). Chain rule (g = dL/dy, u = d(x)Aᵀ per
row, saved from the forward):

    v[m] = s_i·g[m]·B_i      dB_i = s_i·Σ_{idx=i} gᵀu      dA_i = Σ_{idx=i} vᵀ d_i(x)      dx = g·W + d'_i(v·A_i)

Which kernel runs when (``backend`` / ``FASTLORA_BACKEND``, ``path`` / ``FASTLORA_PATH`` as for lora_linear):

    pass          torch (reference, CPU default)   triton (CUDA default)
    u (down)      all slots at once, then gather   M <= 16: gathered (each row reads its own A_i, BGMV-style);
                                                   else segment-grouped (rows sorted by slot on the device)
    forward       dequantise, matmuls              path "fused" (M <= the crossover of the single-adapter
                                                   planner, decide_path): ONE launch, W (4-bit or dense) tile by
                                                   tile + every row's s_i·u·B_iᵀ gathered into the same tile;
                                                   "dequant_gemm": W into the scratch, C = grouped s_i·u·B_iᵀ + b,
                                                   one GEMM with C
    dx            matmuls                          scratch W + one GEMM with C = grouped d'_i(v·A_i) (any M)
    v, dA, dB     wide matmuls                     grouped kernels: v segment-grouped; dA, dB one program per
                                                   (slot, tile) reducing its rows in a fixed order (deterministic)
    forward       native (ops/lora_multi_native.py; CPU and CUDA default for a 4-bit W at M <= native.MAX_DECODE_M
                  when the extension is built): the decode GEMV, W streamed once, each row's s_i·u·B_iᵀ in its
                  epilogue; registered before the Triton row, so it is preferred where both can run

No host sync inside the op: the grouping is a sort and a searchsorted on the device. The eager wrapper checks
adapter_idx's range and dropout_p's values with one device sync on CUDA (``check_values=False`` skips it, for a
caller that validated the indices once per model pass); under torch.compile the check is skipped (an index out
of range is then undefined behaviour, as for any gather).
"""

from __future__ import annotations

import torch

from fastlora import dispatch
from fastlora.kernels import lora_multi as kernels
from fastlora.kernels import lora_multi_fused, lora_multi_specs  # noqa: F401  (the specs register on import)
from fastlora.kernels import lora_multi_ref as ref
from fastlora.kernels import lora_multi_seg as seg
from fastlora.ops import lora_multi_native, scratch  # noqa: F401  (native registers its row first: preferred)
from fastlora.ops.lora import _check_code_table, _dense_weight
from fastlora.ops.planner import OP as _OP_SINGLE
from fastlora.ops.planner import OP_DX as _OP_SINGLE_DX
from fastlora.ops.planner import decide_path, requested_path
from fastlora.quant import QuantArgs, QuantState

OP = "lora_linear_multi"  # forward: (x2, weight, state, bias, u, pool_b, scales, idx, path) -> y (M, N)
OP_DX = "lora_linear_multi_dx"  # (grad, weight, state, v, pool_a, idx, dropout_p, seed, path) -> dx (M, K)
OP_DOWN = "lora_multi_down"  # (x, pool_a, idx, dropout_p, seed) -> u (M, R)
OP_GRADS = "lora_multi_grads"  # (grad, x, pool_a, pool_b, u, scales, idx, dropout_p, seed) -> (v, dA, dB)


# -- the torch rows (the reference; every device, float64 too) --------------------------------------------


# From this many slots the CPU row loops over segments. Measured on this 2-core CPU (1 thread, fp32, 1024² NF4,
# r 16, lora_linear_multi forward): S = 1: the wide reference 4.6 ms, the loop 6.0 (its argsort and copies);
# S = 8: 5.7 vs 5.2 at M = 64, 12.6 vs 11.5 at M = 256; S = 64: 13.5 vs 11.3 and 29.4 vs 17.0.
_SEGMENT_MIN_SLOTS = 4


def _rows(t: torch.Tensor, slots: int):
    """On a CPU with several slots the products loop over the slots present (one adapter's FLOPs; finding the
    segments reads the indices, a host sync that costs nothing there); else the sync-free reference (S times
    the FLOPs, one matmul each)."""
    return seg if t.device.type == "cpu" and slots >= _SEGMENT_MIN_SLOTS else ref


@dispatch.register(OP, "torch")
def _fwd_torch(x, weight, state, bias, u, pool_b, scales, idx, path=None):
    c = _rows(x, pool_b.shape[0]).multi_up(u, pool_b, scales, idx, bias)
    return c + x @ _dense_weight(weight, state, x.dtype).T


@dispatch.register(OP_DX, "torch")
def _dx_torch(grad, weight, state, v, pool_a, idx, dropout_p, seed, path=None):
    term = _rows(grad, pool_a.shape[0]).multi_dx_term(v, pool_a, idx, dropout_p, seed)
    return grad @ _dense_weight(weight, state, grad.dtype) + term


@dispatch.register(OP_DOWN, "torch")
def _down_torch(x, pool_a, idx, dropout_p=None, seed=0):
    return _rows(x, pool_a.shape[0]).multi_down(x, pool_a, idx, dropout_p, seed)


@dispatch.register(OP_GRADS, "torch")
def _grads_torch(g, x, pool_a, pool_b, u, scales, idx, dropout_p=None, seed=0):
    return _rows(g, pool_b.shape[0]).multi_grads(g, x, pool_a, pool_b, u, scales, idx, dropout_p, seed)


# -- the Triton rows (CUDA default; CPU tensors under TRITON_INTERPRET=1 when asked for) --------------------------

_triton = {"devices": ("cuda",), "default_on": ("cuda",)}


@dispatch.register(OP, "triton", **_triton)
def _fwd_triton(x, weight, state, bias, u, pool_b, scales, idx, path="fused"):
    """fused: one launch, W tile by tile and each row's s_i·u·B_iᵀ gathered into its tile; dequant_gemm: W into
    the scratch, C = s_i·u·B_iᵀ + b by the segment-grouped kernel, one GEMM with C."""
    if path != "dequant_gemm":
        return lora_multi_fused.multi_fused_fwd(x, weight, state, bias, u, pool_b, scales, idx)
    w = scratch.dequantized_weight(weight, state, x.dtype, backend="triton")
    return kernels.multi_up(u, pool_b, scales, idx, bias).addmm_(x, w.T)


@dispatch.register(OP_DX, "triton", **_triton)
def _dx_triton(grad, weight, state, v, pool_a, idx, dropout_p, seed, path=None):
    """W into the scratch (a dense W as it is), C = d'_i(v·A_i) segment-grouped, one GEMM with C (every M: the
    backward of a decode-sized batch is rare)."""
    w = scratch.dequantized_weight(weight, state, grad.dtype, backend="triton")
    return kernels.multi_dx_term(v, pool_a, idx, dropout_p, seed).addmm_(grad, w)


dispatch.register(OP_DOWN, "triton", **_triton)(kernels.multi_down)
dispatch.register(OP_GRADS, "triton", **_triton)(kernels.multi_grads)


def _path(op, backend, path, m, k, n, state, dtype) -> str:
    """The single-adapter planner's decision (its crossover table), reused: both paths read the batch's adapters
    once (fused: B_i gathered into the tile; dequant_gemm: by the grouped C kernel), so the base's cost decides."""
    quant = None if state is None else state.quant_type
    return decide_path(op, backend, path or None, m, k, n, quant, dtype)[0]


# -- the custom ops -------------------------------------------------------------------------------------------


@torch.library.custom_op("fastlora::lora_linear_multi", mutates_args=())
def _multi_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool_a: torch.Tensor,
    pool_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_idx: torch.Tensor,
    dropout_p: torch.Tensor | None,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    quant_type: str,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    nested_offset: float,
    seed: int,
    backend: str,
    path: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    state = QuantState.from_op_args(absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
                                    nested_offset)  # fmt: skip
    m = x.shape[0]
    down = dispatch.choose(OP_DOWN, x.device, backend or None, m=m)
    u = down.fn(x, pool_a, adapter_idx, dropout_p, seed)
    choice = dispatch.choose(OP, x.device, backend or None, m=m, quantized=state is not None)
    chosen = _path(_OP_SINGLE, choice.backend, path, m, x.shape[1], shape[0], state, x.dtype)
    return choice.fn(x, weight, state, bias, u, pool_b, scales, adapter_idx, chosen), u


@_multi_op.register_fake
def _(x, weight, bias, pool_a, pool_b, scales, adapter_idx, dropout_p, absmax, nested_absmax, nested_code,
      quant_type, blocksize, shape, dtype, nested_offset, seed, backend, path):  # fmt: skip
    return x.new_empty((x.shape[0], shape[0])), x.new_empty((x.shape[0], pool_a.shape[1]))


@torch.library.custom_op("fastlora::lora_linear_multi_backward", mutates_args=())
def _multi_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    pool_a: torch.Tensor,
    pool_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_idx: torch.Tensor,
    dropout_p: torch.Tensor | None,
    u: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    quant_type: str,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
    nested_offset: float,
    seed: int,
    backend: str,
    path: str,
    needs_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    state = QuantState.from_op_args(absmax, nested_absmax, nested_code, quant_type, blocksize, shape, dtype,
                                    nested_offset)  # fmt: skip
    grads = dispatch.choose(OP_GRADS, grad.device, backend or None, m=grad.shape[0])
    v, grad_a, grad_b = grads.fn(grad, x, pool_a, pool_b, u, scales, adapter_idx, dropout_p, seed)
    if not needs_dx:
        return x.new_empty((0,)), grad_a, grad_b
    choice = dispatch.choose(OP_DX, grad.device, backend or None, m=grad.shape[0], quantized=state is not None)
    chosen = _path(_OP_SINGLE_DX, choice.backend, path, grad.shape[0], x.shape[1], shape[0], state, grad.dtype)
    grad_x = choice.fn(grad, weight, state, v, pool_a, adapter_idx, dropout_p, seed, chosen)
    return grad_x, grad_a, grad_b


@_multi_backward_op.register_fake
def _(grad, x, weight, pool_a, pool_b, scales, adapter_idx, dropout_p, u, absmax, nested_absmax, nested_code,
      quant_type, blocksize, shape, dtype, nested_offset, seed, backend, path, needs_dx):  # fmt: skip
    grad_x = torch.empty_like(x) if needs_dx else x.new_empty((0,))
    return grad_x, torch.empty_like(pool_a), torch.empty_like(pool_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, pool_a, pool_b, scales, idx, dropout_p, absmax, nested_absmax, nested_code, *rest = inputs
    ctx.save_for_backward(x, weight, pool_a, pool_b, scales, idx, dropout_p, output[1], absmax, nested_absmax,
                          nested_code)  # fmt: skip
    ctx.args = rest  # quant_type, blocksize, shape, dtype, nested_offset, seed, backend, path
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward(ctx, grad_y, grad_u):
    saved = ctx.saved_tensors
    grad_y = grad_y.contiguous() if grad_y.stride(-1) != 1 else grad_y
    grad_x, grad_a, grad_b = torch.ops.fastlora.lora_linear_multi_backward(grad_y, *saved, *ctx.args,
                                                                           ctx.needs_input_grad[0])  # fmt: skip
    grad_bias = grad_y.sum(0) if ctx.bias_grad else None
    grad_x = grad_x if ctx.needs_input_grad[0] else None
    # no gradient for weight, scales, the indices, dropout_p, the statistics and the non-tensor arguments
    return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, *[None] * (3 + len(ctx.args))


_multi_op.register_autograd(_backward, setup_context=_setup_context)


# -- the entry point ----------------------------------------------------------------------------------------


def _fail(what: str) -> None:
    raise ValueError(f"fastlora lora_linear_multi: {what}")


def _check(x, weight, bias, pool_a, pool_b, scales, idx, state, dropout_p, m, check_values) -> None:
    """Shapes, dtypes and devices; the value checks (index range, p in [0, 1)) in eager mode when asked."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"fastlora lora_linear_multi: x must be float32/float16/bfloat16/float64, got {x.dtype}")
    if pool_a.dim() != 3 or pool_b.dim() != 3:
        _fail(f"pool_a must be (S, R, K) and pool_b (S, N, R), got {tuple(pool_a.shape)} and {tuple(pool_b.shape)}")
    s, r, k = pool_a.shape
    n = state.shape[0] if state is not None else weight.shape[0]
    if k != x.shape[-1]:
        _fail(f"pool_a is (S, R, K) = {tuple(pool_a.shape)}, but x has K = {x.shape[-1]}")
    if tuple(pool_b.shape) != (s, n, r):
        _fail(f"pool_b must be (S, N, R) = {(s, n, r)} (pool_a's S and R, W's N), got {tuple(pool_b.shape)}")
    if state is None and tuple(weight.shape) != (n, k):
        _fail(f"weight must be (N, K) = {(n, k)}, got {tuple(weight.shape)}")
    if tuple(scales.shape) != (s,) or scales.dtype != torch.float32:
        _fail(f"scales must be a ({s},) float32 tensor, got {tuple(scales.shape)} {scales.dtype}")
    if dropout_p is not None and (tuple(dropout_p.shape) != (s,) or dropout_p.dtype != torch.float32):
        _fail(f"dropout_p must be None or a ({s},) float32 tensor, got {tuple(dropout_p.shape)} {dropout_p.dtype}")
    for name, t in (("pool_a", pool_a), ("pool_b", pool_b)):
        if t.dtype != x.dtype:
            raise TypeError(f"fastlora lora_linear_multi: {name} must be in x's dtype {x.dtype}, got {t.dtype}")
    if state is None and weight.dtype != x.dtype:
        raise TypeError(f"fastlora lora_linear_multi: a dense weight must be in x's dtype, got {weight.dtype}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        _fail(f"bias must be ({n},) in x's dtype, got {tuple(bias.shape)} {bias.dtype}")
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1 or idx.shape[0] != m:
        _fail(f"adapter_idx must be an ({m},) int32/int64 tensor (one slot per row of x), "
              f"got {tuple(idx.shape)} {idx.dtype}")  # fmt: skip
    tensors = [("weight", weight), ("pool_a", pool_a), ("pool_b", pool_b), ("scales", scales), ("adapter_idx", idx)]
    tensors += [("bias", bias), ("dropout_p", dropout_p)]
    for name, t in tensors:
        if t is not None and t.device != x.device:
            _fail(f"{name} is on {t.device}, x on {x.device}: every tensor must be on x's device")
    if torch.compiler.is_compiling() or not check_values or m == 0:
        return
    stats = [idx.min().long(), idx.max().long()]
    if dropout_p is not None and s > 0:
        stats.append(((dropout_p < 0) | (dropout_p >= 1)).any().long())
    lo, hi, *bad_p = torch.stack(stats).tolist()  # one device sync for every value check
    if lo < -1 or hi >= s:
        _fail(f"adapter_idx values must be in [-1, {s}) (-1: the bare base), got values in [{lo}, {hi}]")
    if bad_p and bad_p[0]:
        _fail(f"dropout_p values must be in [0, 1), got {dropout_p.tolist()}")


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pool_a: torch.Tensor,
    pool_b: torch.Tensor,
    scales: torch.Tensor,
    adapter_idx: torch.Tensor,
    *,
    quant_state: QuantState | None = None,
    dropout_p: torch.Tensor | None = None,
    seed: int = 0,
    backend: str | None = None,
    path: str | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """``y[m] = x[m] Wᵀ + b + scales[i] · d_i(x[m]) A_iᵀ B_iᵀ`` with ``i = adapter_idx[m]`` (no LoRA term at -1).

    Args:
        x: (..., K) fp32/fp16/bf16 (float64 on the torch backend); M = prod of the leading dims.
        weight: (N, K) dense in x's dtype, or packed 4-bit data described by ``quant_state``.
        bias: (N,) in x's dtype, or None.
        pool_a: (S, R, K) and pool_b: (S, N, R) in x's dtype: the adapters' A and B stacked, padded to R with zeros.
        scales: (S,) float32: s_i (alpha_i / r_i, or alpha_i / sqrt(r_i)); 0 for an empty slot.
        adapter_idx: (M,) int32/int64 on x's device: each row's slot, -1 for the bare base.
        quant_state: the :class:`QuantState` of a 4-bit (N, K) weight.
        dropout_p: None, or (S,) float32 per-slot LoRA dropout probabilities in [0, 1); the mask (row, column of
            the (M, K) view) is that of :func:`fastlora.functional.dropout_keep_mask` with ``seed`` at p_i.
        backend: "torch", "triton" or "native" (see the module docstring's table); default ``FASTLORA_BACKEND``,
            else by device.
        path: "fused" or "dequant_gemm" for the Triton forward; default ``FASTLORA_PATH``, else by size.
        check_values: check adapter_idx's range and dropout_p's values (one device sync on CUDA, skipped under
            torch.compile). A caller that validated the indices once for a whole model pass may pass False.

    Returns:
        (..., N) in x's dtype. Differentiable in x, bias, pool_a and pool_b (gradients of the pools' full
        shapes: zero for unused slots and padding).

    Raises:
        TypeError, ValueError: dtypes, shapes, devices or (eagerly) index / probability values out of range.
    """
    if quant_state is not None:
        _check_code_table(quant_state)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    _check(x, weight, bias, pool_a, pool_b, scales, adapter_idx, quant_state, dropout_p, x2.shape[0], check_values)
    idx = adapter_idx.to(torch.int32)
    quant = QuantArgs.dense(weight) if quant_state is None else quant_state.op_args()
    dispatch.requested_backend(backend, op=OP)  # an unknown name fails here, not inside the op
    requested_path(path)
    y, _ = torch.ops.fastlora.lora_linear_multi(x2, weight, bias, pool_a, pool_b, scales, idx, dropout_p, *quant,
                                                int(seed), backend or "", path or "")  # fmt: skip
    return y.view(*lead, y.shape[-1])
