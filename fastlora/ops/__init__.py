"""Ops: ``torch.library`` custom ops with autograd and fake shapes, and each op's dispatch table.

Importing this package registers every kernel implementation in :mod:`fastlora.dispatch`
(``fastlora`` imports it), so :func:`fastlora.dispatch.choose` sees the whole table.
"""

from fastlora.ops import quant  # noqa: F401  (registers the 4-bit kernels)
from fastlora.ops.adapter import adapter_forward
from fastlora.ops.lora import lora_linear
from fastlora.ops.lora_multi import lora_linear_multi
from fastlora.ops.planner import LoRAPlan, plan
from fastlora.ops.quant import merge_4bit

__all__ = ["LoRAPlan", "adapter_forward", "lora_linear", "lora_linear_multi", "merge_4bit", "plan"]
