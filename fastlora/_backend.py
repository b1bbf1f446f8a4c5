"""Which implementation runs an op: "torch" (reference), "triton", or "cuda" (native, csrc/).

Chosen per call from the tensor's device, overridable with ``backend=`` or the environment
variable ``FASTLORA_BACKEND``. "cuda" names fastlora's native kernels (:mod:`fastlora.native`),
which exist for CUDA tensors and, as OpenMP C++, for CPU tensors. Nothing here touches the GPU
or compiles anything at import time.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

BACKENDS = ("torch", "triton", "cuda")
_log = logging.getLogger("fastlora")


@functools.cache
def _warn_once(message: str) -> None:
    _log.warning(message)


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def native_available(device: torch.device) -> bool:
    """True when fastlora's native kernels are loaded and cover ``device`` (never compiles them)."""
    from fastlora import native

    return native.unavailable_reason(device) is None


def select(t: torch.Tensor, requested: str | None = None, *, op: str = "op", native: tuple[str, ...] = ()) -> str:
    """Backend for an op on tensor ``t``: the request, else ``FASTLORA_BACKEND``, else by device.

    Args:
        t: the op's main input; its device decides.
        requested: "torch", "triton", "cuda" or None.
        op: the op's name, for messages.
        native: device types ("cpu", "cuda") on which this op, for this input, has a native kernel.

    Default: "cuda" (native) for CPU tensors when the op has a native CPU kernel and the extension
    is built (those kernels are bit-identical to, or as exact as, the PyTorch path and many times
    faster); otherwise "triton" for CUDA tensors and "torch" for CPU tensors. "triton" on a CPU
    tensor needs ``TRITON_INTERPRET=1`` (a ``ValueError`` says so). "cuda" without a native kernel
    for the tensor's device (not built, or none for this op) falls back to "triton" (CUDA tensor or
    interpreter) or "torch", with one warning.
    """
    choice = requested or os.environ.get("FASTLORA_BACKEND") or None
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"fastlora {op}: backend must be one of {BACKENDS}, got {choice!r}")
    if choice is None:
        if not t.is_cuda and "cpu" in native and t.device.type == "cpu" and native_available(t.device):
            return "cuda"
        return "triton" if t.is_cuda else "torch"
    if choice == "cuda":
        if t.device.type in native and native_available(t.device):
            return "cuda"
        fallback = "triton" if t.is_cuda or interpreting() else "torch"
        from fastlora import native as native_module

        reason = native_module.unavailable_reason(t.device)
        if reason is not None:  # not built / not loadable: one warning for every op
            _warn_once(f"fastlora: the native kernels (csrc/) are not available: {reason}; using the {fallback} path")
        else:
            _warn_once(f"fastlora {op}: no native kernel for this input on {t.device.type}; using the {fallback} path")
        choice = fallback
    if choice == "triton" and not t.is_cuda and not interpreting():
        raise ValueError(
            f"fastlora {op}: the Triton backend needs a CUDA tensor (got one on {t.device}); "
            "set TRITON_INTERPRET=1 before importing fastlora to run the kernels on the CPU"
        )
    return choice
