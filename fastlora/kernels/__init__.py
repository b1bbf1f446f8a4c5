"""Triton kernels, one concern per module, each with its PyTorch reference beside it (``*_ref.py``).

Importing this package registers every kernel's ahead-of-time compile specs (see
:mod:`fastlora.aot`).
"""

from fastlora.kernels import adapter, lora, quant4  # noqa: F401
