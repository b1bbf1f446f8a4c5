"""A user's install: a fresh venv, torch, then a plain ``pip install .`` (default build isolation, no flags),
as the README says (``.ci/pip-venv`` does exactly that from a copy of this checkout). pip builds fastlora
without torch there, so no ``fastlora._C`` exists; the first call that wants the native CPU kernels compiles
the shipped sources into the cache and from then on they run. Then a fast subset of this suite runs in that
install (the tests import the installed package, not this checkout).

Marked ``install`` (minutes): ``make test`` runs it, ``make test-fast`` does not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.install

# Files whose tests depend on how fastlora was installed: the native extension's loading, dispatch and
# kernels, fastlora env, the bench guard that skipped the native rows, and the 4-bit format end to end.
FAST_SUBSET = [
    "tests/test_env.py",
    "tests/test_dispatch.py",
    "tests/test_native_build.py",
    "tests/test_native_cpu.py",
    "tests/test_native_ops.py",
    "tests/test_quant_state.py",
    "tests/test_bench.py::test_decode_and_adapter_suites_guard_every_implementation",
]


@pytest.fixture(scope="module")
def user_install(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(venv, environment): fastlora[test] installed as a user installs it, with an empty native cache."""
    if os.environ.get("FASTLORA_NO_EXT"):
        pytest.skip("FASTLORA_NO_EXT is set: this run checks an install without native kernels")
    base = tmp_path_factory.mktemp("user-install")
    venv = base / "venv"
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "pip-venv"), str(venv), ".[test]"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTLORA_", "PYTHON", "VIRTUAL_ENV", "PYTEST_"))}
    env |= {"FASTLORA_CACHE_DIR": str(base / "cache"), "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # as an activated venv
    return venv, env


def _python(venv: Path, env: dict[str, str], code: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # -P: this checkout's directory is not on sys.path, so `import fastlora` is the installed package
    return subprocess.run(
        [str(venv / "bin" / "python"), "-P", "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


FIRST_CALL = """
    import importlib.util, sys, time
    import torch
    import fastlora
    from fastlora import dispatch, native
    from fastlora.native import loader
    from fastlora.quant import quantize_4bit

    assert ".venv" not in fastlora.__file__ and "site-packages" in fastlora.__file__, fastlora.__file__
    assert importlib.util.find_spec("fastlora._C") is None  # pip's isolated build compiled nothing
    before = loader.status()
    print("before:", before.state, "|", before.reason)
    start = time.perf_counter()
    w = torch.randn(512, 256)
    packed, state = quantize_4bit(w)  # the first call that wants the native CPU kernels
    print(f"first call: {time.perf_counter() - start:.1f} s")
    after = loader.status()
    print("after:", after.state, "|", after.origin)
    assert after.state == "loaded" and after.origin.startswith("cache "), after
    assert dispatch.choose("quantize_4bit", "cpu").backend == "native"
    assert dispatch.choose("lora_linear", "cpu", m=1, quantized=True).backend == "native"
    assert torch.equal(packed, quantize_4bit(w, backend="torch")[0])  # bit for bit
    # the README's FastLoRALinear example at a small size: a decode-sized call runs the native 4-bit GEMV
    lora = fastlora.FastLoRALinear.from_linear(torch.nn.Linear(256, 128), r=8, lora_alpha=16, quant="nf4")
    assert lora(torch.randn(3, 256)).shape == (3, 128)
"""


def test_plain_pip_install_runs_the_native_cpu_kernels_after_the_first_call(user_install):
    venv, env = user_install
    first = _python(venv, env, FIRST_CALL)
    assert first.returncode == 0, f"{first.stdout}\n{first.stderr[-5000:]}"
    assert (
        "before: not loaded | the native extension fastlora._C is not built: its sources are compiled on first use"
        in (first.stdout)
    )
    notices = [line for line in first.stderr.splitlines() if line.startswith("fastlora: compil")]
    assert len(notices) == 2, first.stderr[-3000:]  # one line before (what, where, how to opt out), one after
    assert "compiling the native kernels once (CPU, about a minute)" in notices[0] and "FASTLORA_NO_JIT=1" in notices[0]
    assert notices[1].startswith("fastlora: compiled the native kernels in ") and " s (cached" in notices[1]
    print(first.stdout, "\n".join(notices), sep="\n")  # the measured first-call time, in -s / -rA output

    # a later process: loaded from the cache at once, silently; `fastlora env` says so
    again = _python(venv, env, "import fastlora.native as n; assert n.is_built(); print(n.loader.status().origin)", 300)
    assert again.returncode == 0 and again.stdout.startswith("cache "), again.stderr[-3000:]
    assert "compil" not in again.stderr
    report = subprocess.run(
        [str(venv / "bin" / "fastlora"), "env"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert report.returncode == 0 and "state       loaded from cache " in report.stdout, report.stderr[-3000:]
    assert "\n    native  cpu:  default\n" in report.stdout  # quantize_4bit / dequantize_4bit / merge_4bit


def test_opting_out_of_the_first_use_compile(user_install, tmp_path):
    """FASTLORA_NO_JIT=1 with an empty cache: nothing compiles, one warning names the opt-out, results unchanged."""
    venv, env = user_install
    env = {**env, "FASTLORA_NO_JIT": "1", "FASTLORA_CACHE_DIR": str(tmp_path / "empty")}
    code = "import torch; from fastlora.quant import quantize_4bit; quantize_4bit(torch.randn(64, 64)); print('ok')"
    proc = _python(venv, env, code, 300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("fastlora:")]
    assert len(warnings) == 1 and "FASTLORA_NO_JIT is set" in warnings[0], proc.stderr[-3000:]
    assert not (tmp_path / "empty" / "native").exists() or not any((tmp_path / "empty" / "native").rglob("*.so"))


def test_fast_subset_passes_in_the_pip_install(user_install):
    """The suite's install-dependent files pass in the pip install (native kernels from the first-use compile)."""
    venv, env = user_install
    cmd = [str(venv / "bin" / "python"), "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd += ["-m", "not slow and not install and not aot and not gpu", *FAST_SUBSET]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False)
    tail = proc.stdout[-4000:]
    assert proc.returncode == 0, f"{tail}\n{proc.stderr[-3000:]}"
    assert " passed" in tail and " failed" not in tail, tail
    print(tail.strip().splitlines()[-1])
    assert sys.executable != str(venv / "bin" / "python")
