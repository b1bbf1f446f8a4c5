"""The registry of ahead-of-time compile specs: one :class:`KernelSpec` per kernel signature and config.

Each kernel module registers, at import, every signature and tuning config its launcher may pick;
:mod:`fastlora.aot` compiles them all for real GPUs with no GPU present. This module imports nothing
from fastlora (nor triton), so every kernel module can register here and the compile driver, which
imports the kernels, sits above them: no import cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

TL_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
"""Triton's signature type of a pointer to each floating dtype the kernels take."""


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One compile of one kernel: a signature plus constexpr values and launch options.

    Attributes:
        name: readable id, e.g. "dequantize_4bit[bf16,nested]".
        fn: the ``@triton.jit`` function.
        signature: argument name -> triton type ("*fp32", "i32", "fp32", "constexpr").
        constexprs: values of the constexpr arguments.
        num_warps, num_stages: launch options of this config.
        tensor_core: True when the SASS on sm_90 must use HGMMA (wgmma) instructions.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    tensor_core: bool = False


_REGISTRY: list[KernelSpec] = []


def register(spec: KernelSpec) -> None:
    """Add ``spec`` to the compile list (kernel modules call this at import)."""
    _REGISTRY.append(spec)


def registered() -> list[KernelSpec]:
    """The specs registered so far: those of the kernel modules imported (all after ``import fastlora.kernels``)."""
    return list(_REGISTRY)
