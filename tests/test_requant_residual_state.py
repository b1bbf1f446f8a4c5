"""The refit residual of an error-compensated 4-bit merge (``merge(requantize=True, refit_rank=k)``) in the layer's
state dict (``weight.residual_R`` / ``weight.residual_L``): a saved merged layer reloads with the same outputs."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from fastlora import FastLoRALinear


def _merged(use_dora: bool = False) -> tuple[nn.Linear, FastLoRALinear]:
    linear = nn.Linear(64, 24)
    layer = FastLoRALinear.from_linear(linear, 4, 8.0, quant="nf4", init="gaussian", use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)  # a trained-looking adapter: the merge changes W
    report = layer.merge(requantize=True, refit_rank=3, refit_iters=2)
    assert report["refit_kept"] == 1.0 and layer._residual is not None
    return linear, layer


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_saved_merged_layer_reloads_with_the_same_outputs(use_dora):
    linear, layer = _merged(use_dora)
    x = torch.randn(5, 64)
    want = layer(x)
    sd = layer.state_dict()
    r, lo = sd["weight.residual_R"], sd["weight.residual_L"]
    assert r.shape == (3, 64) and lo.shape == (24, 3) and r.dtype == lo.dtype == torch.float32
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    fresh = FastLoRALinear.from_linear(linear, 4, 8.0, quant="nf4", init="gaussian", use_dora=use_dora)
    result = fresh.load_state_dict(torch.load(buffer), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.merged and torch.equal(fresh._residual[0], r) and torch.equal(fresh._residual[1], lo)
    torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
    # without the residual the outputs differ: the keys carry it
    plain = FastLoRALinear.from_linear(linear, 4, 8.0, quant="nf4", init="gaussian", use_dora=use_dora)
    plain.load_state_dict({k: v for k, v in sd.items() if "residual" not in k})
    plain.merged = True
    assert not torch.allclose(plain(x), want)
    with pytest.raises(RuntimeError, match="cannot be undone"):
        fresh.unmerge()


def test_one_residual_key_alone_is_refused():
    _, layer = _merged()
    sd = layer.state_dict()
    del sd["weight.residual_L"]
    with pytest.raises(ValueError, match="only one of"):
        FastLoRALinear.from_linear(nn.Linear(64, 24), 4, 8.0, quant="nf4").load_state_dict(sd)
