"""Which implementation runs an op: "torch" (reference), "triton", or "cuda" (native, csrc/).

Chosen per call from the tensor's device, overridable with ``backend=`` or the environment
variable ``FASTLORA_BACKEND``. Nothing here touches the GPU at import time.
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


def select(t: torch.Tensor, requested: str | None = None, *, op: str = "op") -> str:
    """Backend for an op on tensor ``t``: the request, else ``FASTLORA_BACKEND``, else by device.

    Default: "triton" for CUDA tensors, "torch" for CPU tensors. "triton" on a CPU tensor needs
    ``TRITON_INTERPRET=1`` (a ``ValueError`` says so). "cuda" (native kernels) falls back to
    "triton" with one warning while the native extension is not built.
    """
    choice = requested or os.environ.get("FASTLORA_BACKEND") or None
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"fastlora {op}: backend must be one of {BACKENDS}, got {choice!r}")
    if choice is None:
        return "triton" if t.is_cuda else "torch"
    if choice == "cuda":
        _warn_once("fastlora: the native CUDA kernels (csrc/) are not built; using the Triton kernels")
        choice = "triton" if t.is_cuda or interpreting() else "torch"
    if choice == "triton" and not t.is_cuda and not interpreting():
        raise ValueError(
            f"fastlora {op}: the Triton backend needs a CUDA tensor (got one on {t.device}); "
            "set TRITON_INTERPRET=1 before importing fastlora to run the kernels on the CPU"
        )
    return choice
