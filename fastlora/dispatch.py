"""Which implementation runs an op: one table per op, read in one place.

Every op (``quantize_4bit``, ``lora_linear``, ``adapter_down`` ...) registers its
implementations here, one per backend:

- ``"torch"``: the PyTorch reference. Runs on every device; the fallback of every op.
- ``"triton"``: fastlora's Triton kernels (:mod:`fastlora.kernels`). CUDA tensors; CPU tensors
  only under Triton's interpreter (``TRITON_INTERPRET=1``), and then only when asked for.
- ``"native"``: fastlora's C++/CUDA kernels from ``csrc/`` (:mod:`fastlora.native`), for the
  device types they were built for. ``"cuda"`` is accepted as its old name.

A registration states the device types an implementation runs on, the device types where it is
the default, an optional condition on the call (``when``: e.g. "a 4-bit weight and at most 16
rows") and an optional availability check (``available``: e.g. "the extension is built").
:func:`choose` reads the table: the caller's request (an argument, else ``FASTLORA_BACKEND``),
else the first registered implementation that is the default on the tensor's device and whose
condition and availability hold, else the reference. A requested native kernel that cannot run
falls back (Triton where it can run, else the reference) with one warning saying why.

This module imports nothing from fastlora: the tables are filled by the layers that own the
implementations (the reference by :mod:`fastlora.quant` and :mod:`fastlora.ops`, the kernels by
:mod:`fastlora.ops`), and nothing here touches a GPU or compiles anything.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

BACKENDS = ("torch", "triton", "native")
_ALIASES = {"cuda": "native"}  # the native backend's name before it ran on CPUs too
ENV = "FASTLORA_BACKEND"
_log = logging.getLogger("fastlora")

# A condition on the call: None when the implementation applies, else the reason it does not.
Condition = Callable[[Mapping[str, Any]], "str | None"]
# An availability check for a device: None when the implementation can run there, else why not.
Availability = Callable[[torch.device], "str | None"]


@dataclasses.dataclass(frozen=True)
class Impl:
    """One registered implementation of an op.

    Attributes:
        op: the op's name, e.g. "lora_linear".
        backend: "torch", "triton" or "native".
        fn: the implementation; every implementation of an op takes the same arguments.
        devices: device types it runs on ("cpu", "cuda"); the reference runs on every device.
        default_on: device types where it is chosen when nothing is requested.
        when: condition on the call's facts (sizes, quantisation), or None for always.
        available: availability on a device (e.g. the extension is built), or None for always.
    """

    op: str
    backend: str
    fn: Callable[..., Any]
    devices: tuple[str, ...]
    default_on: tuple[str, ...]
    when: Condition | None = None
    available: Availability | None = None

    def unmet(self, device: torch.device, facts: Mapping[str, Any]) -> str | None:
        """Why this implementation cannot run this call (None when it can)."""
        if self.backend != "torch" and device.type not in self.devices:
            return f"no {self.backend} kernel for {device.type} tensors"
        if self.when is not None and (reason := self.when(facts)) is not None:
            return reason
        if self.available is not None:
            return self.available(device)
        return None


@dataclasses.dataclass(frozen=True)
class Choice:
    """The implementation :func:`choose` picked and why, e.g. ``Choice("lora_linear", "native", ...)``."""

    op: str
    backend: str
    fn: Callable[..., Any]
    reason: str


_TABLES: dict[str, dict[str, Impl]] = {}


def register(
    op: str,
    backend: str,
    *,
    devices: tuple[str, ...] = (),
    default_on: tuple[str, ...] = (),
    when: Condition | None = None,
    available: Availability | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as ``op``'s implementation on ``backend``.

    The order of registration is the order of preference among defaults. Registering the same
    (op, backend) twice replaces the first (a reload), keeping its place.
    """
    if backend not in BACKENDS:
        raise ValueError(f"fastlora dispatch: backend must be one of {BACKENDS}, got {backend!r}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        _TABLES.setdefault(op, {})[backend] = Impl(op, backend, fn, devices, default_on, when, available)
        return fn

    return decorate


def table(op: str) -> dict[str, Impl]:
    """The registered implementations of ``op`` by backend, in order of preference."""
    if op not in _TABLES:
        raise KeyError(f"fastlora dispatch: no implementation of {op!r} is registered (known: {sorted(_TABLES)})")
    return dict(_TABLES[op])


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend(requested: str | None, *, op: str = "op") -> str | None:
    """The backend asked for: ``requested``, else ``FASTLORA_BACKEND``, else None; validated, alias resolved."""
    choice = requested or os.environ.get(ENV) or None
    if choice is None:
        return None
    choice = _ALIASES.get(choice, choice)
    if choice not in BACKENDS:
        raise ValueError(f"fastlora {op}: backend must be one of {BACKENDS}, got {choice!r}")
    return choice


@functools.cache
def _warn_once(message: str) -> None:
    _log.warning(message)


def choose(op: str, device: torch.device | str, requested: str | None = None, **facts: Any) -> Choice:
    """The implementation of ``op`` that runs a call on ``device``, and why.

    Args:
        op: a registered op's name.
        device: the device of the op's main input.
        requested: "torch", "triton", "native" (or its old name "cuda"), or None for
            ``FASTLORA_BACKEND``, else the default.
        facts: what the registered conditions read (e.g. ``m=4096, quantized=True``).

    Raises:
        ValueError: an unknown backend, or "triton" for a CPU tensor without the interpreter.
    """
    device = torch.device(device)
    impls = table(op)
    reference = impls.get("torch")
    wanted = requested_backend(requested, op=op)
    if wanted is None:
        for impl in impls.values():
            if impl.backend != "torch" and device.type in impl.default_on and impl.unmet(device, facts) is None:
                return Choice(op, impl.backend, impl.fn, f"the default on {device.type}")
        if reference is None:
            raise KeyError(f"fastlora dispatch: {op!r} has no reference implementation")
        return Choice(op, "torch", reference.fn, f"the reference: no faster {op} kernel is the default here")
    if wanted == "native":
        impl = impls.get("native")
        reason = "this op has no native kernel" if impl is None else impl.unmet(device, facts)
        if reason is None:
            return Choice(op, "native", impl.fn, "requested")
        fallback = "triton" if "triton" in impls and (device.type == "cuda" or interpreting()) else "torch"
        if impl is not None and impl.available is not None and impl.available(device) is not None:
            # not built / not loadable: one warning for every op
            _warn_once(f"fastlora: the native kernels (csrc/) are not available: {reason}; using the {fallback} path")
        else:
            _warn_once(f"fastlora {op}: no native kernel for this call ({reason}); using the {fallback} path")
        return Choice(op, fallback, impls[fallback].fn, f"native requested, but {reason}")
    if wanted == "triton":
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"fastlora {op}: the Triton backend needs a CUDA tensor (got one on {device}); "
                "set TRITON_INTERPRET=1 before importing fastlora to run the kernels on the CPU"
            )
        if "triton" not in impls:
            return Choice(op, "torch", reference.fn, "triton requested, but this op has no Triton kernel")
        return Choice(op, "triton", impls["triton"].fn, "requested")
    return Choice(op, "torch", reference.fn, "requested")
