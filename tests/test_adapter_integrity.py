"""Saved adapters carry a sha256 of their tensor file and a fingerprint of their base (issue 18).

Found: flipped bytes in an adapter's tensor data loaded silently (val loss 122.9 instead of 1.07), and an adapter
trained on another base of the same shapes loaded silently. Now every method writes ``fastlora_integrity.json``
beside peft's two files; a tensor file that does not hash to the record is an error naming it, and a base whose
weights do not match the recorded fingerprint is an error unless ``allow_base_mismatch=True`` (a warning then).
The same base in another dtype, or quantised to 4 bits, still matches. peft's files (no record) load unchecked.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from models import tiny_llama
from prompt_cases import bert
from torch import nn

import fastlora
from fastlora.methods.bottleneck import AdapterConfig, inject_adapters, load_adapters
from fastlora.methods.files import INTEGRITY_NAME, WEIGHTS_NAME, read_files
from fastlora.methods.fingerprint import (
    FLOAT_TOLERANCE,
    QUANT_TOLERANCE,
    base_fingerprint,
    check_base_fingerprint,
)
from fastlora.methods.prompt import PTuningConfig, inject_prompt, load_prompt
from fastlora.quant import quantize_4bit

VOCAB = 97


class Toy(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        return self.out(torch.relu(self.q_proj(x)) + self.v_proj(x))


def _toy(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Toy().to(dtype)


def _flip_a_data_byte(directory):
    """XOR one byte in the middle of the tensor data (not the header): still a valid safetensors file."""
    path = os.path.join(directory, WEIGHTS_NAME)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    (header,) = struct.unpack("<Q", data[:8])
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x40
    with open(path, "wb") as f:
        f.write(bytes(data))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _lora_saved(tmp_path, seed=0, **config):
    model = fastlora.inject(_toy(seed), r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **config)
    model.save_adapter(str(tmp_path))
    return model


# -- the record ------------------------------------------------------------------------------------


def test_record_beside_peft_files(tmp_path):
    _lora_saved(tmp_path)
    record = json.loads((tmp_path / INTEGRITY_NAME).read_text())
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    import hashlib

    assert record["files"] == {WEIGHTS_NAME: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    fingerprint = record["base_fingerprint"]
    assert fingerprint["count"] == 2 and [s["name"] for s in fingerprint["samples"]] == ["q_proj", "v_proj"]
    # adapter_config.json stays peft's own: no unknown key for peft to refuse (before 0.13) or warn about
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not any("fastlora" in key or "fingerprint" in key or "sha256" in key for key in config)


# -- flipped bytes ---------------------------------------------------------------------------------


def test_flipped_byte_is_an_error_naming_the_file_lora(tmp_path):
    saved = _lora_saved(tmp_path)
    _flip_a_data_byte(tmp_path)
    host = _toy()
    before = _state(host)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} is damaged or was changed after saving: .* records"):
        fastlora.load(host, str(tmp_path))
    assert _unchanged(host, before)
    with pytest.raises(ValueError, match="is damaged"):
        read_files(str(tmp_path))
    # what the issue found: without the record (peft's files have none) the damage loads silently
    os.remove(tmp_path / INTEGRITY_NAME)
    loaded = fastlora.load(_toy(), str(tmp_path))
    x = torch.randn(3, 32)
    assert not torch.equal(loaded(x), saved(x))


def test_flipped_byte_is_an_error_bottleneck(tmp_path):
    model = inject_adapters(tiny_llama(0, vocab_size=VOCAB), AdapterConfig(r=4, placement="houlsby"))
    model.save_adapter(str(tmp_path))
    _flip_a_data_byte(tmp_path)
    host = tiny_llama(0, vocab_size=VOCAB)
    before = _state(host)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} is damaged or was changed after saving"):
        load_adapters(host, str(tmp_path))
    assert _unchanged(host, before)


def test_flipped_byte_is_an_error_prompt(tmp_path):
    inject_prompt(bert(), PTuningConfig(4)).save_adapter(str(tmp_path))
    _flip_a_data_byte(tmp_path)
    host = bert()
    before = _state(host)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} is damaged or was changed after saving"):
        load_prompt(host, str(tmp_path))
    assert _unchanged(host, before)


def test_torn_save_is_reported(tmp_path, monkeypatch):
    """The record is written first: a save that dies before its weights are in place leaves old weights that
    the new record does not match, reported on load instead of mixing two saves."""
    model = _lora_saved(tmp_path)
    with torch.no_grad():
        model.model.q_proj.lora_B.add_(1.0)
    import fastlora.methods.files as files

    real = files.atomic_write

    def dies_on_the_weights(path, data):
        if path.endswith(WEIGHTS_NAME):
            raise OSError("killed")
        real(path, data)

    monkeypatch.setattr(files, "atomic_write", dies_on_the_weights)
    with pytest.raises(OSError, match="killed"):
        model.save_adapter(str(tmp_path))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="is damaged or was changed after saving"):
        fastlora.load(_toy(), str(tmp_path))


def test_malformed_record_is_an_error(tmp_path):
    _lora_saved(tmp_path)
    (tmp_path / INTEGRITY_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{INTEGRITY_NAME} must hold files"):
        fastlora.load(_toy(), str(tmp_path))
    (tmp_path / INTEGRITY_NAME).write_text("{oops")
    with pytest.raises(ValueError, match=rf"{INTEGRITY_NAME} is not valid JSON"):
        fastlora.load(_toy(), str(tmp_path))


# -- another base ----------------------------------------------------------------------------------


def test_other_base_of_the_same_shapes_is_an_error_and_the_flag_loads_it(tmp_path):
    saved = _lora_saved(tmp_path, seed=0)
    other = _toy(seed=1)
    before = _state(other)
    with pytest.raises(ValueError, match=r"saved on another base model: q_proj .* allow_base_mismatch=True"):
        fastlora.load(other, str(tmp_path))
    assert _unchanged(other, before)
    with pytest.warns(UserWarning, match=r"another base model: q_proj .*loading it anyway"):
        loaded = fastlora.load(other, str(tmp_path), allow_base_mismatch=True)
    for path in ("q_proj", "v_proj"):  # the adapter itself is what was saved
        torch.testing.assert_close(loaded.model.get_submodule(path).lora_B, saved.model.get_submodule(path).lora_B)
    # the LoraModel method too, and on a model that already holds an adapter
    host = fastlora.inject(_toy(seed=1), r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="another base model"):
        host.load_adapter(str(tmp_path), "other")
    assert list(host.peft_config) == ["default"]


def test_other_base_is_an_error_bottleneck_and_prompt(tmp_path):
    inject_adapters(tiny_llama(0, vocab_size=VOCAB), AdapterConfig(r=4)).save_adapter(str(tmp_path / "a"))
    with pytest.raises(ValueError, match="saved on another base model"):
        load_adapters(tiny_llama(1, vocab_size=VOCAB), str(tmp_path / "a"))
    with pytest.warns(UserWarning, match="another base model"):
        load_adapters(tiny_llama(1, vocab_size=VOCAB), str(tmp_path / "a"), allow_base_mismatch=True)
    load_adapters(tiny_llama(0, vocab_size=VOCAB), str(tmp_path / "a"))  # its own base

    inject_prompt(bert(0), PTuningConfig(4)).save_adapter(str(tmp_path / "p"))
    with pytest.raises(ValueError, match="saved on another base model"):
        load_prompt(bert(1), str(tmp_path / "p"))
    with pytest.warns(UserWarning, match="another base model"):
        load_prompt(bert(1), str(tmp_path / "p"), allow_base_mismatch=True)
    load_prompt(bert(0), str(tmp_path / "p"))


def test_trained_heads_are_not_part_of_the_base(tmp_path):
    """A head trained beside the adapter (modules_to_save) differs from the fresh host's: not a base mismatch."""
    model = _lora_saved(tmp_path, modules_to_save=["out"])
    with torch.no_grad():
        model.model.out.trained.default.weight.add_(1.0)
    model.save_adapter(str(tmp_path))
    fastlora.load(_toy(), str(tmp_path))


# -- the same base in another form still matches ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_base_in_another_dtype_matches(tmp_path, dtype):
    _lora_saved(tmp_path)
    loaded = fastlora.load(_toy(dtype=dtype), str(tmp_path))
    assert loaded.model.q_proj.weight.dtype == dtype


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_same_base_through_4_bits_matches_both_ways(tmp_path, quant):
    # trained on the 4-bit base (QLoRA), loaded on the float one
    _lora_saved(tmp_path / "q", quantize=quant)
    fastlora.load(_toy(), str(tmp_path / "q"))
    # trained on the float base, loaded beside another adapter on the 4-bit one
    _lora_saved(tmp_path / "f")
    host = fastlora.inject(_toy(), r=2, target_modules=["q_proj", "v_proj"], quantize=quant)
    host.load_adapter(str(tmp_path / "f"), "float-trained")
    # another base stays a mismatch through 4 bits
    other = fastlora.inject(_toy(seed=1), r=2, target_modules=["q_proj", "v_proj"], quantize=quant)
    with pytest.raises(ValueError, match=rf"q_proj differs by .*saved from float32, here {quant}"):
        other.load_adapter(str(tmp_path / "f"), "float-trained")


def test_fingerprint_tolerances():
    """The numbers behind the tolerances: a dtype cast moves the sampled values by < 1 %, 4-bit quantisation by
    ~10-15 %, another base of the same shapes by ~140 %."""
    torch.manual_seed(0)
    w = torch.randn(96, 256) / 16
    recorded = base_fingerprint([("w", w, None)])
    check_base_fingerprint(recorded, [("w", w.bfloat16(), None)], where="test")
    for quant in ("nf4", "fp4"):
        packed, state = quantize_4bit(w, quant, 64, True)
        check_base_fingerprint(recorded, [("w", packed, state)], where="test")
        check_base_fingerprint(base_fingerprint([("w", packed, state)]), [("w", w.half(), None)], where="test")
    other = torch.randn(96, 256) / 16
    with pytest.raises(ValueError, match=r"w differs by 1\d\d% .*saved from float32, here bfloat16"):
        check_base_fingerprint(recorded, [("w", other.bfloat16(), None)], where="test")
    with pytest.raises(ValueError, match=r"w \(float32\) has other values \(they differ by 1\d\d\.\d\d%"):
        check_base_fingerprint(recorded, [("w", other, None)], where="test")
    # in the same dtype values must be equal (a fine-tune of the base that moved weights by 0.1 % is another
    # base), or one the other rounded to bf16/fp16 (a base cast down and back up)
    with pytest.raises(ValueError, match=r"w \(float32\) has other values \(they differ by 0\.1"):
        check_base_fingerprint(recorded, [("w", w * 1.001, None)], where="test")
    check_base_fingerprint(recorded, [("w", w.bfloat16().float(), None)], where="test")
    check_base_fingerprint(base_fingerprint([("w", w.half().float(), None)]), [("w", w, None)], where="test")
    with pytest.raises(ValueError, match="shapes of the adapted base weights differ"):
        check_base_fingerprint(recorded, [("w", w.reshape(256, 96), None)], where="test")
    assert FLOAT_TOLERANCE < QUANT_TOLERANCE < 1.0
    # weights this process cannot read alone give no fingerprint, and nothing is checked against them
    assert base_fingerprint([("w", torch.empty(4, 4, device="meta"), None)]) is None
    check_base_fingerprint(recorded, [("w", torch.empty(96, 256, device="meta"), None)], where="test")


# -- peft's files ----------------------------------------------------------------------------------


def test_a_directory_without_a_record_loads_unchecked(tmp_path):
    """peft writes no fastlora_integrity.json: its files load as before (and fastlora's without the record)."""
    saved = _lora_saved(tmp_path)
    os.remove(tmp_path / INTEGRITY_NAME)
    x = torch.randn(2, 32)
    torch.testing.assert_close(fastlora.load(_toy(), str(tmp_path))(x), saved(x))
    fastlora.load(_toy(seed=1), str(tmp_path))  # no fingerprint either: nothing to compare


def test_peft_loads_fastlora_files_without_a_warning(tmp_path):
    peft = pytest.importorskip("peft")
    saved = _lora_saved(tmp_path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. peft's "Unexpected keyword arguments ... upgrade PEFT"
        theirs = peft.PeftModel.from_pretrained(_toy(), str(tmp_path)).eval()
    x = torch.randn(2, 32)
    torch.testing.assert_close(theirs(x), saved(x))
