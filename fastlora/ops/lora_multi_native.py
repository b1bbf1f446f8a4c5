"""The "native" row of the mixed-adapter forward table ``lora_linear_multi``: the decode GEMV of csrc/.

One launch for the 4-bit base and every row's own adapter: W is read once and dequantised in registers, and
the epilogue reads each row's slot and adds ``s_i·u[m]·B_iᵀ`` (:func:`fastlora.native.gemv_4bit_multi`). It
is the default on CPU and CUDA for a 4-bit weight and at most :data:`fastlora.native.MAX_DECODE_M` rows, when
the extension is built (else the table's next default runs). :mod:`fastlora.ops.lora_multi` imports this
module; the row registers by the table's name, so it does not import that module back.

Implementation signature (every row of the table takes the same):
``fn(x2, weight, state, bias, u, pool_b, scales, adapter_idx, path) -> y (M, N)`` with x2 (M, K) contiguous,
u (M, R) = d_i(x)·A_iᵀ (zero rows for slot -1), pool_b (S, N, R), scales (S,) fp32, adapter_idx (M,) int32.
"""

from __future__ import annotations

from fastlora import dispatch, native

OP = "lora_linear_multi"  # the table of fastlora.ops.lora_multi's forward


def _decode_only(facts) -> str | None:
    if not facts.get("quantized", False):
        return "the native grouped GEMV takes a 4-bit weight"
    if facts["m"] > native.MAX_DECODE_M:
        return f"the native grouped GEMV takes at most {native.MAX_DECODE_M} rows, got {facts['m']}"
    return None


@dispatch.register(OP, "native", devices=("cpu", "cuda"), default_on=("cpu", "cuda"), when=_decode_only,
                   available=native.unavailable_reason)  # fmt: skip
def _fwd_native(x, weight, state, bias, u, pool_b, scales, adapter_idx, path=None):
    """Decode: base + every row's adapter in one kernel (u carries each row's dropout). The op's eager wrapper
    has checked the index range; the CUDA kernel skips a row whose slot is out of range (no stray read)."""
    return native.gemv_4bit_multi(x, weight, state, bias, u, pool_b, scales, adapter_idx, check_index=False)
