"""Base-changing LoRA starts (fastlora/methods/lora/init.py): PiSSA and OLoRA equal peft's (A, B and the residual
base, SVD signs normalised), LoftQ lowers the 4-bit error ‖W − (dequant(Q) + s·B A)‖ on the real MiniLM weights
below plain NF4's (both printed per layer type and iteration count), loads never re-run a start."""

from __future__ import annotations

import copy

import pytest
import torch
from models import minilm, tiny_llama

import fastlora
from fastlora.methods.lora.init import loftq, pissa
from fastlora.quant import dequantize_4bit, quantize_4bit

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _signs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each rank component (row of A, column of B together) so A's largest-magnitude entry is positive."""
    s = torch.sign(a.gather(1, a.abs().argmax(1, keepdim=True))).squeeze(1)
    return a * s[:, None], b * s[None, :]


def _pair(init, **extra):
    host = tiny_llama()
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **extra)
    fast = fastlora.inject(copy.deepcopy(host), **config)
    ref = peft.get_peft_model(host, peft.LoraConfig(**config))
    return fast, ref


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_equal_to_peft(init):
    fast, ref = _pair(init)
    layers = dict(fast.lora_layers())
    assert len(layers) == 6
    for path, layer in layers.items():
        theirs = ref.base_model.model.get_submodule(path)
        a, b = _signs(layer.lora_A, layer.lora_B)
        ta, tb = _signs(theirs.lora_A["default"].weight, theirs.lora_B["default"].weight)
        torch.testing.assert_close(a, ta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, tb, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-6)
    ids = torch.randint(0, 100, (2, 7))
    want = tiny_llama()(input_ids=ids).logits  # the start reproduces the original model
    torch.testing.assert_close(fast(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_pissa_niter_is_near_the_exact_svd():
    w = torch.randn(40, 4) @ torch.randn(4, 56) + 0.01 * torch.randn(40, 56)  # a spectrum with a clear top 4
    a, b, base = pissa(w, 4, 2.0)
    a2, b2, base2 = pissa(w, 4, 2.0, niter=8)
    torch.testing.assert_close(base + 2.0 * b @ a, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base2 + 2.0 * b2 @ a2, w, rtol=1e-5, atol=1e-5)
    assert (b2 @ a2 - b @ a).norm() / (b @ a).norm() < 1e-3
    fast = fastlora.inject(
        tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa_niter_4"
    )
    assert next(iter(dict(fast.lora_layers()).values())).lora_B.abs().sum() > 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_quantised_residual(init):
    """QLoRA with a base-changing start: the residual is what is quantised; the 4-bit error shrinks."""
    w = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach()
    fast = fastlora.inject(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init,
                           quantize="nf4")  # fmt: skip
    layer = dict(fast.lora_layers())["model.layers.0.self_attn.q_proj"]
    assert layer.quant_state is not None
    got = dequantize_4bit(layer.weight, layer.quant_state, torch.float32) + layer.scaling * layer.lora_B @ layer.lora_A
    packed, state = quantize_4bit(w, "nf4", 64, True)
    plain = (dequantize_4bit(packed, state, torch.float32) - w).norm()
    assert (got - w).norm() <= plain


def _minilm_layer_types():
    layer = minilm().encoder.layer[0]
    return {
        "query": layer.attention.self.query,
        "value": layer.attention.self.value,
        "attn.output": layer.attention.output.dense,
        "intermediate": layer.intermediate.dense,
        "output": layer.output.dense,
    }


def test_loftq_lowers_the_4bit_error_on_minilm(capsys):
    rows = []
    for name, linear in _minilm_layer_types().items():
        w = linear.weight.detach()
        packed, state = quantize_4bit(w, "nf4", 64, False)
        plain = ((dequantize_4bit(packed, state, torch.float32) - w).norm() / w.norm()).item()
        a, b, packed, state, errors = loftq(w, 16, 2.0, iters=3)  # alpha 32, r 16: s divided out of the fit
        direct = (w - dequantize_4bit(packed, state, torch.float32) - 2.0 * b @ a).norm() / w.norm()
        assert direct.item() == pytest.approx(min(errors), rel=1e-4)  # errors[i] is ‖W − (Q + s·B A)‖ / ‖W‖
        assert errors[0] < plain and errors[-1] <= errors[0] * 1.001, (name, plain, errors)
        rows.append((name, tuple(w.shape), plain, errors))
    with capsys.disabled():
        print("\nLoftQ on MiniLM layer 0 (NF4, blocksize 64, r 16): relative error ‖W − (Q + s·B A)‖_F / ‖W‖_F")
        print(f"{'layer':14s} {'shape':12s} {'plain NF4':>10s} " + " ".join(f"{f'iter {i + 1}':>8s}" for i in range(3)))
        for name, shape, plain, errors in rows:
            print(f"{name:14s} {shape!s:12s} {plain:10.5f} " + " ".join(f"{e:8.5f}" for e in errors))


def test_loftq_through_inject_and_loads_never_rerun(tmp_path):
    host = minilm()
    targets = r"encoder\.layer\.[01]\.attention\.self\.(query|value)"
    config = dict(r=8, lora_alpha=16, target_modules=targets, init_lora_weights="loftq",
                  loftq_config={"loftq_bits": 4, "loftq_iter": 2})  # fmt: skip
    q = fastlora.inject(copy.deepcopy(host), quantize="nf4", **config)
    plain = fastlora.inject(copy.deepcopy(host), quantize="nf4", r=8, target_modules=targets)
    x = torch.randn(16, 384)
    for (path, layer), (_, layer_plain) in zip(q.lora_layers(), plain.lora_layers(), strict=True):
        want = host.get_submodule(path)(x)
        assert (layer(x) - want).norm() < (layer_plain(x) - want).norm(), path  # each layer's output error
    dense = fastlora.inject(copy.deepcopy(host), **config)  # no quantize: the base is dequant(Q), as peft keeps it
    layer = dict(dense.lora_layers())["encoder.layer.0.attention.self.query"]
    assert layer.quant_state is None and layer.weight.dtype == torch.float32
    dense.save(str(tmp_path / "a"))
    base = copy.deepcopy(host)
    with pytest.warns(UserWarning, match="saved on another base"):  # the adapter's record: its base was dequant(Q)
        loaded = fastlora.load(base, str(tmp_path / "a"), allow_base_mismatch=True)
    again = dict(loaded.lora_layers())["encoder.layer.0.attention.self.query"]
    assert torch.equal(again.weight, host.encoder.layer[0].attention.self.query.weight)  # the base untouched
    torch.testing.assert_close(again.lora_A, layer.lora_A)


def test_bad_init_names():
    with pytest.raises(ValueError, match="init_lora_weights must be"):
        fastlora.LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ValueError, match="needs loftq_config"):
        fastlora.LoraConfig(init_lora_weights="loftq")


# -- error-compensated 4-bit merge ---------------------------------------------------------------------------------


def test_requantized_merge_with_a_refit_residual(capsys):
    linear = _minilm_layer_types()["query"]
    layer = fastlora.FastLoRALinear.from_linear(linear, r=8, lora_alpha=16, quant="nf4", init="none")
    x = torch.randn(32, 384)
    exact = x @ layer.merged_weight().T + layer.bias  # the fp32 merged layer: what a merge should compute
    before = layer(x)
    report = layer.merge(requantize=True, refit_rank=8, refit_iters=2, sample=x)
    assert layer.quant_state is not None and layer.merged
    assert report["refit_rel_error"] < report["requant_rel_error"]
    assert report["sample_rel_error_after"] < report["sample_rel_error_before"]
    got = layer(x)
    err = ((got - exact).norm() / (exact - layer.bias).norm()).item()
    assert err == pytest.approx(report["sample_rel_error_after"], rel=1e-3)  # the forward uses Q + L R
    layer.unmerge()
    assert layer._residual is None
    torch.testing.assert_close(layer(x), before)
    plain = layer.merge(requantize=True, sample=x)  # no residual: the plain re-quantisation, as before
    assert "refit_rel_error" not in plain
    assert plain["requant_rel_error"] == pytest.approx(report["requant_rel_error"])
    with capsys.disabled():
        print(
            f"\nrequantised merge, MiniLM query (384x384), r 8 adapter, residual rank 8, 2 iterations: weight error "
            f"{report['requant_rel_error']:.5f} -> {report['refit_rel_error']:.5f}, output error on 32 samples "
            f"{report['sample_rel_error_before']:.5f} -> {report['sample_rel_error_after']:.5f}"
        )


def test_refit_returns_its_best_iterate():
    """LoftQ's alternation is not monotone: on a W that 4 bits (double-quantised) almost represent, iterations 2 and 3
    are worse than 1. The iterate returned is the best one, and a merge keeps a refit only when it beats the plain
    re-quantisation (reported as refit_kept)."""
    from fastlora.modules.requant import quantize_with_residual

    torch.manual_seed(0)
    packed0, state0 = quantize_4bit(torch.randn(96, 128) / 11, "nf4", 64, True)
    w = dequantize_4bit(packed0, state0, torch.float32)
    packed, state, lo, ro, errors = quantize_with_residual(w, 4, 3, quant_type="nf4", blocksize=64, double_quant=True)
    assert errors[-1] > errors[0], errors  # the case: later iterations are worse
    got = ((w - dequantize_4bit(packed, state, torch.float32) - lo @ ro).norm() / w.norm()).item()
    assert got == pytest.approx(min(errors), rel=1e-5)
    layer = fastlora.FastLoRALinear.from_linear(torch.nn.Linear(128, 96), r=4, lora_alpha=4, quant="nf4", init="none")
    report = layer.merge(requantize=True, refit_rank=4, refit_iters=3, sample=torch.randn(16, 128))
    assert report["refit_kept"] == float(report["refit_rel_error"] < report["requant_rel_error"])
    assert (layer._residual is not None) == bool(report["refit_kept"])


# -- the finetune flags ----------------------------------------------------------------------------------------------


def test_finetune_flags_reach_the_lora_config():
    import argparse

    from fastlora.train import methods
    from fastlora.train.cli import add_parsers, config_from_args

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "--method", "qlora", "--dora", "--init", "loftq", "--loftq-iter", "2",
                              "--lora-r", "4", "--target-modules", "q_proj,v_proj"])  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.dora, cfg.init, cfg.loftq_iter) == (True, "loftq", 2)
    model = methods.build(tiny_llama(task="classifier"), "qlora", cfg.method_options(), "classification")
    config = model.peft_config["default"]
    assert config.use_dora and config.init_lora_weights == "loftq" and config.loftq_config["loftq_iter"] == 2
    layer = dict(model.lora_layers())["model.layers.0.self_attn.q_proj"]
    assert layer.use_dora and layer.quant_state is not None and layer.lora_B.abs().sum() > 0  # LoftQ's fit
    plain = config_from_args(parser.parse_args(["finetune"]))
    assert (plain.dora, plain.init, plain.loftq_iter) == (False, "kaiming", 1)
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--init", "svd"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_convert_to_plain_lora_on_the_original_base(tmp_path, init):
    """peft's path_initial_model_for_weight_conversion: the trained PiSSA/OLoRA adapter saved as a rank-2r LoRA that
    fastlora and peft load on the ORIGINAL base with the trained model's outputs."""
    model = fastlora.inject(tiny_llama(), r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    model.save(str(tmp_path / "initial"))
    with torch.no_grad():  # "training"
        for _, layer in model.lora_layers():
            layer.lora_A.add_(0.05 * torch.randn_like(layer.lora_A))
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
    ids = torch.randint(0, 100, (2, 7))
    want = model(input_ids=ids).logits
    model.save(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = fastlora.load(tiny_llama(), str(tmp_path / "plain"))
    assert ours.peft_config["default"].r == 8 and ours.peft_config["default"].init_lora_weights is True
    torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "plain"))
    torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
