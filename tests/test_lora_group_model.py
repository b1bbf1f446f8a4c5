"""Fused blocks in whole models: tiny Llama and Qwen2 from transformers configs, q/k/v and gate/up(+SwiGLU/GeGLU)
as one fastlora op each. The loss and every LoRA gradient equal the same model with separate FastLoRALinear layers
(``fuse_blocks=False``) and peft; merge, disable, several adapters, saving and torch.compile still work; a profiler
counts the fastlora ops of a decoder layer (q/k/v 3 -> 1, gate/up 2 -> 1).
"""

import json

import pytest
import torch
from models import LLAMA, tiny_llama
from torch.profiler import ProfilerActivity, profile

import fastlora
from fastlora.methods.lora.groups import block_groups
from fastlora.modules.group import GatedMLPGroup, SharedInputGroup
from fastlora.quant import dequantize_4bit

transformers = pytest.importorskip("transformers")
RANKS = {"k_proj": 2, "up_proj": 3}  # mixed ranks inside both groups


def _qwen2(**overrides):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**LLAMA, **overrides})  # q/k/v with biases
    return transformers.Qwen2ForCausalLM(config).train()


BUILDERS = {
    "llama": lambda: tiny_llama(train=True),
    "llama-geglu": lambda: tiny_llama(train=True, hidden_act="gelu_pytorch_tanh"),
    "qwen2": _qwen2,
}


def _inject(arch, fuse=True, quantize=None, dropout=0.0, **kw):
    config = fastlora.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, quantize=quantize, rank_pattern=RANKS,
                                 init_lora_weights=False, fuse_blocks=fuse, **kw)  # fmt: skip
    torch.manual_seed(1)
    return fastlora.inject(BUILDERS[arch](), config)


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, LLAMA["vocab_size"], (2, 9), generator=g)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the dropout seeds: drawn per layer, in the same order fused or not
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {}
    for path, layer in model.lora_layers():
        if layer.active_adapter is not None:
            grads[path + ".A"], grads[path + ".B"] = layer.lora_A.grad, layer.lora_B.grad
    return loss.detach(), grads


def _assert_same(a, b, atol=2e-5):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=atol)
    assert ga.keys() == gb.keys() and ga
    for key in ga:
        assert ga[key] is not None, key
        torch.testing.assert_close(ga[key], gb[key], rtol=1e-4, atol=atol, msg=key)


CASES = [("llama", None, 0.0), ("llama", "nf4", 0.1), ("llama-geglu", None, 0.1), ("qwen2", "nf4", 0.0)]


@pytest.mark.parametrize(("arch", "quantize", "dropout"), CASES, ids=[f"{a}-{q}-p{p}" for a, q, p in CASES])
def test_fused_blocks_match_separate_layers(arch, quantize, dropout):
    fused, plain = (_inject(arch, fuse, quantize, dropout) for fuse in (True, False))
    groups = [type(g) for _, g in block_groups(fused.model)]
    assert groups.count(SharedInputGroup) == groups.count(GatedMLPGroup) == LLAMA["num_hidden_layers"]
    assert not block_groups(plain.model)
    expected_act = "gelu_tanh" if arch == "llama-geglu" else "silu"
    assert all(g.act == expected_act for _, g in block_groups(fused.model) if isinstance(g, GatedMLPGroup))
    ids = _batch()
    _assert_same(_loss_and_grads(fused, ids), _loss_and_grads(plain, ids))
    assert fused.model.state_dict().keys() == plain.model.state_dict().keys()


def test_member_without_adapter_and_switching_adapters():
    """Adapter "b" has no k_proj / up_proj: those members join their groups as frozen (4-bit) linears."""
    models = []
    for fuse in (True, False):
        m = _inject("llama", fuse, "nf4")
        m.add_adapter("b", fastlora.LoraConfig(r=3, lora_alpha=6, init_lora_weights=False, fuse_blocks=fuse,
                                               target_modules=["q_proj", "v_proj", "o_proj", "gate_proj",
                                                               "down_proj"]))  # fmt: skip
        m.set_adapter("b")
        models.append(m)
    assert models[0].model.model.layers[0].self_attn.k_proj.active_adapter is None
    ids = _batch()
    _assert_same(_loss_and_grads(models[0], ids), _loss_and_grads(models[1], ids))
    for m in models:
        m.set_adapter("default")
    _assert_same(_loss_and_grads(models[0], ids), _loss_and_grads(models[1], ids))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_matches_peft(quantize, tmp_path):
    """peft on the same base (a 4-bit base given to peft dequantised: the same W) with the saved adapter."""
    peft = pytest.importorskip("peft")
    ours = _inject("llama", True, quantize)
    ours.save_adapter(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "fuse_blocks" not in config
    base = tiny_llama(train=True)
    if quantize:  # the dense W peft sees is exactly the dequantised one fastlora multiplies by
        for path, layer in ours.lora_layers():
            w = dequantize_4bit(layer.weight, layer.quant_state, torch.float32)
            base.get_submodule(path).weight.data.copy_(w)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path), is_trainable=True).train()
    ids = _batch()
    loss, grads = _loss_and_grads(ours, ids)
    theirs_loss = theirs(input_ids=ids, labels=ids).loss
    theirs_loss.backward()
    torch.testing.assert_close(loss, theirs_loss.detach(), rtol=1e-5, atol=1e-5)
    for path, _ in ours.lora_layers():
        layer = theirs.base_model.model.get_submodule(path)
        torch.testing.assert_close(grads[path + ".A"], layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[path + ".B"], layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)


def _op_counts(model, ids):
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids)
    ops = {e.key.removeprefix("fastlora::"): e.count for e in prof.key_averages() if e.key.startswith("fastlora::")}
    return {k: v for k, v in ops.items() if k.startswith("lora_")}  # not the CPU's native dequantisation op


def test_op_count_per_decoder_layer():
    """Per decoder layer: q/k/v 3 ops -> 1, gate/up 2 -> 1 (o_proj and down_proj stay one each): 7 -> 4."""
    layers, ids = LLAMA["num_hidden_layers"], _batch()
    fused = _op_counts(_inject("llama", True, "nf4").eval(), ids)
    plain = _op_counts(_inject("llama", False, "nf4").eval(), ids)
    assert plain == {"lora_linear": 7 * layers}
    assert fused == {"lora_group": 2 * layers, "lora_linear": 2 * layers}


def test_fallbacks_merge_disable_unload():
    """A merged or disabled member, or a DoRA adapter, runs the per-member forwards; the outputs stay right."""
    fused, plain = _inject("llama", True), _inject("llama", False)
    ids = _batch()
    for m in (fused, plain):
        m.eval()
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        torch.testing.assert_close(fused(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        attn = fused.model.model.layers[0].self_attn
        attn.k_proj.merge()
        assert not block_groups(fused.model)[0][1].active()
        torch.testing.assert_close(fused(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        attn.k_proj.unmerge()
        with fused.disable_adapter(), plain.disable_adapter():
            torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        unloaded = fused.merge_and_unload()
    assert not block_groups(unloaded) and all("forward" not in m.__dict__ for m in unloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_hooked_gate_up_run_unfused():
    """A forward hook on gate_proj/up_proj (a user's, or a probe's) still runs: that MLP runs unfused while hooked."""
    model, ids = _inject("llama", True).eval(), _batch()
    mlp = model.model.model.layers[0].mlp
    seen = []
    handle = mlp.up_proj.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        hooked = model(input_ids=ids).logits
        assert seen == [(2, 9, LLAMA["intermediate_size"])]
        handle.remove()
        torch.testing.assert_close(model(input_ids=ids).logits, hooked, rtol=1e-5, atol=1e-5)
    assert seen == [(2, 9, LLAMA["intermediate_size"])]  # the hook is gone: fused again, the same output


def test_explicit_specs_and_off():
    only_qkv = _inject("llama", [{"members": ["q_proj", "k_proj", "v_proj"], "parent": r"layers\.0\."}])
    assert [(p, type(g)) for p, g in block_groups(only_qkv.model)] == [("model.layers.0.self_attn", SharedInputGroup)]
    with pytest.raises(ValueError, match="fuse_blocks"):
        _inject("llama", [{"members": ["gate_proj", "up_proj"], "down": "down_proj", "act": "relu"}])


def test_torch_compile_matches_eager():
    """Under torch.compile the q/k/v routes stand aside (per-member ops); the gated MLP op compiles as one op."""
    config = fastlora.LoraConfig(r=4, quantize="nf4", init_lora_weights=False)
    model = fastlora.inject(tiny_llama(num_hidden_layers=1), config).eval()  # one layer: half the tracing
    ids = _batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        compiled = torch.compile(model.model, backend="eager")
        torch.testing.assert_close(compiled(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def _saved_bytes(model, ids):
    """Bytes of the distinct storages autograd saves for the backward of one forward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


def test_gated_mlp_saves_one_intermediate_less():
    """Eager SwiGLU saves gate, act(gate), up and h (down_proj's input); the fused op saves [gate | up] and h:
    exactly I elements a token a layer less."""
    ids = _batch()
    fused, plain = (_saved_bytes(_inject("llama", fuse), ids) for fuse in (True, False))
    per_token_layer = (plain - fused) / ids.numel() / LLAMA["num_hidden_layers"]
    assert per_token_layer == LLAMA["intermediate_size"] * 4  # fp32
