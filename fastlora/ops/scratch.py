"""One shared scratch buffer per (device, dtype), and the 4-bit weight dequantised into it.

The large-M LoRA path dequantises a 4-bit W once per use and hands the dense copy to a GEMM. Every
layer can use the same memory for that copy, because a layer's GEMM has consumed it before the next
layer dequantises: :func:`scratch` returns a view of one growing buffer per (device, dtype), so a
Llama-3-8B holds one 14336 x 4096 bf16 buffer (112 MiB) instead of one per layer.

Rules for callers:
- the contents are valid until the next :func:`scratch` (or :func:`dequantized_weight`) call on that
  device and dtype; never keep the view (never ``ctx.save_for_backward`` it: the backward dequantises
  again); it is never a parameter and never requires grad;
- fastlora's ops run on the current CUDA stream, and the buffer is safe only under that rule: two
  streams using it at once would overwrite each other's W. Code that runs fastlora layers on several
  streams concurrently must synchronise between them or give each stream its own buffers;
- :func:`release` frees the buffers (e.g. before evaluation at a different size, or to return memory).
"""

from __future__ import annotations

import math

import torch

import fastlora.ops.quant  # noqa: F401  (fills the dequantize_4bit table with the native and Triton rows)
from fastlora import _alloc, dispatch
from fastlora.kernels.dequant import dequantize_4bit_into
from fastlora.quant.state import QuantState

_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _key_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def scratch(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A contiguous ``shape`` view of the shared buffer of (``device``, ``dtype``), grown when too small.

    Every caller gets the same memory: the view's contents are valid until the next call for this
    device and dtype (see the module docstring). Growing frees the old buffer first, so the peak is
    the new size, not the sum. A new buffer is poisoned in tests (:func:`fastlora._alloc.empty`).

    Args:
        shape: the view's shape, e.g. (N, K).
        dtype: its dtype (one buffer per dtype).
        device: its device (one buffer per device; "cuda" means the current CUDA device).

    Returns:
        Tensor of ``shape`` and ``dtype`` on ``device``, contiguous, ``requires_grad=False``.
    """
    device = _key_device(device)
    numel = math.prod(shape)
    key = (device, dtype)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.numel() < numel:
        _BUFFERS.pop(key, None)
        del buffer  # the old buffer goes back to the allocator before the new one is taken
        buffer = _alloc.empty((max(numel, 1),), dtype=dtype, device=device)
        _BUFFERS[key] = buffer
    return buffer[:numel].view(shape)


def release(device: torch.device | str | None = None) -> None:
    """Free the shared buffers of ``device`` (all devices when None). Views handed out keep their memory alive."""
    target = None if device is None else _key_device(device)
    for key in [k for k in _BUFFERS if target is None or k[0] == target]:
        del _BUFFERS[key]


def dequantized_weight(
    weight: torch.Tensor,
    state: QuantState | None,
    dtype: torch.dtype,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The (N, K) base weight as a dense ``dtype`` tensor: a 4-bit W dequantised into the shared scratch.

    Args:
        weight: the packed 4-bit bytes of an (N, K) W (with ``state``), or a dense (N, K) W (``state`` None).
        state: W's :class:`~fastlora.quant.QuantState`, or None for a dense W.
        dtype: fp32, fp16 or bf16, the dtype of the result (of a 4-bit W; a dense W keeps its own).
        backend: "triton": the bandwidth-bound kernel of :mod:`fastlora.kernels.dequant` (CUDA, and CPU
            tensors under ``TRITON_INTERPRET=1``); "native" or "torch": the ``dequantize_4bit`` table's
            kernel, then one copy into the scratch (they allocate their result). None: the Triton kernel
            on CUDA, the ``dequantize_4bit`` default elsewhere (native on CPU when built, else torch).

    Returns:
        A dense W unchanged; else an (N, K) ``dtype`` view of :func:`scratch`, bit-equal to
        :func:`fastlora.quant.ref.dequantize_4bit_ref`, valid until the next scratch use on this device and dtype.
    """
    if state is None:
        return weight
    if backend is None and weight.device.type == "cuda":
        backend = "triton"
    choice = dispatch.choose("dequantize_4bit", weight.device, backend)
    if choice.backend == "triton":
        return dequantize_4bit_into(weight, state, scratch(tuple(state.shape), dtype, weight.device))
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantized_weight: state must be a fastlora QuantState, got {type(state).__name__}")
    state.validate(weight, where="dequantized_weight")
    # these kernels allocate their result (no `out=`): one extra write and read of W, on the CPU only
    dense = choice.fn(weight, state, dtype)
    out = scratch(tuple(state.shape), dtype, weight.device)
    return out.copy_(dense.view(out.shape))
