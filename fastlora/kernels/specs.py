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
        ones: int arguments equal to 1 when the kernel runs as profiled (e.g. a unit stride): the
            launcher's JIT turns an int argument equal to 1 into a constant, so the AOT compile does too.
        div16: arguments with triton's run-time divisibility-16 hint (a pointer 16-byte aligned, an int
            divisible by 16); None means every pointer argument and no int. The JIT gives the hint
            to every argument that has it, and it changes the code (vector loads, pipelining), so the
            compile that is checked and modelled must receive the same.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    tensor_core: bool = False
    ones: tuple[str, ...] = ()
    div16: tuple[str, ...] | None = None

    def runtime_signature(self) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], list]]:
        """(signature, constexprs, attrs) as the run-time JIT specialises the call: ``ones`` made constants 1,
        ``div16`` (default: the pointers) given ``tt.divisibility = 16``. Arguments are indexed by position
        in the signature, which lists every argument of the kernel in order."""
        signature = dict(self.signature)
        constexprs = dict(self.constexprs)
        for name in self.ones:
            if signature.get(name) not in ("i32", "i64"):
                raise ValueError(f"{self.name}: {name!r} in ones is not an int argument")
            signature[name] = "constexpr"
            constexprs[name] = 1
        names = list(signature)
        hinted = self.div16 if self.div16 is not None else [n for n, t in signature.items() if t.startswith("*")]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in hinted if n not in self.ones}
        return signature, constexprs, attrs


_REGISTRY: list[KernelSpec] = []


def register(spec: KernelSpec) -> None:
    """Add ``spec`` to the compile list (kernel modules call this at import)."""
    _REGISTRY.append(spec)


def registered() -> list[KernelSpec]:
    """The specs registered so far: those of the kernel modules imported (all after ``import fastlora.kernels``)."""
    return list(_REGISTRY)
