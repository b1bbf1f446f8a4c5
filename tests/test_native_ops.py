"""The native ops' Python surface: errors a user can cause raise clear errors (from the wrappers and from the
torch.library ops called directly), and every op passes torch.library's opcheck and stays opaque to
torch.compile and fake tensors.
"""

from __future__ import annotations

import pytest
import torch

from fastlora import native
from fastlora.quant import quantize_4bit
from fastlora.quant.codes import get_bounds, get_dynamic_map
from fastlora.quant.ref import _blockwise_lut

pytestmark = pytest.mark.usefixtures("native_ext")  # every test here needs the extension built (conftest.py)


# -- errors ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    packed, state = quantize_4bit(torch.randn(20, 64), "nf4", 64)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match=r"x must be a float32/float16/bfloat16 tensor, got torch.int64"):
        native.gemv_4bit(torch.ones(2, 64, dtype=torch.long), packed, state)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 64\) for a weight of shape \(20, 64\), got \(2, 63\)"):
        native.gemv_4bit(torch.randn(2, 63), packed, state)
    with pytest.raises(ValueError, match=r"bias must have shape \(20,\), got \[21\]"):
        native.gemv_4bit(x, packed, state, torch.randn(21))
    with pytest.raises(TypeError, match=r"bias must be BFloat16, got Float"):
        native.gemv_4bit(x.bfloat16(), packed, state, torch.randn(20))
    with pytest.raises(ValueError, match=r"lora_a / lora_u given without lora_b"):
        native.gemv_4bit(x, packed, state, lora_a=torch.randn(3, 64))
    with pytest.raises(ValueError, match=r"exactly one of lora_a \(r, K\) and lora_u \(M, r\)"):
        native.gemv_4bit(
            x, packed, state, lora_a=torch.randn(3, 64), lora_b=torch.randn(20, 3), lora_u=torch.randn(2, 3)
        )
    with pytest.raises(ValueError, match=r"lora_a must have shape \(3, 64\), got \[3, 65\]"):
        native.gemv_4bit(x, packed, state, lora_a=torch.randn(3, 65), lora_b=torch.randn(20, 3))
    with pytest.raises(ValueError, match=r"packed weight holds 639 bytes .* needs ceil\(1280 / 2\) = 640"):
        native.gemv_4bit(x, packed[:-1], state)
    with pytest.raises(ValueError, match=r"x is on meta, the weight on cpu"):
        native.gemv_4bit(x.to("meta"), packed, state)
    bad = torch.randn(300, 7)
    bad[5, 3], bad[200, 0] = float("nan"), float("-inf")  # caught from the kernel's absmax
    with pytest.raises(ValueError, match=r"w has 2 NaN/Inf values; a 4-bit block cannot represent them"):
        native.quantize_4bit_cpu(bad, blocksize=4096)
    with pytest.raises(ValueError, match=r"quantize_4bit_cpu: w must be a CPU tensor, got one on meta"):
        native.quantize_4bit_cpu(torch.empty(4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"need lora_a \(r, 64\) and lora_b \(20, r\)"):
        native.merge_4bit(packed, state, torch.randn(3, 64), torch.randn(20, 4))
    # The ops check on their own (called directly, e.g. from a compiled graph).
    ops = torch.ops.fastlora
    with pytest.raises(ValueError, match=r"blocksize must be a power of two from 32 to 4096, got 48"):
        ops.dequantize_4bit_native(packed.view(-1), state.absmax, state.code, None, None, 0.0, 48, 1280, torch.float32)
    with pytest.raises(TypeError, match=r"absmax must be Float, got Double"):
        ops.dequantize_4bit_native(
            packed.view(-1), state.absmax.double(), state.code, None, None, 0.0, 64, 1280, torch.float32
        )
    with pytest.raises(ValueError, match=r"nested_absmax and nested_code come together"):
        ops.dequantize_4bit_native(
            packed.view(-1), state.absmax, state.code, state.absmax, None, 0.0, 64, 1280, torch.float32
        )
    with pytest.raises(TypeError, match=r"out_dtype must be float32/float16/bfloat16, got Int"):
        ops.dequantize_4bit_native(packed.view(-1), state.absmax, state.code, None, None, 0.0, 64, 1280, torch.int32)
    with pytest.raises(ValueError, match=r"x must be 2-D \(M, K\), got shape \[64\]"):
        ops.gemv_4bit_native(
            x[0], packed.view(-1), state.absmax, state.code, None, None, 0.0, 64, 20, None, None, None, None, 1.0
        )
    with pytest.raises(TypeError, match=r"w must be float32/float16/bfloat16, got Int"):
        ops.quantize_4bit_native(torch.ones(8, dtype=torch.int32), *get_bounds("nf4"), 64)


# -- torch.library: schemas, fake tensors, torch.compile ----------------------------------------------


def _op_samples():
    w = torch.randn(30, 70)
    packed, state = quantize_4bit(w, "nf4", 32, True)
    flat = packed.view(-1)
    qs = (state.absmax, state.code, state.nested.absmax, state.nested.code, state.nested.offset, 32)
    x = torch.randn(3, 70)
    lut = _blockwise_lut(tuple(get_dynamic_map().tolist()))
    lora = (torch.randn(4, 70), torch.randn(30, 4))
    ops = torch.ops.fastlora
    return [
        (ops.quantize_4bit_native.default, (w, *get_bounds("fp4"), 64)),
        (ops.quantize_blockwise_native.default, (torch.randn(300), lut, 256)),
        (ops.dequantize_4bit_native.default, (flat, *qs, w.numel(), torch.bfloat16)),
        (ops.gemv_4bit_native.default, (x, flat, *qs, 30, torch.randn(30), *lora, None, 0.5)),
        (ops.merge_4bit_native.default, (flat, *qs, *lora, 0.5, torch.float16)),
    ]


@pytest.mark.parametrize("index", range(5), ids=["quantize", "quantize_blockwise", "dequantize", "gemv", "merge"])
def test_opcheck(index):
    """Schema, fake (meta) implementation and AOT-dispatch checks of torch.library for every op."""
    op, args = _op_samples()[index]
    native.loader.ops(torch.device("cpu"), "opcheck")  # sync the test poisoning into the extension
    torch.library.opcheck(op, args)


def test_ops_are_opaque_to_torch_compile():
    packed, state = quantize_4bit(torch.randn(48, 96), "fp4", 64)
    x = torch.randn(2, 96)

    def f(x):
        return torch.ops.fastlora.gemv_4bit_native(
            x * 2.0, packed.view(-1), state.absmax, state.code, None, None, 0.0, 64, 48, None, None, None, None, 1.0
        ).relu()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        y = f(torch.empty(5, 96))
    assert y.shape == (5, 48)
