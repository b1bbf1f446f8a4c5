"""Saved prompts: each method trains, saves only the prompt (peft's layout) and reloads; peft interop both ways;
every damaged or mismatched directory is an error that leaves the host unchanged."""

import json

import pytest
import torch
from helpers import snapshot
from prompt_cases import (
    BUILD,
    METHODS,
    TASK,
    N,
    assert_only_changed,
    bert,
    logits_of,
    make_batch,
    peft,
    saved_tensors,
    train_steps,
)

from fastlora.methods.prompt import (
    PTuningConfig,
    inject_prompt,
    load_prompt,
)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _expected_file_keys(model):
    keys = {"prompt_embeddings"}
    if not model.folded:
        keys |= {"prompt_encoder." + k for k in model.prompt_encoder.state_dict()}
    return keys | {f"base_model.{p}.{k}" for p in model.head_paths for k in model.model.get_submodule(p).state_dict()}


# -- each method trains, touches only the prompt, saves only it and reloads ----------------------


@pytest.mark.parametrize("arch", sorted(BUILD))
@pytest.mark.parametrize("method", list(METHODS))
def test_train_save_reload(method, arch, tmp_path):
    model = inject_prompt(BUILD[arch](), METHODS[method][0]())
    batch = make_batch(arch)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {"model.classifier.weight", "model.classifier.bias"} if arch == "bert" else set()
    assert trained == {"prompt_encoder." + k for k, _ in model.prompt_encoder.named_parameters()} | heads
    before = snapshot(model)

    first, last = train_steps(model, batch)
    assert last < 0.8 * first, (first, last)
    assert_only_changed(before, snapshot(model), trained)

    model.save_adapter(str(tmp_path))
    saved = saved_tensors(str(tmp_path))
    assert saved.keys() == _expected_file_keys(model)
    own = dict(model.named_parameters())
    for key, value in saved.items():
        if key == "prompt_embeddings":
            with torch.no_grad():
                assert torch.equal(value, model.prompt_values())
        else:
            name = key.replace("base_model.", "model.", 1)  # heads: peft's prefix; encoder: our own names
            assert torch.equal(value, own[name].detach()), key
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == METHODS[method][0]().peft_type and config["task_type"] == TASK[arch]

    reloaded = load_prompt(BUILD[arch](), str(tmp_path))
    assert reloaded.folded == model.folded and reloaded.parameter_counts()[0] == 0
    assert torch.equal(logits_of(reloaded, batch), logits_of(model, batch))
    resumed = load_prompt(BUILD[arch](), str(tmp_path), is_trainable=True)
    assert resumed.parameter_counts() == model.parameter_counts()


# -- peft interop ---------------------------------------------------------------------------------


def _peft_model(method, arch):
    theirs = peft.get_peft_model(BUILD[arch](), METHODS[method][1](TASK[arch])).eval()
    if arch == "bert":  # a trained head, not a copy of the host's
        torch.nn.init.normal_(theirs.base_model.classifier.modules_to_save["default"].weight)
    return theirs


PEFT_RUNS = [("llama", m) for m in METHODS] + [("bert", "prompt"), ("bert", "ptuning-mlp")]


@pytest.mark.parametrize(("arch", "method"), PEFT_RUNS)
def test_peft_saved_prompt_loads_into_fastlora(arch, method, tmp_path):
    theirs = _peft_model(method, arch)
    batch = make_batch(arch)
    expected = logits_of(theirs, batch)
    theirs.save_pretrained(str(tmp_path))

    ours = load_prompt(BUILD[arch](), str(tmp_path))
    assert ours.folded  # peft's file holds the prompt the encoder produced, not the encoder
    torch.testing.assert_close(logits_of(ours, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "method"),
    [("llama", "prompt"), ("llama", "ptuning-lstm"), ("llama", "prefix"), ("llama", "prefix-proj"), ("bert", "prompt")],
)
def test_fastlora_saved_prompt_loads_into_peft(arch, method, tmp_path):
    # BERT prefixes are not in this list: peft 0.21 cannot run prefix tuning on BERT under transformers
    # 5.24 (it looks for `past_key_values` in BertModel.forward, which now takes `cache`).
    ours = inject_prompt(BUILD[arch](), METHODS[method][0]())
    batch = make_batch(arch)
    train_steps(ours, batch, steps=2)
    ours.save_adapter(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(BUILD[arch](), str(tmp_path)).eval()
    torch.testing.assert_close(logits_of(theirs, batch), logits_of(ours, batch), rtol=1e-5, atol=1e-5)


# -- bad directories: a clear error and the host unchanged ----------------------------------------


def _host_state(model):
    return snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}


def _assert_same_host(model, state):
    params, flags = state
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.fixture
def saved_prompt(tmp_path):
    model = inject_prompt(bert(), PTuningConfig(N))
    model.save_adapter(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("break_it", "host", "error", "match"),
    [
        (None, lambda: bert(hidden_size=32), ValueError, "token_dim=64 but BertForSequenceClassification has hidden"),
        (None, lambda: bert(num_hidden_layers=3), ValueError, "num_layers=2"),
        (lambda d: (d / "adapter_config.json").write_text("{oops"), bert, ValueError, "not valid JSON"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 7), bert, ValueError, "safetensors"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), bert, FileNotFoundError, "does not exist"),
        (lambda d: _edit_json(d, peft_type="LORA"), bert, ValueError, "peft_type must be"),
        (lambda d: _edit_json(d, num_virtual_tokens=N + 1), bert, ValueError, "prompt_embeddings has shape"),
        (lambda d: _edit_json(d, encoder_reparameterization_type="LSTM"), bert, ValueError, "encoder weights differ"),
        (
            lambda d: _edit_tensors(d, {"base_model.pooler.dense.weight": torch.zeros(64, 64)}),
            bert,
            ValueError,
            "has no place",
        ),
        (
            lambda d: _edit_tensors(d, {"base_model.classifier.weight": torch.zeros(2, 64)}),
            bert,
            ValueError,
            "classifier.weight has shape",
        ),
        (lambda d: _edit_tensors(d, {"prompt_encoder.mlp_head.0.weight": None}), bert, ValueError, "missing"),
    ],
    ids=[
        "hidden",
        "layers",
        "json",
        "safetensors",
        "no-weights",
        "lora-file",
        "n",
        "encoder",
        "extra-key",
        "head-shape",
        "missing-key",
    ],
)
def test_load_errors_leave_host_unchanged(saved_prompt, break_it, host, error, match):
    if break_it is not None:
        break_it(saved_prompt)
    model = host()
    state = _host_state(model)
    with pytest.raises(error, match=match):
        load_prompt(model, str(saved_prompt))
    _assert_same_host(model, state)


def _edit_json(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory, changes):
    path = str(directory / "adapter_model.safetensors")
    tensors = {**safetensors_torch.load_file(path), **changes}
    safetensors_torch.save_file({k: v for k, v in tensors.items() if v is not None}, path)
