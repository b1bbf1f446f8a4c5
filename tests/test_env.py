"""``fastlora env`` in each state of the backends (native built / not built / failed / opted out, Triton's
interpreter on and off), and the first-use compile's failure path: it says why once and falls back.

The successful first-use compile in a fresh install is tests/test_install.py's (minutes).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

from fastlora import dispatch, env, native
from fastlora.cli import main
from fastlora.native import loader
from fastlora.quant import quantize_4bit


@pytest.fixture
def not_built(monkeypatch, tmp_path):
    """The loader as in an install without ``fastlora._C`` and an empty build cache (nothing compiled yet)."""
    monkeypatch.setattr(loader, "_module", None)
    monkeypatch.setattr(loader, "_origin", None)
    monkeypatch.setattr(loader, "_reason", None)
    monkeypatch.setattr(loader, "_jit_tried", False)
    monkeypatch.setattr(loader, "_import_built", lambda: (None, loader._NOT_BUILT))
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("FASTLORA_NO_EXT", "FASTLORA_NO_JIT", "FASTLORA_JIT"):
        monkeypatch.delenv(name, raising=False)
    loader._warn_once.cache_clear()
    dispatch._warn_once.cache_clear()
    yield tmp_path / "cache"
    loader._warn_once.cache_clear()
    dispatch._warn_once.cache_clear()


def _report(capsys, *args) -> str:
    assert main(["env", *args]) == 0
    return capsys.readouterr().out


def test_env_built(native_ext, capsys):
    """The extension loaded: its origin, the native rows the default on CPU tensors, the versions."""
    info = env.collect()
    assert info["native"]["state"] == "loaded" and info["native"]["origin"].split()[0] in ("built", "cache")
    assert info["ops"]["quantize_4bit"]["native"]["cpu"] == "default"
    assert info["ops"]["dequantize_4bit"]["native"]["cpu"] == "default"
    assert info["ops"]["lora_linear"]["native"]["cpu"].startswith("default for some calls (not: ")
    assert info["ops"]["quantize_4bit"]["torch"]["cpu"].startswith("reference")
    assert (
        info["packages"]["torch"] == torch.__version__.split("+")[0] or info["packages"]["torch"] == torch.__version__
    )
    assert set(env.PACKAGES) <= set(info["packages"])  # torch, triton, bitsandbytes, peft, transformers ...
    text = _report(capsys)
    assert "paste all of this into a bug report" in text and "loaded from" in text
    for name in ("python", "torch", "triton", "bitsandbytes", "peft", "transformers", "CUDA", "build cache"):
        assert f"\n{name}" in text or f"  {name}" in text, name
    assert json.loads(_report(capsys, "--json"))["native"]["state"] == "loaded"


def test_env_not_built_compiles_nothing(not_built, capsys):
    """No fastlora._C and no cache: env says the sources compile on first use, and where, without compiling."""
    info = env.collect()
    nat = info["native"]
    assert nat["state"] == "not loaded" and "compiled on first use into" in nat["reason"]
    assert nat["cache"].startswith(str(not_built)) and not (not_built / "native").exists()  # nothing built
    assert info["ops"]["quantize_4bit"]["native"]["cpu"].startswith("no: the native extension fastlora._C is not built")
    assert info["ops"]["quantize_4bit"]["torch"]["cpu"].startswith("reference")
    assert not loader._jit_tried  # the look compiled nothing, so the first real call still may
    text = _report(capsys)
    assert "not loaded: the native extension fastlora._C is not built" in text and "PyTorch reference" in text


def test_env_after_a_failed_compile_and_with_jit_off(not_built, monkeypatch):
    directory = loader.cache_dir()
    directory.mkdir(parents=True)
    (directory / "FAILED.txt").write_text("RuntimeError: c++: fatal error\n")
    assert "an earlier compile of the native kernels failed" in env.collect()["native"]["reason"]
    (directory / "FAILED.txt").unlink()
    monkeypatch.setenv("FASTLORA_NO_JIT", "1")
    reason = env.collect()["native"]["reason"]
    assert "compiled on first use" in reason and "FASTLORA_NO_JIT is set" in reason


def test_env_opted_out(monkeypatch, capsys):
    monkeypatch.setattr(loader, "_module", None)
    monkeypatch.setenv("FASTLORA_NO_EXT", "1")
    info = env.collect()
    assert info["native"]["state"] == "disabled" and info["environment"]["FASTLORA_NO_EXT"] == "1"
    assert {info["ops"][op]["native"]["cpu"] for op in ("quantize_4bit", "lora_linear", "merge_4bit")} == {
        "no: FASTLORA_NO_EXT is set"
    }
    assert "disabled: FASTLORA_NO_EXT is set" in _report(capsys)


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_env_triton_interpreter(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    cpu = env.collect()["ops"]["lora_linear"]["triton"]["cpu"]
    if interpret == "1":
        assert cpu.startswith("on request: TRITON_INTERPRET=1")
    else:
        assert cpu.startswith("no: CUDA tensors only")


def test_env_without_a_gpu(monkeypatch):
    """No CUDA device: every CUDA row says why (here forced, so the test means the same on a GPU machine)."""
    monkeypatch.setattr(env, "cuda_unavailable", lambda: "no CUDA device visible (driver, CUDA_VISIBLE_DEVICES)")
    monkeypatch.setattr(env, "_cuda", lambda: {"torch_cuda": None, "available": False, "reason": "none", "devices": []})
    info = env.collect()
    rows = [row["cuda"] for backends in info["ops"].values() for row in backends.values()]
    assert rows and all(r == "no: no CUDA device visible (driver, CUDA_VISIBLE_DEVICES)" for r in rows)
    assert "backends by op for CPU tensors (no CUDA tensors here: none)" in env.format_report(info)


def test_failed_first_use_compile_says_why_once_and_falls_back(not_built, monkeypatch, caplog):
    """A compiler that fails: one notice, one warning with the reason, FAILED.txt, and the reference runs
    (bit-identical); the next process does not retry (FASTLORA_JIT=1 does)."""
    monkeypatch.setenv("CXX", "false")  # on PATH, fails every call
    w = torch.randn(8, 64)
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        packed, _ = quantize_4bit(w)
        quantize_4bit(w)
    messages = [r.getMessage() for r in caplog.records if r.name == "fastlora"]
    assert sum("compiling the native kernels once" in m for m in messages) == 1, messages
    failed = [m for m in messages if "compiling the native kernels failed" in m]
    assert len(failed) == 1 and "FAILED.txt" in failed[0] and "PyTorch reference runs instead" in failed[0]
    assert torch.equal(packed, quantize_4bit(w, backend="torch")[0])
    assert (loader.cache_dir() / "FAILED.txt").is_file() and not native.is_built()
    # a later process: no second attempt, the reason names the log
    monkeypatch.setattr(loader, "_reason", None)
    monkeypatch.setattr(loader, "_jit_tried", False)
    assert loader.load() is None and "an earlier compile" in native.unavailable_reason()


def test_python_m_fastlora_env():
    """``python -m fastlora env``, the spelling for a bug report from any environment."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastlora", "env"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("fastlora env (paste all of this into a bug report)")
    assert "native kernels (csrc/)" in proc.stdout and "quantize_4bit" in proc.stdout
