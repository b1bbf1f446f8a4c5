"""Triton kernels, one concern per module, each with its PyTorch reference beside it (``*_ref.py``).

Shared building blocks (tile product, rounding, the launch path) are :mod:`fastlora.kernels.primitives`.
Importing this package registers every kernel's ahead-of-time compile specs in
:mod:`fastlora.kernels.specs` (compiled by :mod:`fastlora.aot`).
"""

from fastlora.kernels import (  # noqa: F401
    adapter,
    adapter_down,
    adapter_up,
    dequant,
    dora_norm,
    glu,
    lora,
    lora_multi,
    lora_multi_fused,
    lora_multi_specs,
    lora_specs,
    lowrank,
    quant4,
)
