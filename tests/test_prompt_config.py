"""Prompt configs and encoders: bad configs, trainable counts against peft's encoders, peft's text init, fold()."""

import pytest
import torch
from models import minilm, minilm_path, minilm_tokenizer
from prompt_cases import (
    BUILD,
    METHODS,
    TASK,
    llama,
    logits_of,
    make_batch,
    peft,
    saved_tensors,
    train_steps,
)

from fastlora.methods.prompt import (
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    inject_prompt,
    load_prompt,
)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PromptTuningConfig(0), "positive int"),
        (lambda: PromptTuningConfig(-3), "positive int"),
        (lambda: PromptTuningConfig(True), "positive int"),
        (lambda: PTuningConfig(2.5), "positive int"),
        (lambda: PromptTuningConfig(4, init="zeros"), "init must be"),
        (lambda: PromptTuningConfig(4, init="text"), "init_text"),
        (lambda: PTuningConfig(4, encoder="gru"), "encoder must be"),
        (lambda: PTuningConfig(4, encoder_hidden_size=0), "encoder_hidden_size"),
        (lambda: PrefixTuningConfig(4, init="text"), "init must be"),
        (lambda: PrefixTuningConfig(4, prefix_projection=True, init="vocab"), "prefix_projection"),
        (lambda: PrefixTuningConfig(4, task_type="SEQ2SEQ"), "task_type must be one of"),
        (lambda: PromptTuningConfig(4, modules_to_save="classifier"), "modules_to_save must be a list"),
    ],
)
def test_bad_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("arch", sorted(BUILD))
@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_count_matches_peft(method, arch):
    ours, theirs = METHODS[method]
    ours = inject_prompt(BUILD[arch](), ours())
    theirs = peft.get_peft_model(BUILD[arch](), theirs(TASK[arch]))
    assert ours.parameter_counts()[0] == theirs.get_nb_trainable_parameters()[0]


def test_text_init_matches_peft():
    text = "Is this sentence about cooking?"
    ours = inject_prompt(minilm(), PromptTuningConfig(12, init="text", init_text=text, tokenizer_path=minilm_path()))
    config = peft.PromptTuningConfig(
        task_type="FEATURE_EXTRACTION",
        num_virtual_tokens=12,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=minilm_path(),
    )
    theirs = peft.get_peft_model(minilm(), config)
    expected = theirs.prompt_encoder["default"].embedding.weight
    assert torch.equal(ours.prompt_values(), expected)
    tokens = minilm_tokenizer()(text)["input_ids"]  # 9 tokens, repeated
    assert len(tokens) < 12 and torch.equal(ours.prompt_values()[len(tokens)], expected[0])


# -- fold -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ptuning-mlp", "ptuning-lstm", "prefix-proj"])
def test_fold_keeps_outputs_and_drops_encoder(method, tmp_path):
    model = inject_prompt(llama(), METHODS[method][0]())
    batch = make_batch("llama")
    train_steps(model, batch, steps=3)
    with torch.no_grad():  # the inference path (an LSTM may round differently with autograd on)
        expected, values = logits_of(model, batch), model.prompt_values()
    trainable_before = model.parameter_counts()[0]

    assert model.fold() is model and model.folded
    assert torch.equal(model.prompt_values(), values)
    assert torch.equal(logits_of(model, batch), expected)
    assert [n for n, _ in model.prompt_encoder.named_parameters()] == ["embedding.weight"]
    assert model.parameter_counts()[0] == values.numel() < trainable_before
    model.fold()  # already plain: nothing changes
    assert torch.equal(model.prompt_values(), values)

    model.save_adapter(str(tmp_path))
    assert saved_tensors(str(tmp_path)).keys() == {"prompt_embeddings"}
    assert torch.equal(logits_of(load_prompt(llama(), str(tmp_path)), batch), expected)
