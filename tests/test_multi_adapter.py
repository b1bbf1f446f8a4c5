"""Per-example adapters in one forward (``adapter_names`` / ``adapter_index`` / ``mixed_batch``), against each
example run alone on its adapter and against peft's ``adapter_names`` forward; gradients of several adapters
trained in one mixed batch against separate runs; slots, refusals, generate.

Models: a tiny Llama (dense and NF4) and the real MiniLM; adapters of different ranks, alphas and target sets,
rows on the bare base ("__base__").
"""

import pytest
import torch
from helpers import rel_error
from models import minilm, tiny_llama

import fastlora
from fastlora.methods.lora import LoraConfig
from fastlora.modules.lora_multi import rows_index

NAMES = ["a", "__base__", "b", "a", "c"]


def _model(build, quantize=None, targets=("q_proj", "v_proj", "down_proj")):
    """Three adapters: a (r 4, all linear layers), b (r 8, other alpha, a subset), c (r 2, rsLoRA), B random."""
    common = dict(init_lora_weights=False, quantize=quantize)
    model = fastlora.inject(build(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **common),
                            adapter_name="a")  # fmt: skip
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=3, target_modules=list(targets), **common))
    model.add_adapter("c", LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=list(targets[:1]), **common))
    return model


def _alone(model, name, *args, **kwargs):
    if name == "__base__":
        with model.disable():
            return model(*args, **kwargs)
    model.set_adapter(name)
    return model(*args, **kwargs)


def _check_rows(model, inputs, out_key, tol):
    with torch.no_grad():
        mixed = getattr(model(**inputs, adapter_names=NAMES), out_key)
        for i, name in enumerate(NAMES):
            alone = getattr(_alone(model, name, **{k: v[i : i + 1] for k, v in inputs.items()}), out_key)
            assert rel_error(mixed[i : i + 1], alone) < tol, (name, rel_error(mixed[i : i + 1], alone))
    return mixed


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_llama_mixed_equals_each_alone(quantize):
    model = _model(tiny_llama, quantize)
    ids = torch.randint(0, 128, (len(NAMES), 7))
    mixed = _check_rows(model, {"input_ids": ids}, "logits", 1e-5)
    idx = torch.tensor([model.adapter_slot(n) if n != "__base__" else -1 for n in NAMES])
    with torch.no_grad():
        assert torch.equal(model(ids, adapter_index=idx).logits, mixed)
        with model.mixed_batch(NAMES):
            assert torch.equal(model(ids).logits, mixed)
        with model.disable(), model.mixed_batch(NAMES):  # a disabled model is its base for every row
            with model.disable():
                base = model(ids).logits
            assert torch.equal(model(ids).logits, base)


def test_minilm_mixed_equals_each_alone_and_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = _model(minilm, targets=("query", "value", "output.dense"))
    inputs = {"input_ids": torch.randint(1000, 2000, (len(NAMES), 9)), "attention_mask": torch.ones(len(NAMES), 9)}
    inputs["attention_mask"][2, 6:] = 0
    ours = _check_rows(model, inputs, "last_hidden_state", 1e-5)
    for name in "abc":
        model.save(str(tmp_path / name), adapter_name=name)
    theirs = peft.PeftModel.from_pretrained(minilm(), str(tmp_path / "a"), adapter_name="a").eval()
    for name in "bc":
        theirs.load_adapter(str(tmp_path / name), adapter_name=name)
    with torch.no_grad():
        ref = theirs(**inputs, adapter_names=NAMES).last_hidden_state
    assert rel_error(ours, ref) < 1e-5


def test_llama_peft_adapter_names_and_generate(tmp_path):
    peft = pytest.importorskip("peft")
    model = _model(tiny_llama)
    ids = torch.randint(0, 128, (len(NAMES), 5))
    for name in "abc":
        model.save(str(tmp_path / name), adapter_name=name)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), adapter_name="a").eval()
    for name in "bc":
        theirs.load_adapter(str(tmp_path / name), adapter_name=name)
    with torch.no_grad():
        assert rel_error(model(ids, adapter_names=NAMES).logits, theirs(ids, adapter_names=NAMES).logits) < 1e-5
        options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        out = model.generate(ids, adapter_names=NAMES, **options)
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with model.disable():
                    alone = model.generate(ids[i : i + 1], **options)
            else:
                model.set_adapter(name)
                alone = model.generate(ids[i : i + 1], **options)
            assert torch.equal(out[i : i + 1], alone), name


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gradients_reach_each_adapter_as_in_separate_runs(quantize):
    model = _model(tiny_llama, quantize)
    ids = torch.randint(0, 128, (len(NAMES), 6))
    weights = torch.randn(len(NAMES), 6, 128)  # a loss that sums over examples: per-example gradients add

    def params(name):
        return {p: t for p, t in model.named_parameters() if f".adapters.{name}." in p}

    model.train_adapters(["a", "b", "c"])
    assert all(t.requires_grad for n in "abc" for t in params(n).values())
    (model(ids, adapter_names=NAMES).logits * weights).sum().backward()
    mixed = {p: t.grad.clone() for n in "abc" for p, t in params(n).items()}
    model.zero_grad(set_to_none=True)
    for i, name in enumerate(NAMES):
        if name != "__base__":
            model.set_adapter(name)
            (model(ids[i : i + 1]).logits * weights[i : i + 1]).sum().backward()
    for p, t in model.named_parameters():
        if p in mixed:
            assert rel_error(mixed[p], t.grad) < 1e-5, p
    model.zero_grad(set_to_none=True)
    model.train_adapters(["a", "b", "c"])
    model.train().gradient_checkpointing_enable()  # the recomputation runs inside the block too
    with model.mixed_batch(NAMES):
        (model(ids).logits * weights).sum().backward()
    for p, t in model.named_parameters():
        if p in mixed:
            assert rel_error(mixed[p], t.grad) < 1e-5, p
    model.train_adapters(["b"])
    assert [n for n in "abc" if any(t.requires_grad for t in params(n).values())] == ["b"]


def test_slots_unload_and_reuse():
    model = _model(tiny_llama)
    assert model.adapter_slots() == {"a": 0, "b": 1, "c": 2}
    ids = torch.randint(0, 128, (3, 4))
    with torch.no_grad():
        before = model(ids, adapter_index=torch.tensor([0, 2, -1])).logits
        model.unload_slot(1)
        assert model.adapter_slots() == {"a": 0, "c": 2}
        assert torch.equal(model(ids, adapter_index=torch.tensor([0, 2, -1])).logits, before)
        with pytest.raises(ValueError, match="slots"):
            model(ids, adapter_index=torch.tensor([0, 1, -1]))
        model.add_adapter("d", LoraConfig(r=16, target_modules=["o_proj"], init_lora_weights=False))
        assert model.adapter_slot("d") == 1  # the lowest free slot; the pools grow to rank 16
        names = ["d", "a", "__base__"]
        mixed = model(ids, adapter_names=names).logits
        for i, name in enumerate(names):
            assert rel_error(mixed[i : i + 1], _alone(model, name, ids[i : i + 1]).logits) < 1e-5
    with torch.inference_mode():  # pools made under inference_mode, then rewritten outside it
        model(ids, adapter_names=names)
    layer = model.model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        layer.adapters["d"].lora_B.mul_(2)  # a parameter change: the slot is rewritten from the new version
        assert rel_error(model(ids, adapter_names=names).logits[:1], _alone(model, "d", ids[:1]).logits) < 1e-5


def test_refusals():
    model = _model(tiny_llama)
    ids = torch.randint(0, 128, (2, 4))
    with pytest.raises(KeyError, match="'zz'"):
        model(ids, adapter_names=["a", "zz"])
    with pytest.raises(ValueError, match="not both"):
        model(ids, adapter_names=["a", "b"], adapter_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="divide"):
        model(ids, adapter_names=["a", "b", "a"])
    with pytest.raises(TypeError, match="1-D integer"):
        model(ids, adapter_index=torch.tensor([0.0, 1.0]))
    layer = next(layer for _, layer in model.lora_layers())
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(ids, adapter_names=["a", "b"])
    layer.unmerge()
    model.add_adapter("d", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match="DoRA"):
        model(ids, adapter_names=["a", "b"])
    assert all(layer._mixed_route is None for _, layer in model.lora_layers())


def test_rows_index_expands_examples_to_rows():
    idx = torch.tensor([2, -1, 0])
    assert rows_index(idx, torch.zeros(3, 2, 5)).tolist() == [2, 2, -1, -1, 0, 0]
    assert rows_index(idx, torch.zeros(6, 5)).dtype == torch.int32


def test_bench_multi_suite_runs_and_guards():
    from fastlora.bench import multi
    from fastlora.bench.timing import TimerConfig

    case = multi.MultiCase("layer", 64, 40, 6, 3, "fp32")
    timer = TimerConfig(warmup=0, min_reps=1, max_reps=1, rep_ms=0.0)
    recs = multi.run([case], cuda=False, timer=timer, impls=("fastlora-multi", "fastlora-one", "fastlora-per-adapter"))
    assert [(r.impl, r.status) for r in recs] == [(i, "ok") for i in ("fastlora-multi", "fastlora-one",
                                                                       "fastlora-per-adapter")]  # fmt: skip
    assert all(r.max_rel_err < 1e-5 for r in recs)


def test_nf4_llama_matches_peft_over_bitsandbytes():
    """NF4: peft's adapter_names forward over bnb Linear4bit layers holding the same packed bytes; the bound is
    twice bitsandbytes' own rounding of the 4-bit base on this machine (its CPU path), with a 1e-5 floor."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from fastlora.bench import multi

    case = multi.MultiCase("decode", 64, 128, len(NAMES), 3, "fp32")  # bnb: K a multiple of 64
    model = multi._decode_models(case, "cpu", torch.float32)
    theirs = multi._peft_model(model, case, torch.float32)
    ids = torch.randint(1, 512, (len(NAMES), 6))
    names = [n if n == "__base__" else {"a": "a0", "b": "a1", "c": "a2"}[n] for n in NAMES]
    with torch.no_grad():
        with model.disable(), theirs.disable_adapter():
            bound = 2 * rel_error(theirs(ids).logits, model(ids).logits) + 1e-5
        ours, ref = model(ids, adapter_names=names).logits, theirs(ids, adapter_names=names).logits
        assert rel_error(ours, ref) < bound
        assert rel_error(ours[2:3], _alone(model, "a1", ids[2:3]).logits) < 1e-5
