"""LoraModel on small models: target matching, adapters, merge, save/load and every bad input."""

import json
import os

import pytest
import torch
from torch import nn

import fastlora
from fastlora import FastLoRALinear, LoraConfig
from fastlora.methods.files import INTEGRITY_NAME

SAVED_FILES = ["adapter_config.json", "adapter_model.safetensors", INTEGRITY_NAME]  # sorted


class Toy(nn.Module):
    def __init__(self, d=16, classes=3):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(d, d), "v_proj": nn.Linear(d, d), "mlp": nn.Linear(d, d)})
            for _ in range(2)
        )
        self.classifier = nn.Linear(d, classes)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer["q_proj"](x) + layer["v_proj"](x) + layer["mlp"](x))
        return self.classifier(x)

    def get_output_embeddings(self):
        return self.classifier


def _toy(seed=0):
    torch.manual_seed(seed)
    return Toy()


def _lora_paths(model):
    return sorted(p for p, _ in model.lora_layers())


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (["q_proj"], ["layers.0.q_proj", "layers.1.q_proj"]),
        ([r"layers.1.q_proj"], ["layers.1.q_proj"]),
        (r".*\.(q|v)_proj", ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]),
        ("all-linear", [f"layers.{i}.{n}" for i in range(2) for n in ("mlp", "q_proj", "v_proj")]),
    ],
    ids=["suffix", "full-name", "regex", "all-linear-excludes-head"],
)
def test_target_matching(target, expected):
    model = fastlora.inject(_toy(), r=2, target_modules=target)
    assert _lora_paths(model) == expected
    assert isinstance(model.model.classifier, nn.Linear)


def test_inject_quantizes_and_reports(capsys):
    model = fastlora.inject(
        _toy(), r=2, target_modules=["q_proj", "v_proj"], quantize="nf4", modules_to_save=["classifier"]
    )
    layer = model.model.layers[0]["q_proj"]
    assert isinstance(layer, FastLoRALinear) and layer.quant_state.quant_type == "nf4"
    trainable, _total = model.parameter_counts()
    lora = 4 * 2 * (2 * 16)  # four layers, A and B of rank 2
    head = 16 * 3 + 3
    assert trainable == lora + head
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        *(
            f"model.layers.{i}.{m}.adapters.default.lora_{ab}"
            for i in range(2)
            for m in ("q_proj", "v_proj")
            for ab in "AB"
        ),
        "model.classifier.trained.default.weight",
        "model.classifier.trained.default.bias",
    }


def test_unmatched_targets_list_close_names():
    with pytest.raises(ValueError, match=r"matched no linear layer of Toy; close names: .*q_proj"):
        fastlora.inject(_toy(), target_modules=["q_prj"])
    with pytest.raises(ValueError, match=r"modules_to_save \['classifer'\] matched no module"):
        fastlora.inject(_toy(), target_modules=["q_proj"], modules_to_save=["classifer"])


def test_adapters_switch_disable_delete():
    base = _toy()
    x = torch.randn(5, 16)
    reference = base(x)
    model = fastlora.inject(
        base, r=2, target_modules=["q_proj"], init_lora_weights=False, modules_to_save=["classifier"]
    )
    model.add_adapter("b", LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    y_default = model(x)
    model.set_adapter("b")
    y_b = model(x)
    assert not torch.allclose(y_default, y_b)
    assert model.model.layers[0]["q_proj"].active_adapter is None  # a layer without "b" acts as the base
    with model.disable_adapter():
        assert torch.equal(model(x), reference)  # exactly the base, modules_to_save included
    assert torch.equal(model(x), y_b)
    model.set_adapter("default")
    assert torch.equal(model(x), y_default)
    assert not model.model.layers[0]["v_proj"].adapters["b"].lora_A.requires_grad  # only the active adapter trains
    model.delete_adapter("b")
    assert list(model.peft_config) == ["default"] and "b" not in model.model.layers[0]["v_proj"].adapters
    with pytest.raises(KeyError, match=r"no adapter named 'b' \(have \['default'\]\)"):
        model.set_adapter("b")
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["q_proj"]))


def test_weighted_adapter_is_exact():
    model = fastlora.inject(_toy(), r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj"], init_lora_weights=False))
    model.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix")
    for path, layer in model.lora_layers():
        want = 0.7 * layer.adapters["default"].delta_weight()
        if "b" in layer.adapters:
            want += -1.3 * layer.adapters["b"].delta_weight()
        torch.testing.assert_close(layer.adapters["mix"].delta_weight(), want, rtol=1e-5, atol=1e-6, msg=path)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_and_unload(quantize):
    model = fastlora.inject(_toy(), r=2, target_modules="all-linear", quantize=quantize, init_lora_weights=False,
                            modules_to_save=["classifier"])  # fmt: skip
    x = torch.randn(4, 16)
    with torch.no_grad():
        model.model.classifier.trained.default.weight.add_(0.5)  # a trained head
    y = model(x)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (FastLoRALinear, fastlora.methods.ModulesToSave)) for m in plain.modules())
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith(("proj", "mlp")))
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_files(tmp_path):
    model = fastlora.inject(
        _toy(), r=2, target_modules=["q_proj"], init_lora_weights=False, modules_to_save=["classifier"]
    )
    x = torch.randn(3, 16)
    model.save_adapter(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == SAVED_FILES  # no temp files left
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["target_modules"] == ["q_proj"]
    assert "quantize" not in config  # fastlora-only fields stay out of peft's file
    loaded = fastlora.load(_toy(), str(tmp_path))
    torch.testing.assert_close(loaded(x), model(x))
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False: inference
    model.save_adapter(str(tmp_path))  # overwriting replaces the files whole
    assert sorted(os.listdir(tmp_path)) == SAVED_FILES


def test_bnb_linear4bit_model_is_accepted_as_is():
    bnb = pytest.importorskip("bitsandbytes")
    base = _toy()
    layer = bnb.nn.Linear4bit(16, 16, quant_type="nf4", compute_dtype=torch.float32)
    base.layers[0]["q_proj"] = layer.to("cpu")
    model = fastlora.inject(base, r=2, target_modules=["q_proj"])
    wrapped = model.model.layers[0]["q_proj"]
    assert isinstance(wrapped, FastLoRALinear) and wrapped.weight.data_ptr() == layer.weight.data_ptr()


# -- bad adapter directories: a clear error, and the model left unchanged ------------------------


def _saved(tmp_path):
    model = fastlora.inject(_toy(), r=2, target_modules=["q_proj"], init_lora_weights=False)
    model.save_adapter(str(tmp_path))
    return tmp_path


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _corrupt_json(d):
    (d / "adapter_config.json").write_text("{not json")


def _corrupt_weights(d):
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 20)


def _other_rank(d):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 3
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _dora(d):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _qalora(d):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_qalora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda d: os.remove(d / "adapter_config.json"), FileNotFoundError, "adapter_config.json does not exist"),
        (lambda d: os.remove(d / "adapter_model.safetensors"), FileNotFoundError, "safetensors does not exist"),
        (_corrupt_json, ValueError, "adapter_config.json is not valid JSON"),
        (_corrupt_weights, ValueError, "is not a readable safetensors file"),
        (_other_rank, ValueError, r"lora_A.weight has shape \(2, 16\), the model needs \(3, 16\)"),
        (_dora, ValueError, "lora_magnitude_vector"),  # use_dora loads now: a DoRA file without magnitudes fails
        (_qalora, ValueError, "use_qalora=True is not supported"),
    ],
    ids=["no-config", "no-weights", "corrupt-config", "corrupt-weights", "shape-mismatch", "dora", "qalora"],
)
def test_bad_adapter_directory(tmp_path, damage, error, match):
    directory = _saved(tmp_path)
    damage(directory)
    model = fastlora.inject(_toy(seed=1), r=2, target_modules=["v_proj"])
    before = _state(model)
    with pytest.raises(error, match=match):
        model.load_adapter(str(directory), "other")
    after = _state(model)
    assert list(model.peft_config) == ["default"] and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapter_for_another_architecture(tmp_path):
    directory = _saved(tmp_path)
    small = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"target_modules \['q_proj'\] matched no linear layer of Sequential"):
        fastlora.load(small, str(directory))
    wider = Toy(d=24)
    with pytest.raises(
        ValueError, match=r"layers.0.q_proj.lora_A.weight has shape \(2, 16\), the model needs \(2, 24\)"
    ):
        fastlora.load(wider, str(directory))
    assert not any(isinstance(m, FastLoRALinear) for m in wider.modules())


def test_loading_twice_under_one_name(tmp_path):
    directory = _saved(tmp_path)
    model = fastlora.load(_toy(), str(directory))
    with pytest.raises(ValueError, match="adapter 'default' is already loaded"):
        model.load_adapter(str(directory), "default")
    model.load_adapter(str(directory), "again")
    assert list(model.peft_config) == ["default", "again"]


def test_config_rejects_unsupported_fields():
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        LoraConfig(bias="all")
    with pytest.raises(ValueError, match="quantize must be None, 'nf4' or 'fp4'"):
        LoraConfig(quantize="int8")
    with pytest.raises(ValueError, match="peft_type must be 'LORA'"):
        LoraConfig.from_peft_dict({"peft_type": "IA3", "r": 2, "target_modules": ["q"]})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lora_alpha": float("inf")}, "LoraConfig: lora_alpha must be finite, got inf"),
        ({"lora_alpha": float("nan")}, "LoraConfig: lora_alpha must be finite, got nan"),
        ({"lora_alpha": 0}, "LoraConfig: lora_alpha must be > 0, got 0"),
        ({"lora_alpha": -2.0}, "LoraConfig: lora_alpha must be > 0, got -2.0"),
        ({"lora_dropout": 1.0}, r"LoraConfig: lora_dropout must be in \[0, 1\), got 1.0"),
        ({"lora_dropout": -0.5}, r"LoraConfig: lora_dropout must be in \[0, 1\), got -0.5"),
        ({"lora_dropout": float("nan")}, r"LoraConfig: lora_dropout must be in \[0, 1\), got nan"),
        ({"r": 0}, "LoraConfig: r must be an int >= 1, got 0"),
        ({"r": 2.5}, "LoraConfig: r must be an int >= 1, got 2.5"),
        ({"rank_pattern": {"q_proj": 0}}, r"LoraConfig: rank_pattern\['q_proj'\]: r must be an int >= 1, got 0"),
        ({"alpha_pattern": {"q_proj": float("inf")}}, r"alpha_pattern\['q_proj'\]: lora_alpha must be finite"),
        ({"rank_pattern": ["q_proj"]}, "LoraConfig: rank_pattern must be a dict"),
    ],
)
def test_config_range_checks(kwargs, match):
    """issue 18: lora_alpha=inf was accepted (every output NaN); every hyperparameter is range-checked when the
    config is made, and a file's values are checked with the file named."""
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)
    raw = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ValueError, match=r"adapter_config\.json: LoraConfig: "):
        LoraConfig.from_peft_dict(raw)
