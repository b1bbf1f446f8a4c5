"""The blockwise 4-bit NF4/FP4 format, bit-compatible with bitsandbytes."""

from fastlora.quant.api import absmax_fp32, dequantize_4bit, quantize_4bit
from fastlora.quant.codes import BLOCKSIZES, QUANT_TYPES, get_code, get_dynamic_map
from fastlora.quant.state import NestedState, QuantArgs, QuantState

__all__ = [
    "BLOCKSIZES",
    "QUANT_TYPES",
    "NestedState",
    "QuantArgs",
    "QuantState",
    "absmax_fp32",
    "dequantize_4bit",
    "get_code",
    "get_dynamic_map",
    "quantize_4bit",
]
