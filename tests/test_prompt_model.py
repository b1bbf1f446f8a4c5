"""PromptModel forward and generate on Llama and BERT from configs and on the real all-MiniLM-L6-v2: generate against
a manual greedy loop, a prefix against real tokens in front, what reaches the host (mask, labels, token types,
positions, the KV cache), BERT's prefix path against a float64 reference, checkpointing, bad input."""

import copy
import math

import pytest
import torch
from helpers import snapshot
from models import minilm, minilm_path, minilm_tokenizer
from prompt_cases import (
    METHODS,
    N,
    assert_only_changed,
    bert,
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
    prefix_from_tokens,
)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


# -- generate -------------------------------------------------------------------------------------


def _cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix"])
def test_generate_equals_manual_greedy(method):
    model = inject_prompt(llama(), METHODS[method][0]())
    train_steps(model, make_batch("llama"), steps=3)
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
    host = llama()
    p = torch.randint(1, 128, (N,), generator=torch.Generator().manual_seed(7))
    model = inject_prompt(llama(), PrefixTuningConfig(N, init="random"))
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.copy_(prefix_from_tokens(host, p))
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(8))
    with_p = torch.cat([p.expand(2, N), ids], 1)
    torch.testing.assert_close(
        logits_of(model, {"input_ids": ids}), logits_of(host, {"input_ids": with_p})[:, N:], rtol=1e-5, atol=1e-5
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
    model = inject_prompt(bert(), PromptTuningConfig(N))
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

    model = inject_prompt(llama(), PTuningConfig(N))
    seen = _spy(model)
    token_labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=token_labels)
    assert torch.equal(seen["labels"], torch.cat([torch.full((2, N), -100), token_labels], 1))
    assert out.logits.shape == (2, N + 7, 128)


def test_prefix_hands_a_cache_and_extends_mask():
    model = inject_prompt(llama(), PrefixTuningConfig(N))
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
        bert(attn_implementation=attn), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)
    )
    theirs.save_pretrained(str(tmp_path))  # peft can save a BERT prefix but not run it (see above)
    model = load_prompt(bert(attn_implementation=attn), str(tmp_path))
    batch = make_batch("bert", batch=3, length=10)
    expected = _bert_reference(model.model, batch["input_ids"], batch["attention_mask"], model.prompt_values().detach())
    torch.testing.assert_close(logits_of(model, batch).double(), expected, rtol=1e-4, atol=1e-5)


# -- the real all-MiniLM-L6-v2 ------------------------------------------------------------------


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
def test_minilm_trains_prompt_only(method, tmp_path):
    if method == "prefix":
        config = PrefixTuningConfig(8)
    else:
        config = PromptTuningConfig(8, init="text", init_text="Cooking or sport?", tokenizer_path=minilm_path())
    tokenizer = minilm_tokenizer()
    batch = dict(tokenizer([s for s, _ in SENTENCES], padding=True, return_tensors="pt"))
    labels = torch.tensor([y for _, y in SENTENCES])
    probe = torch.nn.Linear(384, 2).requires_grad_(False)  # a fixed head outside the model: the prompt must adapt
    model = inject_prompt(minilm(), config)
    n = config.num_virtual_tokens

    def predict(m):
        hidden = m(**batch).last_hidden_state
        if not m.is_prefix:
            hidden = hidden[:, n:]  # the virtual positions come first
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return probe((hidden * mask).sum(1) / mask.sum(1))  # mean pooling, as sentence-transformers does

    before = snapshot(model)
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
    assert_only_changed(before, snapshot(model), {"prompt_encoder.embedding.weight"})

    model.save_adapter(str(tmp_path))
    assert saved_tensors(str(tmp_path)).keys() == {"prompt_embeddings"}
    reloaded = load_prompt(minilm(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(predict(reloaded), predict(model))


# -- other behaviour ------------------------------------------------------------------------------


def test_host_attributes_forwarded_and_report(capsys):
    model = inject_prompt(llama(), PromptTuningConfig(N))
    assert model.config is model.model.config and model.get_input_embeddings() is model.model.model.embed_tokens
    model.print_trainable_parameters()
    trainable, total = model.parameter_counts()
    assert trainable == N * 64
    assert capsys.readouterr().out.startswith(f"trainable params: {trainable:,d} || all params: {total:,d}")


def _checkpointing_on(host):
    (getattr(host, "activation_checkpointing_enable", None) or host.gradient_checkpointing_enable)()
    assert any(getattr(m, "gradient_checkpointing", False) for m in host.modules())


def test_prompt_trains_under_gradient_checkpointing_but_prefix_refuses():
    model = inject_prompt(llama(), PromptTuningConfig(N))
    _checkpointing_on(model.model)
    model.train()
    model(**make_batch("llama")).loss.backward()
    assert model.prompt_encoder.embedding.weight.grad.abs().sum() > 0

    model = inject_prompt(llama(), PrefixTuningConfig(N))
    _checkpointing_on(model.model)
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**make_batch("llama"))


def test_bad_inputs():
    with pytest.raises(ValueError, match="leaves no room"):
        inject_prompt(llama(), PromptTuningConfig(64))
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_prompt(bert(), PromptTuningConfig(N, modules_to_save=["classifer"]))
    with pytest.raises(TypeError, match="PromptTuningConfig"):
        inject_prompt(llama(), {"num_virtual_tokens": N})
    model = inject_prompt(llama(), PrefixTuningConfig(N))
    with pytest.raises(TypeError, match="already carries a prompt"):
        inject_prompt(model, PromptTuningConfig(N))
    for config in (PromptTuningConfig(N), PrefixTuningConfig(N)):
        model = inject_prompt(llama(), config)
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
