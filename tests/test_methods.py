"""The one protocol every method answers (fastlora.methods.base.Method), the base it shares (target matching with
close names, the checked copy), the trainer's table over it, and the old import paths kept as shims."""

import ast
import pathlib

import pytest
import torch
from models import tiny_bert, tiny_llama
from torch import nn

import fastlora
from fastlora.methods import (
    AdapterConfig,
    AdapterModel,
    LoraConfig,
    LoraModel,
    Method,
    PromptModel,
    PromptTuningConfig,
    PTuningConfig,
)
from fastlora.methods.targets import HEAD_NAMES, close_names, matches, no_match, select, select_each
from fastlora.methods.tensors import check_tensors, copy_checked

transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fastlora"


def _host():
    return tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch():
    g = torch.Generator().manual_seed(3)
    return {
        "input_ids": torch.randint(1, 128, (3, 7), generator=g),
        "attention_mask": torch.ones(3, 7, dtype=torch.long),
    }


def _logits(model):
    with torch.no_grad():
        return model(**_batch()).logits


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


# Each method on a BERT classifier, its head trained beside it: (inject, config the model must report, old names).
METHODS = {
    "lora": (
        lambda host: fastlora.inject(host, LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"])),
        lambda m: m.peft_config["default"],
        ("disable_adapter", "peft_config"),
    ),
    "bottleneck": (
        lambda host: fastlora.inject_adapters(host, AdapterConfig(r=4, modules_to_save=["classifier"])),
        lambda m: m.adapter_config,
        ("disable_adapters", "adapter_config"),
    ),
    "prompt": (
        lambda host: fastlora.inject_prompt(host, PTuningConfig(4, encoder_hidden_size=16)),
        lambda m: m.peft_config,
        ("peft_config",),
    ),
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_answers_the_protocol(method, tmp_path):
    inject, old_config, old_names = METHODS[method]
    host_logits = _logits(_host())
    model = inject(_host())
    assert isinstance(model, Method)
    assert model.method_config is old_config(model) and all(hasattr(model, n) for n in (*old_names, "save_adapter"))
    assert model.modules_to_save == ["classifier"]
    assert model.config is model.model.config  # the host's transformers config, not the method's

    _randomize(model)  # trained adapters and head: the model no longer computes what the host does
    trained = _logits(model)
    assert not torch.allclose(trained, host_logits)
    with model.disable():
        disabled = _logits(model)
    assert torch.equal(_logits(model), trained)  # restored after the block
    if method == "prompt":  # the head is trained in place (no original copy): only the prompt is off
        host = _host()
        host.classifier.load_state_dict(model.model.classifier.state_dict())
        assert torch.equal(disabled, _logits(host))
    else:
        assert torch.equal(disabled, host_logits)

    report = model.trainable_report()
    assert report.trainable_count == model.parameter_counts()[0] > 0
    assert {name for name, _ in report.trainable} == {n for n, p in model.named_parameters() if p.requires_grad}

    model.save(str(tmp_path))
    loaded = type(model).load(_host(), str(tmp_path))
    assert type(loaded) is type(model) and loaded.parameter_counts()[0] == 0  # loaded for inference
    assert torch.equal(_logits(loaded), trained)
    again = type(model).load(_host(), str(tmp_path), is_trainable=True)
    assert again.parameter_counts() == model.parameter_counts()


def test_save_takes_the_tensors_to_write(tmp_path):
    """``save(dir, tensors)`` writes the caller's tensors (e.g. FSDP shards gathered) under the model's names."""
    model = fastlora.inject(_host(), r=2, target_modules=["query"])
    tensors = {k: torch.full_like(v, 0.5) for k, v in model.adapter_state_dict().items()}
    model.save(str(tmp_path), tensors)
    loaded = LoraModel.load(_host(), str(tmp_path))
    assert all(torch.equal(v, tensors[k]) for k, v in loaded.adapter_state_dict().items())


def test_prompt_generate_is_the_hosts_while_disabled():
    host = tiny_llama(pad_token_id=0)
    model = fastlora.inject_prompt(tiny_llama(pad_token_id=0), PromptTuningConfig(3))
    ids = torch.randint(1, 128, (2, 5))
    kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with model.disable():
        assert torch.equal(model.generate(input_ids=ids, **kw), host.generate(input_ids=ids, **kw))
    assert not model.disabled


@pytest.mark.parametrize("method", ["lora", "adapter", "ptuning", "prefix"])
def test_injecting_into_an_eval_host_keeps_eval_mode(method):
    """A model loaded for inference must not get dropout from freshly injected modules."""
    inject = {
        "lora": lambda m: fastlora.inject(m, r=4, lora_dropout=0.5),
        "adapter": lambda m: fastlora.inject_adapters(m, fastlora.AdapterConfig(r=4, dropout=0.5)),
        "ptuning": lambda m: fastlora.inject_prompt(m, fastlora.PTuningConfig(4, encoder_dropout=0.5)),
        "prefix": lambda m: fastlora.inject_prompt(m, fastlora.PrefixTuningConfig(4, prefix_projection=True)),
    }[method]
    host = tiny_llama(None, vocab_size=64, hidden_size=32, intermediate_size=64, max_position_embeddings=2048)
    wrapped = inject(host)
    assert [n for n, m in wrapped.named_modules() if m.training] == []
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        assert torch.equal(wrapped(input_ids=ids).logits, wrapped(input_ids=ids).logits)
    wrapped.train()
    assert all(m.training for m in wrapped.modules())


# -- the shared base ---------------------------------------------------------------------------------------


def test_target_rules_and_close_names():
    named = [(p, nn.Identity()) for p in ("layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "head")]
    assert matches("layers.0.q_proj", ["q_proj"]) and not matches("layers.0.q_proj", ["proj"])
    assert matches("layers.0.q_proj", ["proj"], any_suffix=True)  # peft's rule for LoRA's modules_to_save
    assert matches("layers.1.q_proj", r"layers\.1\..*") and not matches("layers.1.q_proj", r"q_proj")
    assert [p for p, _ in select(named, ["q_proj"], "Toy")] == ["layers.0.q_proj", "layers.1.q_proj"]
    close = ["layers.0.q_proj", "layers.1.q_proj", "q_proj", "v_proj"]  # full paths and last components
    assert close_names(["q_prj"], [p for p, _ in named]) == close
    message = f"fastlora: target_modules ['q_prj'] matched no module of Toy; close names: {', '.join(close)}"
    with pytest.raises(ValueError) as error:
        select(named, ["q_prj"], "Toy")
    assert str(error.value) == message
    with pytest.raises(ValueError, match=r"modules_to_save \['haed'\] matched no module of Toy; close names: head"):
        select_each(named, ["head", "haed"], "Toy")
    error = no_match("head 'x'", nn.Linear(1, 1), ["x"], [], kind="layer", note=" (note)")
    assert str(error) == "fastlora: head 'x' matched no layer of Linear (note)"
    assert HEAD_NAMES == ("classifier", "score", "lm_head")


def test_checked_copy_is_all_or_nothing():
    a, b = torch.zeros(2, 3), torch.zeros(4)
    targets, long = {"a": a, "b": b}, torch.ones(4, dtype=torch.long)
    for bad, match in [
        ({"a": torch.ones(2, 3), "c": torch.ones(1)}, r"key 'c' has no place in the model \(1 unexpected, 1 missing"),
        ({"a": torch.ones(2, 3)}, "missing 'b', which the model needs"),
        ({"a": torch.ones(2, 3), "b": torch.ones(5)}, r"b has shape \(5,\), the model needs \(4,\)"),
        ({"a": torch.ones(2, 3), "b": long}, "b is torch.int64, the model needs torch.float32"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            copy_checked(targets, bad, "where")
        assert not a.any() and not b.any()
    check_tensors({"a": (2, 3), "b": (4,)}, {"a": torch.ones(2, 3)}, "where", partial=True)  # shapes suffice
    copy_checked(targets, {"a": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(4)}, "where")
    assert a.all() and b.all()


# -- the trainer's table ------------------------------------------------------------------------------------


def test_train_methods_table():
    from fastlora.train import methods as M

    assert M.METHODS == ("qlora", "lora", "adapter", "prefix", "prompt", "ptuning", "full", "head")
    assert M.DEFAULT_LR == {"full": 2e-5, "head": 1e-3, "lora": 2e-4, "qlora": 2e-4, "adapter": 1e-3, "prefix": 1e-2,
                            "prompt": 3e-2, "ptuning": 1e-2}  # fmt: skip
    assert {m for m, r in M.RECIPES.items() if r.lora} == {"lora", "qlora"}
    assert {m for m, r in M.RECIPES.items() if r.fsdp} == {"lora", "qlora", "full", "head"}
    assert {m for m, r in M.RECIPES.items() if r.virtual_tokens} == {"prompt", "ptuning", "prefix"}
    loaders = {m: getattr(r.artifact, "model_class", None) for m, r in M.RECIPES.items()}
    assert loaders["lora"] is LoraModel and loaders["adapter"] is AdapterModel and loaders["prompt"] is PromptModel
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        M.build(_host(), "dora", {}, "classification")


# -- old import paths -----------------------------------------------------------------------------------------


def test_old_import_paths_still_work():
    from fastlora.adapters import io, wrapper
    from fastlora.adapters.model import LoraModel as OldLoraModel
    from fastlora.adapters.model import ModulesToSave
    from fastlora.strategies import bottleneck, full, prompt, prompt_io

    assert OldLoraModel is LoraModel and ModulesToSave is fastlora.methods.ModulesToSave
    assert fastlora.adapters.LoraConfig is LoraConfig and fastlora.strategies.AdapterModel is AdapterModel
    assert io.save_adapter_files is fastlora.methods.lora.save_lora_files and callable(io.atomic_write)
    assert wrapper.count_parameters is fastlora.methods.count_parameters
    assert bottleneck.load_adapters is fastlora.load_adapters and full.full_finetune is fastlora.full_finetune
    assert prompt.load_prompt is prompt_io.load_prompt is fastlora.load_prompt
    model = fastlora.inject_prompt(_host(), PromptTuningConfig(2))
    assert prompt_io.peft_config_dict(model) == model.to_peft_dict()


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_methods_import_only_lower_layers():
    """fastlora/methods/ (layer 5) imports neither the shims nor train/, bench/, the CLI."""
    above = ("fastlora.adapters", "fastlora.strategies", "fastlora.train", "fastlora.bench", "fastlora.cli")
    for path in sorted((ROOT / "methods").rglob("*.py")):
        bad = sorted(n for n in _imports(path) if n.startswith(above) or n == "fastlora")
        assert not bad, f"{path.relative_to(ROOT.parent)} imports {bad}"
