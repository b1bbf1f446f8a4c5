"""QuantState: bitsandbytes interop (QuantState, Linear4bit state dicts) and loud errors on bad input."""

import dataclasses
import json

import pytest
import torch
from helpers import id_formatter

from fastlora.quant import QuantState, dequantize_4bit, quantize_4bit

bnb = pytest.importorskip("bitsandbytes")


def _bnb_linear(in_f, out_f, quant_type, double_quant, weight, bias):
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=True, quant_type=quant_type, compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant
    )
    layer.bias = torch.nn.Parameter(bias)
    return layer.to("cpu")  # quantises


@pytest.mark.parametrize("double_quant", [False, True], ids=id_formatter("dq"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_linear4bit_state_dict_loads_into_fastlora(quant_type, double_quant):
    w, b = torch.randn(48, 70), torch.randn(48)
    layer = _bnb_linear(70, 48, quant_type, double_quant, w, b)
    sd = layer.state_dict()
    state = QuantState.from_state_dict(sd, "weight.", packed=sd["weight"])
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(dequantize_4bit(sd["weight"], state), expected)
    # and it is what fastlora itself produces from the same float weight
    packed, own = quantize_4bit(w, quant_type, 64, double_quant)
    assert torch.equal(packed, sd["weight"])
    for key, value in own.state_dict("weight.").items():
        assert torch.equal(value, sd[key]), key


@pytest.mark.parametrize("double_quant", [False, True], ids=id_formatter("dq"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fastlora_state_dict_loads_into_bnb_linear4bit(quant_type, double_quant):
    # Rows a multiple of the blocksize: bitsandbytes 0.50's native CPU dequantiser misreads
    # blocks that straddle rows (e.g. 40x96 at blocksize 64: max error 1.8 instead of 0.4).
    w, b = torch.randn(40, 256), torch.randn(40)
    packed, state = quantize_4bit(w, quant_type, 128, double_quant)
    sd = {"weight": packed, "bias": b, **state.state_dict("weight.")}
    # bitsandbytes' loader for pre-quantised checkpoints (the one transformers uses)
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    layer = bnb.nn.Linear4bit(256, 40, bias=True, quant_type=quant_type, compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    layer.bias = torch.nn.Parameter(b)
    w_dq = dequantize_4bit(packed, state)
    assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state), w_dq)
    x = torch.randn(5, 256)
    torch.testing.assert_close(layer(x), x @ w_dq.T + b, rtol=1e-5, atol=1e-5)
    # bnb's own save round-trips back to the same state
    again = QuantState.from_state_dict(layer.state_dict(), "weight.", packed=layer.state_dict()["weight"])
    assert torch.equal(dequantize_4bit(packed, again), w_dq)


@pytest.mark.parametrize("double_quant", [False, True], ids=id_formatter("dq"))
def test_bnb_quant_state_round_trip(double_quant):
    packed, state = quantize_4bit(torch.randn(33, 65), "nf4", 64, double_quant)
    back = QuantState.from_bnb(state.to_bnb())
    assert torch.equal(dequantize_4bit(packed, back), dequantize_4bit(packed, state))
    assert torch.equal(bnb.functional.dequantize_4bit(packed, state.to_bnb()), dequantize_4bit(packed, state))


def test_state_dict_survives_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    packed, state = quantize_4bit(torch.randn(16, 64), "fp4", 64, double_quant=True)
    save_file({"w": packed, **state.state_dict("w.")}, tmp_path / "q.safetensors")
    sd = load_file(tmp_path / "q.safetensors")
    again = QuantState.from_state_dict(sd, "w.", packed=sd["w"])
    assert torch.equal(dequantize_4bit(sd["w"], again), dequantize_4bit(packed, state))


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"w": torch.ones(4, 4, dtype=torch.int32)}, TypeError, "float32/float16/bfloat16, got torch.int32"),
        ({"w": torch.ones(0, 4)}, ValueError, r"empty \(shape \(0, 4\)\)"),
        ({"blocksize": 16}, ValueError, "blocksize must be one of .* got 16"),
        ({"quant_type": "int4"}, ValueError, "quant_type must be one of .* got 'int4'"),
        ({"w": torch.tensor([[1.0, float("nan")]])}, ValueError, "1 NaN/Inf values"),
        ({"w": [1.0, 2.0]}, TypeError, "must be a tensor, got list"),
        (
            {"w": torch.ones(5), "quant_storage": torch.bfloat16},
            ValueError,
            "do not fill whole torch.bfloat16",
        ),
    ],
    ids=["int", "empty", "blocksize", "quant_type", "nan", "list", "storage"],
)
def test_quantize_rejects_bad_input(kwargs, error, match):
    args = {"w": torch.randn(4, 64), "quant_type": "nf4", "blocksize": 64, **kwargs}
    with pytest.raises(error, match=match):
        quantize_4bit(**args)


def test_dequantize_rejects_packed_that_does_not_match_state():
    packed, state = quantize_4bit(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"holds 255 bytes .* needs ceil\(512 / 2\) = 256"):
        dequantize_4bit(packed[:-1], state)
    with pytest.raises(TypeError, match="state must be a fastlora QuantState"):
        dequantize_4bit(packed, state.to_bnb())
    with pytest.raises(TypeError, match="out_dtype must be"):
        dequantize_4bit(packed, state, torch.int8)
    bad = dataclasses.replace(state, absmax=state.absmax[:-1])
    with pytest.raises(ValueError, match=r"absmax must have shape \(8,\), found \(7,\)"):
        dequantize_4bit(packed, bad)


def _sd(double_quant=True):
    packed, state = quantize_4bit(torch.randn(8, 64), "nf4", 64, double_quant)
    return packed, {"weight": packed, **state.state_dict("weight.")}


def _with_meta(sd, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    meta.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del meta[k]
    return {**sd, key: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda sd: {k: v for k, v in sd.items() if k != "weight.absmax"}, "missing weight.absmax"),
        (lambda sd: {k: v for k, v in sd.items() if "quant_state" not in k}, "expected exactly one of"),
        (
            lambda sd: {
                **sd,
                "weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 0, 255], dtype=torch.uint8),
            },
            "not the JSON blob",
        ),
        (lambda sd: _with_meta(sd, quant_type="fp4"), "says quant_type 'fp4', its key says 'nf4'"),
        (lambda sd: _with_meta(sd, blocksize=48), "blocksize must be one of .* found 48"),
        (lambda sd: _with_meta(sd, shape=[8, 63]), r"holds 256 bytes .* needs ceil\(504 / 2\) = 252"),
        (lambda sd: _with_meta(sd, shape="8x64"), "shape must be a list of positive ints"),
        (lambda sd: _with_meta(sd, dtype="int8"), "dtype must be one of"),
        (lambda sd: _with_meta(sd, blocksize=None), "lacks the field 'blocksize'"),
        (
            lambda sd: {k: v for k, v in sd.items() if k != "weight.nested_absmax"},
            "lacks weight.nested_absmax",
        ),
        (
            lambda sd: {**sd, "weight.absmax": sd["weight.absmax"].float()},
            "absmax must be torch.uint8, found torch.float32",
        ),
        (lambda sd: {**sd, "weight.quant_map": torch.zeros(15)}, r"quant_map must have shape \(16,\)"),
        (lambda sd: _with_meta(sd, nested_offset="abc"), "nested_offset must be a number"),
        (lambda sd: {**sd, "weight.quant_map": sd["weight.quant_map"] * 1.01}, "not the standard nf4 table"),
    ],
    ids=[
        "no-absmax",
        "no-quant-state",
        "corrupt-json",
        "type-mismatch",
        "blocksize",
        "shape",
        "shape-type",
        "dtype",
        "missing-field",
        "no-nested",
        "absmax-dtype",
        "quant-map",
        "offset",
        "custom-code",
    ],
)
def test_state_dict_errors_name_the_field(mutate, match):
    packed, sd = _sd()
    with pytest.raises((ValueError, TypeError), match=match):
        QuantState.from_state_dict(mutate(sd), "weight.", packed=packed)
