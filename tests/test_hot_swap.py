"""Hot-swap: an adapter directory loaded into an existing slot (same or smaller rank, same targets or a subset)
gives the outputs of a fresh injection, causes no recompile of compiled mixed-batch code, and a directory that
does not fit (another base, larger rank, other targets, other shapes) raises before anything changes."""

import copy

import pytest
import torch
from helpers import rel_error, snapshot
from torch import nn

import fastlora
from fastlora.methods.lora import LoraConfig

TARGETS = ["0", "2"]


def _host(seed=0, width=40):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, width), nn.ReLU(), nn.Linear(width, 16))


def _model(host):
    """Slots: a (r 4, both layers), b (r 8, alpha 4, both layers); B random (a non-identity start)."""
    model = fastlora.inject(host, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                            adapter_name="a")  # fmt: skip
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    return model


def _saved(tmp_path, name, config, host=None):
    """A directory holding adapter ``config`` trained on ``host`` (default: the same base as :func:`_model`)."""
    donor = fastlora.inject(host or _host(), config)
    donor.save(str(tmp_path / name))
    return str(tmp_path / name), donor


@torch.no_grad()
def test_swap_equals_fresh_injection_without_recompile(tmp_path):
    dynamo = pytest.importorskip("torch._dynamo")
    model = _model(_host())
    # a smaller rank (2 < 8), another alpha, rsLoRA and one layer of the slot's two: zero-padded, the other zero
    directory, donor = _saved(tmp_path, "new", LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["2"],
                                                          init_lora_weights=False))  # fmt: skip
    x = torch.randn(3, 5, 24)
    idx = torch.tensor([0, 1, -1])
    before = model(x, adapter_index=idx)  # prepares the pools eagerly
    dynamo.reset()
    counters = dynamo.utils.counters
    compiled = torch.compile(lambda x, i: model(x, adapter_index=i), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, idx), before)
    graphs = counters["stats"]["unique_graphs"]
    model.hot_swap("b", directory)
    after = compiled(x, idx)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile
    assert torch.equal(after[[0, 2]], before[[0, 2]])  # the other slot and the base rows are untouched
    assert rel_error(after[1:2], donor(x[1:2])) < 1e-6  # slot b now computes the donor adapter
    assert torch.equal(model(x, adapter_index=idx), after)
    # the single-adapter forward and save() see the swapped adapter too (rank kept, alpha rescaled)
    model.set_adapter("b")
    assert rel_error(model(x), donor(x)) < 1e-6
    model.save(str(tmp_path / "resaved"), adapter_name="b")
    again = fastlora.load(_host(), str(tmp_path / "resaved"))
    assert rel_error(again(x), donor(x)) < 1e-6


def test_swap_by_slot_trains_and_unloads(tmp_path):
    model = _model(_host())
    directory, donor = _saved(tmp_path, "same", LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS,
                                                           init_lora_weights=False))  # fmt: skip
    model.hot_swap(model.adapter_slot("a"), directory)
    x = torch.randn(2, 24)
    model.train_adapters(["a"])
    y = model(x, adapter_names=["a", "__base__"])
    assert rel_error(y[:1], donor(x[:1])) < 1e-6
    y.sum().backward()  # the swapped factors are the slot's own parameters, still trainable
    assert model.model[0].adapters["a"].lora_A.grad is not None
    model.unload_slot("a")
    assert model.adapter_slots() == {"b": 1}
    with pytest.raises(KeyError, match="slot 0 holds no adapter"):
        model.hot_swap(0, directory)


@pytest.mark.parametrize("case", ["other base", "larger rank", "other targets", "other shapes"])
def test_mismatch_raises_before_anything_changes(tmp_path, case):
    model = _model(_host())
    host, config = None, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    if case == "other base":
        host = _host(seed=1)
    elif case == "larger rank":
        config = LoraConfig(r=16, target_modules=TARGETS, init_lora_weights=False)
    elif case == "other shapes":
        host = _host(width=48)
    directory, _ = _saved(tmp_path, "bad", config, host)
    if case == "other targets":
        model.unload_slot("a")
        model.add_adapter("a", LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(2, 24)
    with torch.no_grad():
        out = model(x, adapter_names=["a", "b"])
    state, configs = snapshot(model), copy.deepcopy(model.peft_config)
    match = {"other base": "another base", "larger rank": "larger than slot", "other targets": "subset",
             "other shapes": "shape"}[case]  # fmt: skip
    with pytest.raises(ValueError, match=match):
        model.hot_swap("a", directory)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.peft_config == configs
    with torch.no_grad():
        assert torch.equal(model(x, adapter_names=["a", "b"]), out)
