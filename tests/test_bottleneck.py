"""Bottleneck-adapter placements on tiny Llama / BERT models built from configs and on the real MiniLM:
identity at init, training touches only the adapters, save/reload, trainable share, gradient
checkpointing, the Triton path inside a model, and every bad input."""

import functools
import json
import os

import pytest
import torch
import transformers
from models import minilm, minilm_tokenizer, tiny_bert, tiny_llama
from torch import nn

import fastlora
from fastlora.methods.bottleneck import (
    PLACEMENTS,
    AdapterConfig,
    AdapterLayer,
    AdapterModel,
    inject_adapters,
    load_adapters,
)
from fastlora.methods.files import INTEGRITY_NAME
from fastlora.methods.wrapper import ModulesToSave
from fastlora.modules import FastAdapter

VOCAB = 97

SAVED_FILES = ["adapter_config.json", "adapter_model.safetensors", INTEGRITY_NAME]  # sorted


def _llama(seed=0, hidden=32):
    return tiny_llama(seed, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden)


def _bert(seed=0, hidden=32):
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return tiny_bert(seed, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                     max_position_embeddings=512, **no_dropout)  # fmt: skip


def _minilm():
    """A fresh copy of the real pre-trained MiniLM (loaded from disk once per session)."""
    return minilm(seed=None)


@functools.cache
def _minilm_batch():
    text = ["Adapters add a small bottleneck after each sublayer.", "The host model stays frozen.",
            "Only a few percent of the parameters train.", "Kernels fuse the bias and activation."]  # fmt: skip
    return dict(minilm_tokenizer()(text, padding=True, return_tensors="pt"))


def _batch(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "minilm":
        return _minilm_batch()
    ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids} if kind == "llama" else {"input_ids": ids}


def _output(kind, model, batch):
    out = model(**batch)
    return out.last_hidden_state if kind == "minilm" else out.logits


def _loss(kind, model, batch):
    if kind == "llama":
        return model(**batch).loss
    out = _output(kind, model, batch)
    g = torch.Generator().manual_seed(2)
    if kind == "bert":
        return nn.functional.cross_entropy(out, torch.randint(0, 3, (out.shape[0],), generator=g))
    target = torch.randn(out.shape[0], out.shape[-1], generator=g)
    return nn.functional.mse_loss(out.mean(1), target)  # regress the mean-pooled embedding


BUILD = {"llama": _llama, "bert": _bert, "minilm": _minilm}
LAYERS = {"llama": ("model.layers", 2), "bert": ("bert.encoder.layer", 2), "minilm": ("encoder.layer", 6)}
SUFFIXES = {
    ("llama", "houlsby"): ["self_attn", "mlp"],
    ("llama", "pfeiffer"): ["mlp"],
    ("llama", "parallel"): ["mlp"],
    ("bert", "houlsby"): ["attention.output.dense", "output.dense"],
    ("bert", "pfeiffer"): ["output.dense"],
    ("bert", "parallel"): ["output"],
}
CASES = [(kind, placement) for kind in BUILD for placement in PLACEMENTS]


def _expected_paths(kind, placement):
    prefix, n = LAYERS[kind]
    suffixes = SUFFIXES[("llama" if kind == "llama" else "bert", placement)]
    return sorted(f"{prefix}.{i}.{s}" for i in range(n) for s in suffixes)


def _host_state(host):
    """The host's own entries, named as before injection (wrappers' base_layer / original removed)."""
    out = {}
    for key, value in host.state_dict().items():
        if ".adapter." in key or ".trained." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original.", ".")] = value
    return out


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _randomize(model, std=0.2):
    """Non-zero up projections (a trained adapter), so every adapter parameter gets a gradient."""
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            layer.adapter.w_up.normal_(0, std)
            layer.adapter.b_up.normal_(0, 0.05)


@pytest.mark.parametrize(("kind", "placement"), CASES)
def test_identity_at_init_and_placement(kind, placement):
    host = BUILD[kind]()
    batch = _batch(kind)
    with torch.no_grad():
        reference = _output(kind, host, batch)
    model = inject_adapters(host, AdapterConfig(r=8, placement=placement))
    assert sorted(p for p, _ in model.adapter_layers()) == _expected_paths(kind, placement)
    modes = {layer.mode for _, layer in model.adapter_layers()}
    assert modes == {"skip_input" if kind != "llama" else "parallel"} if placement == "parallel" else {"output"}
    with torch.no_grad():
        assert torch.equal(_output(kind, model, batch), reference)  # zero up-projection: exactly the host
        _randomize(model)
        adapted = _output(kind, model, batch)
        assert (adapted - reference).norm() > 0.01 * reference.norm()  # the adapters are on the forward path
        with model.disable_adapters():
            assert torch.equal(_output(kind, model, batch), reference)
        assert torch.equal(_output(kind, model, batch), adapted)


@pytest.mark.parametrize(("kind", "placement"), CASES)
def test_training_changes_only_adapters(kind, placement):
    host = BUILD[kind]()
    before = _clone(host.state_dict())
    saved = ["classifier"] if kind == "bert" else None
    model = inject_adapters(host, r=8, placement=placement, modules_to_save=saved)
    adapter_params = {n for n, p in model.named_parameters() if ".adapter." in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    copies = {f"model.classifier.trained.default.{p}" for p in ("weight", "bias")} if saved else set()
    assert trainable == adapter_params | copies and len(adapter_params) == 4 * len(_expected_paths(kind, placement))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batch = _batch(kind)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = _loss(kind, model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(_loss(kind, model, batch).item())
    assert losses[-1] < losses[0] - 1e-3, losses

    after = _host_state(host)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"host entries changed: {changed[:5]}"
    for name, p in model.named_parameters():
        if p.requires_grad:  # every adapter tensor moved (w_down only from step 2, once w_up is non-zero)
            assert not torch.equal(p.detach(), start[name]), name


@pytest.mark.parametrize("kind", ["llama", "bert", "minilm"])
def test_save_holds_only_trained_params_and_reloads(kind, tmp_path):
    saved = ["classifier"] if kind == "bert" else None
    placement = {"llama": "houlsby", "bert": "parallel", "minilm": "pfeiffer"}[kind]
    model = inject_adapters(BUILD[kind](), r=4, placement=placement, activation="silu", modules_to_save=saved)
    _randomize(model)
    if saved:
        with torch.no_grad():
            model.model.classifier.trained.default.weight.add_(0.5)  # a trained head
    model.save_adapter(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == SAVED_FILES  # no temp files left

    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    trainable = {n.removeprefix("model.").replace(".trained.default.", "."): p for n, p in model.named_parameters()
                 if p.requires_grad}  # fmt: skip
    assert tensors.keys() == trainable.keys()  # the trained tensors, nothing of the host
    assert all(torch.equal(tensors[k], trainable[k].detach()) for k in tensors)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["r"] == 4 and config["placement"] == placement
    assert config["activation"] == "silu" and config["base_model_class"] == type(model.model).__name__

    batch = _batch(kind)
    loaded = load_adapters(BUILD[kind](), str(tmp_path))  # a fresh host from the same weights
    with torch.no_grad():
        assert torch.equal(_output(kind, loaded, batch), _output(kind, model, batch))
    assert isinstance(loaded, AdapterModel) and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.adapter_config == model.adapter_config
    trainable_again = load_adapters(BUILD[kind](), str(tmp_path), is_trainable=True)
    assert trainable_again.parameter_counts()[0] == sum(t.numel() for t in tensors.values())
    model.save_adapter(str(tmp_path))  # overwriting replaces the files whole
    assert sorted(os.listdir(tmp_path)) == SAVED_FILES


@pytest.mark.parametrize(("placement", "r"), [("houlsby", 16), ("pfeiffer", 64), ("parallel", 32)])
def test_trainable_share_on_minilm(placement, r, capsys):
    host = _minilm()
    total_host = sum(p.numel() for p in host.parameters())
    model = inject_adapters(host, r=r, placement=placement)
    n_adapters = len(_expected_paths("minilm", placement))
    d = host.config.hidden_size
    trainable, total = model.parameter_counts()
    assert trainable == n_adapters * (2 * d * r + r + d) and total == total_host + trainable
    assert 0.005 <= model.trainable_share() <= 0.05, model.trainable_share()
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: " in capsys.readouterr().out


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(("kind", "placement"), [("llama", "houlsby"), ("minilm", "parallel")])
def test_gradient_checkpointing(kind, placement, reentrant):
    """Same gradients with the host's activation checkpointing on, and the adapters really recomputed."""
    model = inject_adapters(BUILD[kind](), r=4, placement=placement)
    _randomize(model)
    model.train()
    batch = _batch(kind)
    calls = []
    for _, layer in model.adapter_layers():
        layer.adapter.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        model.zero_grad()
        calls.clear()
        torch.manual_seed(7)  # the same dropout masks in both runs (MiniLM trains with dropout 0.1)
        _loss(kind, model, batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = grads()
    host = model.model
    enable = getattr(host, "activation_checkpointing_enable", None) or host.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})
    checkpointed, ckpt_calls = grads()
    n = len(list(model.adapter_layers()))
    # the adapters sit inside the checkpointed layers: the backward re-ran them (non-reentrant checkpointing
    # stops recomputing once it has every saved tensor it needs, so not necessarily all of them)
    assert plain_calls == n and n < ckpt_calls <= 2 * n
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_triton_kernels_inside_a_model(monkeypatch):
    """The whole model through the fused kernels (interpreter) equals the torch path, outputs and gradients."""
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTLORA_BACKEND", backend)
        model = inject_adapters(_llama(), r=8, placement="houlsby", activation="gelu")
        torch.manual_seed(5)
        _randomize(model)
        loss = _loss("llama", model, _batch("llama"))
        loss.backward()
        results[backend] = [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("config_class", "model_class", "extra"),
    [
        ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
        ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
        ("RobertaConfig", "RobertaModel", {"pad_token_id": 1}),
    ],
    ids=["mistral", "qwen2", "roberta"],
)
def test_related_architectures(config_class, model_class, extra):
    config = getattr(transformers, config_class)(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, **extra)  # fmt: skip
    torch.manual_seed(0)
    host = getattr(transformers, model_class)(config).eval()
    ids = torch.randint(2, VOCAB, (2, 7))
    with torch.no_grad():
        reference = host(input_ids=ids)[0]
    model = inject_adapters(host, r=4, placement="houlsby")
    assert len(list(model.adapter_layers())) == 4
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids)[0], reference)


class Toy(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        pairs = ({"proj": nn.Linear(d, d), "up": nn.Linear(d, 2 * d)} for _ in range(2))
        self.blocks = nn.ModuleList(nn.ModuleDict(pair) for pair in pairs)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block["proj"](torch.relu(block["up"](x)[..., : x.shape[-1]]))
        return self.head(x)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_explicit_targets_on_any_model(placement):
    torch.manual_seed(0)
    host = Toy()
    x = torch.randn(5, 16)
    reference = host(x)
    model = inject_adapters(host, r=3, placement=placement, target_modules=["proj"], modules_to_save=["head"])
    assert sorted(p for p, _ in model.adapter_layers()) == ["blocks.0.proj", "blocks.1.proj"]
    assert torch.equal(model(x), reference)
    _randomize(model)
    layer = model.model.blocks[0]["proj"]
    inner = torch.randn(5, 16)
    expected = layer.base_layer(inner)
    expected = layer.adapter(inner, residual=expected) if placement == "parallel" else layer.adapter(expected)
    assert torch.equal(layer(inner), expected)
    regex = inject_adapters(Toy(), r=3, target_modules=r"blocks\.1\.(proj|up)")
    assert sorted(p for p, _ in regex.adapter_layers()) == ["blocks.1.proj", "blocks.1.up"]
    assert regex.model.blocks[1]["up"].adapter.d_model == 32  # an nn.Linear target adapts its out_features
    host = model.unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in host.modules())
    assert torch.equal(host(x), reference)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()


# -- bad input: a clear error and the host untouched ----------------------------------------------


@pytest.mark.parametrize(
    ("build", "kwargs", "error", "match"),
    [
        (_llama, {"target_modules": ["mpl"]}, ValueError, r"target_modules \['mpl'\] matched no module of "
                                                          r"LlamaForCausalLM; close names: .*mlp"),
        (_llama, {"modules_to_save": ["lm_haed"]}, ValueError, "modules_to_save 'lm_haed' matched no module.*lm_head"),
        (_llama, {"r": 32}, ValueError, r"r=32 must be in \[1, d_model - 1\] = \[1, 31\] for model.layers.0.self_attn"),
        (_llama, {"placement": "parallel", "target_modules": ["gate_proj"]}, ValueError,
         r"needs in_features == out_features, got 32 -> 64"),
        (_llama, {"target_modules": ["mlp"], "modules_to_save": ["mlp"]}, ValueError,
         "both adapted and in modules_to_save"),
        (lambda: nn.Sequential(nn.Linear(8, 8)), {}, ValueError,
         r"no automatic adapter targets for Sequential \(model_type None; known: llama, .*\); pass .*target_modules"),
        (lambda: nn.Sequential(nn.ReLU()), {"target_modules": ["0"]}, ValueError, "cannot tell the width of 0 "),
    ],
    ids=["target-typo", "saved-typo", "r>=d", "parallel-non-square", "clash", "unknown-arch", "no-width"],
)  # fmt: skip
def test_bad_targets_leave_the_host_untouched(build, kwargs, error, match):
    host = build()
    before = _clone(host.state_dict())
    with pytest.raises(error, match=match):
        inject_adapters(host, **kwargs)
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave, FastAdapter)) for m in host.modules())
    after = host.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in host.parameters())  # not even frozen


def test_bert_auto_placement_needs_bert_names():
    host = _bert()
    host.bert.encoder.layer[0].output = nn.Identity()  # renamed / removed FFN output in one layer only
    model = inject_adapters(host, placement="pfeiffer", r=4)  # the remaining layer still matches
    assert [p for p, _ in model.adapter_layers()] == ["bert.encoder.layer.1.output.dense"]
    llama = _llama()
    for layer in llama.model.layers:
        layer.feed_forward = layer.mlp
        del layer.mlp
    with pytest.raises(ValueError, match=r"placement 'pfeiffer' for model_type 'llama' expects modules matching .*"
                                         r"mlp.* and LlamaForCausalLM has none"):  # fmt: skip
        inject_adapters(llama, placement="pfeiffer", r=4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, r"r must be an int >= 1, got 0"),
        ({"r": -3}, r"r must be an int >= 1"),
        ({"activation": "tanh"}, "unknown activation 'tanh'; known activations: relu, gelu, gelu_tanh, silu"),
        ({"placement": "after-ffn"}, "unknown placement 'after-ffn'; known: houlsby, pfeiffer, parallel"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"target_modules": []}, "target_modules must be None, a regex or a list of names"),
    ],
    ids=["r=0", "r<0", "activation", "placement", "dropout", "empty-targets"],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kwargs)
    host = _llama()
    with pytest.raises(ValueError, match=match):
        inject_adapters(host, **kwargs)
    assert all(p.requires_grad for p in host.parameters())


def test_injecting_twice_is_refused():
    model = inject_adapters(_llama(), r=4)
    with pytest.raises(TypeError, match="already a AdapterModel"):
        inject_adapters(model, r=4)
    with pytest.raises(ValueError, match="already holds adapters"):
        inject_adapters(model.model, r=4)
    with pytest.raises(TypeError, match="already a LoraModel"):
        inject_adapters(fastlora.inject(_llama(), r=2, target_modules=["q_proj"]), r=4)


# -- bad adapter directories: a clear error, and the new host left unchanged ---------------------


def _saved_llama(tmp_path, **kwargs):
    model = inject_adapters(_llama(), r=4, **kwargs)
    _randomize(model)
    model.save_adapter(str(tmp_path))
    return tmp_path


def _edit_config(d, **changes):
    config = json.loads((d / "adapter_config.json").read_text())
    config.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "host", "error", "match"),
    [
        (lambda d: os.remove(d / "adapter_config.json"), _llama, FileNotFoundError,
         "adapter_config.json does not exist"),
        (lambda d: os.remove(d / "adapter_model.safetensors"), _llama, FileNotFoundError, "safetensors does not exist"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), _llama, ValueError, "is not valid JSON"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 20), _llama, ValueError,
         "is not a readable safetensors file"),
        (lambda d: _edit_config(d, r=5), _llama, ValueError,
         r"model.layers.0.self_attn.adapter.w_down has shape \(4, 32\), LlamaForCausalLM needs \(5, 32\)"),
        (lambda d: _edit_config(d, placement="pfeiffer"), _llama, ValueError,
         r"do not fit LlamaForCausalLM: key 'model.layers.0.self_attn.adapter.b_down' has no place"),
        (lambda d: _edit_config(d, peft_type="LORA"), _llama, ValueError,
         "peft_type must be 'BOTTLENECK', found 'LORA' .*load it with fastlora.load"),
        (lambda d: _edit_config(d, activation="mish"), _llama, ValueError, "unknown activation 'mish'"),
        (lambda d: None, lambda: _llama(hidden=48), ValueError,
         r"adapter.w_down has shape \(4, 32\), LlamaForCausalLM needs \(4, 48\)"),
        (lambda d: None, _bert, ValueError,
         "adapters saved from LlamaForCausalLM do not fit BertForSequenceClassification"),
    ],
    ids=["no-config", "no-weights", "corrupt-config", "corrupt-weights", "other-r", "other-placement", "lora",
         "bad-activation", "wider-host", "other-architecture"],
)  # fmt: skip
def test_bad_adapter_directory(tmp_path, damage, host, error, match):
    directory = _saved_llama(tmp_path)
    damage(directory)
    model = host()
    before = _clone(model.state_dict())
    with pytest.raises(error, match=match):
        load_adapters(model, str(directory))
    assert not any(isinstance(m, (AdapterLayer, FastAdapter)) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lora_loader_rejects_a_bottleneck_directory(tmp_path):
    directory = _saved_llama(tmp_path)
    with pytest.raises(ValueError, match="peft_type must be 'LORA', found 'BOTTLENECK'"):
        fastlora.load(_llama(), str(directory))
