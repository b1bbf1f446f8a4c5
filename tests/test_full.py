"""methods/full.py: full fine-tuning, feature extraction, discriminative rates and LoRA+ on Llama and BERT.

Each strategy trains a few steps (loss falls, only the intended parameters change bit for bit, the saved
artefact holds only what trained and reloads into a fresh host to the same outputs); the optimiser groups
give the exact rate per layer, checked through a real SGD step.
"""

import os

import pytest
import torch
from helpers import loss_before_after, snapshot
from models import tiny_bert, tiny_llama
from torch import nn

import fastlora
from fastlora.methods.full import (
    discriminative_param_groups,
    feature_extraction,
    full_finetune,
    layer_depths,
    load_trainable,
    loraplus_param_groups,
    save_trainable,
    trainable_report,
)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


# Overrides of tests/models.py's tiny models: narrower, and no dropout in BERT (exact comparisons).
LLAMA = {"hidden_size": 48, "intermediate_size": 80, "initializer_range": 0.1, "pad_token_id": 0}
BERT = {"hidden_size": 48, "intermediate_size": 80, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _llama(seed=0, layers=3):
    return tiny_llama(seed, num_hidden_layers=layers, **LLAMA)


def _bert(seed=0):
    return tiny_bert(seed, **BERT)


def _llama_cls(seed=0):
    return tiny_llama(seed, task="classifier", num_hidden_layers=2, num_labels=3, **LLAMA)


BUILD = {"llama": _llama, "bert": _bert, "llama-cls": _llama_cls}


def _batch(arch, seed=1, batch=4, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    if arch == "llama":  # always continue with token 7
        labels = torch.full_like(ids, 7).masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, 3, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _train(model, batch, optimizer):
    return loss_before_after(model, batch, optimizer, steps=8)


def _changed(before, after):
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


# -- full fine-tuning -------------------------------------------------------------------------------


def test_full_finetune_with_discriminative_rates_trains_everything(tmp_path, capsys):
    model = _bert()
    model.requires_grad_(False)
    assert full_finetune(model, verbose=True) is model
    assert all(p.requires_grad for p in model.parameters())
    report = capsys.readouterr().out
    total = sum(p.numel() for p in model.parameters())
    assert "bert.encoder.layer.1.attention.self.query.weight" in report and f"all params: {total:,d}" in report

    batch = _batch("bert")
    before = snapshot(model)
    groups = discriminative_param_groups(model, lr=3e-3, decay=0.8, weight_decay=0.01)
    first, last = _train(model, batch, torch.optim.AdamW(groups))
    assert last < 0.5 * first, (first, last)
    # every parameter tensor moved (AdamW's weight decay alone moves the ones the loss does not reach)
    assert _changed(before, snapshot(model)) == {n for n, _ in model.named_parameters()}

    path = str(tmp_path / "model.safetensors")
    assert save_trainable(model, path) == sorted(n for n, _ in model.named_parameters())
    fresh = load_trainable(_bert(seed=1), path)
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))


def test_full_finetune_refuses_lora_layers():
    lora = fastlora.inject(_llama(), r=2, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="merge_and_unload"):
        full_finetune(lora)


def test_full_finetune_leaves_packed_weights_frozen():
    model = nn.Sequential(nn.Linear(4, 4))
    model.register_parameter("packed", nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False))
    with pytest.warns(UserWarning, match="1 non-floating-point"):
        full_finetune(model)
    assert not model.packed.requires_grad and model[0].weight.requires_grad
    assert trainable_report(model).total_count == 4 * 4 + 4 + 16  # a packed byte holds 2 values


# -- feature extraction ---------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "head"), [("bert", "classifier"), ("llama-cls", "score"), ("llama", "lm_head")])
def test_feature_extraction_trains_only_the_head(arch, head, tmp_path, capsys):
    model = feature_extraction(BUILD[arch](), verbose=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{head}.{n}" for n, _ in getattr(model, head).named_parameters()}
    assert trainable == expected
    assert capsys.readouterr().out.count(f"{head}.") == len(expected)

    batch = _batch("llama" if arch == "llama" else "bert")
    before = snapshot(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    first, last = _train(model, batch, optimizer)
    assert last < 0.7 * first, (first, last)
    assert _changed(before, snapshot(model)) == expected

    path = str(tmp_path / "head.safetensors")
    save_trainable(model, path)
    assert safetensors_torch.load_file(path).keys() == expected
    fresh = load_trainable(BUILD[arch](), path)
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))


def test_feature_extraction_with_a_user_head():
    model = tiny_bert(0, task="base", **BERT)
    with pytest.raises(ValueError, match="no task head found on BertModel"):
        feature_extraction(model)
    model.probe = nn.Sequential(nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 2))
    feature_extraction(model, head="probe")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "probe.0.weight",
        "probe.0.bias",
        "probe.2.weight",
        "probe.2.bias",
    }
    with pytest.raises(ValueError, match="'prob' matched no module"):
        feature_extraction(model, head=["prob"])


def test_feature_extraction_warns_about_a_tied_head():
    model = tiny_bert(0, task="masked_lm", train=True, **BERT)
    assert model.get_output_embeddings().weight is model.bert.embeddings.word_embeddings.weight
    with pytest.warns(UserWarning, match="is tied to bert.embeddings.word_embeddings.weight"):
        feature_extraction(model)
    assert model.bert.embeddings.word_embeddings.weight.requires_grad
    assert not model.bert.encoder.layer[0].attention.self.query.weight.requires_grad


# -- discriminative learning rates ----------------------------------------------------------------


def _expected_depth(arch, name):
    if arch == "llama":  # 3 layers
        if name.startswith("model.layers."):
            return 2 - int(name.split(".")[2])
        return 3 if name.startswith("model.embed_tokens") else 0  # final norm and lm_head: the top rate
    if name.startswith("bert.encoder.layer."):  # 2 layers
        return 1 - int(name.split(".")[3])
    return 2 if name.startswith("bert.embeddings.") else 0  # pooler and classifier: the top rate


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_discriminative_rates_per_layer_exact(arch):
    model = BUILD[arch]()
    full_finetune(model)
    lr, decay, wd = 1e-3, 0.75, 0.05
    groups = discriminative_param_groups(model, lr, decay=decay, weight_decay=wd)
    seen = {}
    for group in groups:
        for name, p in zip(group["param_names"], group["params"], strict=True):
            assert name not in seen
            seen[name] = (group["lr"], group["weight_decay"])
            assert p is model.get_parameter(name)
    assert seen.keys() == {n for n, _ in model.named_parameters()}
    for name, (rate, weight_decay) in seen.items():
        assert rate == lr * decay ** _expected_depth(arch, name), name
        norm = name.endswith(("bias", "LayerNorm.weight", "norm.weight"))
        assert weight_decay == (0.0 if norm else wd), name
    assert layer_depths(model) == {n: _expected_depth(arch, n) for n, _ in model.named_parameters()}
    assert [g["lr"] for g in groups] == sorted((g["lr"] for g in groups), reverse=True)

    # through a real optimiser: one SGD step moves every parameter by exactly -rate * grad (weight decay off)
    groups = discriminative_param_groups(model, lr, decay=decay)
    optimizer = torch.optim.SGD(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = snapshot(model)
    model(**_batch("llama" if arch == "llama" else "bert")).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    scheduler.step()
    for name, p in model.named_parameters():
        rate = lr * decay ** _expected_depth(arch, name)
        torch.testing.assert_close(p.detach(), before[name] - rate * grads[name], rtol=0, atol=1e-7)


def test_discriminative_groups_hold_only_trainable_parameters():
    model = feature_extraction(_bert())
    groups = discriminative_param_groups(model, 1e-3)
    assert sorted(n for g in groups for n in g["param_names"]) == ["classifier.bias", "classifier.weight"]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.0)]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: discriminative_param_groups(m, 1e-3, decay=0.0), "decay must be in"),
        (lambda m: discriminative_param_groups(m, 1e-3, decay=1.5), "decay must be in"),
        (lambda m: discriminative_param_groups(m, 0.0), "lr must be > 0"),
        (lambda m: discriminative_param_groups(m, 1e-3, weight_decay=-1), "weight_decay must be >= 0"),
        (lambda m: discriminative_param_groups(m.requires_grad_(False), 1e-3), "no trainable parameters"),
        (lambda m: discriminative_param_groups(nn.Linear(3, 3), 1e-3), "no numbered layers"),
        (lambda m: loraplus_param_groups(m, 1e-3), "no trainable LoRA B factors"),
        (lambda m: loraplus_param_groups(m, 1e-3, ratio=0), "ratio must be > 0"),
    ],
)
def test_bad_group_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(_bert())


# -- LoRA+ ----------------------------------------------------------------------------------------


def test_loraplus_trains_only_the_adapter(tmp_path):
    model = fastlora.inject(_llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    lr, ratio = 2e-3, 16.0
    groups = loraplus_param_groups(model, lr, ratio=ratio, weight_decay=0.01)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(lr * ratio, 0.01), (lr, 0.01)]
    b, a = groups[0]["param_names"], groups[1]["param_names"]
    assert len(b) == len(a) == 9 and all(n.endswith(".adapters.default.lora_B") for n in b)
    assert all(n.endswith(".adapters.default.lora_A") for n in a)
    assert "model.model.layers.2.mlp.down_proj.adapters.default.lora_B" in b

    batch = _batch("llama")
    before = snapshot(model)
    first, last = _train(model, batch, torch.optim.AdamW(groups))
    assert last < 0.7 * first, (first, last)
    assert _changed(before, snapshot(model)) == set(a) | set(b)

    model.save_adapter(str(tmp_path))
    saved = safetensors_torch.load_file(os.path.join(str(tmp_path), "adapter_model.safetensors"))
    assert len(saved) == 18 and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in saved)
    fresh = fastlora.load(_llama(), str(tmp_path))
    torch.testing.assert_close(_logits(fresh, batch), _logits(model, batch), rtol=1e-6, atol=1e-6)


def test_loraplus_step_sizes_exact_and_other_parameters_at_base_rate():
    model = fastlora.inject(_bert(), r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    with torch.no_grad():  # B starts at zero: give it values so that A receives a gradient too
        for _, layer in model.lora_layers():
            layer.lora_B.normal_()
    lr, ratio = 1e-3, 4.0
    groups = loraplus_param_groups(model, lr, ratio=ratio)
    rates = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert rates["model.classifier.trained.default.weight"] == lr
    optimizer = torch.optim.SGD(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(**_batch("bert")).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            rate = lr * ratio if name.endswith("lora_B") else lr
            assert rates[name] == rate
            torch.testing.assert_close(p.detach(), before[name] - rate * grads[name], rtol=0, atol=1e-7)


def test_loraplus_recognises_peft_names():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    groups = loraplus_param_groups(model, 1e-4, ratio=8)
    assert all(".lora_B." in n for n in groups[0]["param_names"]) and groups[0]["lr"] == 8e-4
    assert all(".lora_A." in n for n in groups[1]["param_names"])


def test_load_trainable_checks_before_copying(tmp_path):
    model = feature_extraction(_bert())
    path = str(tmp_path / "head.safetensors")
    save_trainable(model, path)
    other = _bert(seed=1)
    before = snapshot(other)
    safetensors_torch.save_file({**safetensors_torch.load_file(path), "classifier.extra": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"'classifier\.extra' is not a parameter"):
        load_trainable(other, path)
    safetensors_torch.save_file({"classifier.bias": torch.zeros(1), "classifier.weight": torch.zeros(3, 48)}, path)
    with pytest.raises(ValueError, match=r"classifier.bias has shape \(1,\)"):
        load_trainable(other, path)
    assert not _changed(before, snapshot(other))
    with open(path, "wb") as f:
        f.write(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_trainable(other, path)
