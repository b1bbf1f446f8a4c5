"""Building and loading the native extension: the loaded module is current and syncs the test poisoning;
without it (not built, stale, FASTLORA_NO_EXT) everything falls back; setup.py never fails an install;
FASTLORA_CUDA_ARCHS; and the CUDA sources compiled with plain nvcc for sm_80 / sm_90 (no GPU, no CUDA
torch): no spills, the decode GEMV's SASS instruction budget and the static model behind it, the CUDA
binding type-checked against torch's headers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import ROOT, compiler_available, csrc_build, cuda_home, find_nvcc, load_file

from fastlora import _alloc, dispatch, native
from fastlora.quant import quantize_4bit

pytestmark = pytest.mark.usefixtures("native_ext")  # every test here needs the extension built (conftest.py)


# -- loading and fallbacks -----------------------------------------------------------------------------


def test_module_is_current_and_poison_syncs(native_ext):
    assert native.is_built()
    if torch.version.cuda is None:  # a CPU torch builds the CPU kernels only
        assert not native.has_cuda()
    cfg = csrc_build()
    assert native_ext.source_hash == "h" + cfg.source_hash()
    if sys.platform.startswith("linux"):
        assert native_ext.openmp() and native_ext.max_threads() >= 1
    native.dequantize_4bit_cpu(*quantize_4bit(torch.randn(64), "nf4", 64))
    assert native_ext._set_poison(_alloc._poison) is True  # the wrapper synced the tests' poisoning


def test_fallback_without_the_extension(monkeypatch, caplog):
    """Not built: nothing breaks, the public functions fall back to the reference with one
    warning, and backend="native" falls back to Triton/PyTorch."""
    monkeypatch.setattr(native.loader, "_module", None)
    monkeypatch.setattr(native.loader, "_reason", "simulated: not built")
    monkeypatch.setattr(native.loader, "_jit_tried", True)
    native.loader._warn_once.cache_clear()
    dispatch._warn_once.cache_clear()
    assert not native.is_built() and native.unavailable_reason() == "simulated: not built"
    w = torch.randn(10, 64)
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        packed, state = native.quantize_4bit_cpu(w)
        y1 = native.gemv_4bit(torch.randn(2, 64), packed, state)
        y2 = native.gemv_4bit(torch.randn(2, 64), packed, state)
    assert y1.shape == y2.shape == (2, 10)
    assert torch.equal(packed, quantize_4bit(w, backend="torch")[0])
    warnings = [r.getMessage() for r in caplog.records]
    # one from the dispatcher (quantize), one from native.gemv_4bit; neither repeats
    assert sum("simulated: not built" in w for w in warnings) == 2, warnings
    assert dispatch.choose("dequantize_4bit", "cpu", "native").backend == "triton"
    assert dispatch.choose("dequantize_4bit", "cpu").backend == "torch"
    native.loader._warn_once.cache_clear()
    dispatch._warn_once.cache_clear()


def test_stale_or_disabled_build_is_refused(monkeypatch, native_ext):
    class Stale:
        @staticmethod
        def source_hash():
            return "0" * 16

    monkeypatch.setattr(native.loader, "_build_config", lambda: Stale())
    if importlib.util.find_spec("fastlora._C") is None:  # a pip install: the module was compiled on first use
        spec = importlib.util.spec_from_file_location("fastlora._C", native_ext.__file__)  # stands in for one
        monkeypatch.setattr(native.loader.importlib.util, "find_spec", lambda name: spec)
    module, reason = native.loader._import_built()
    assert module is None and "stale build" in reason and "build_ext --inplace" in reason
    monkeypatch.setattr(native.loader, "_module", None)
    monkeypatch.setenv("FASTLORA_NO_EXT", "1")
    assert native.load() is None and native.unavailable_reason() == "FASTLORA_NO_EXT is set"
    assert not native.is_built() and native.loader._reason is None  # nothing tried: unsetting it loads again


@pytest.mark.slow
def test_cuda_architectures_from_the_environment(monkeypatch):
    """FASTLORA_CUDA_ARCHS: separators and spellings accepted; anything older than sm_80 (no bf16 mma.sync)
    refused by name before nvcc runs."""
    cfg = csrc_build()
    monkeypatch.delenv("FASTLORA_CUDA_ARCHS", raising=False)
    assert cfg.cuda_archs() == ["80", "89", "90"]
    monkeypatch.setenv("FASTLORA_CUDA_ARCHS", "sm_80, 9.0")
    assert cfg.cuda_archs() == ["80", "90"]
    for bad, match in (("75;90", "75: the CUDA kernels need compute capability 8.0"), ("hopper", "like '80;90'")):
        monkeypatch.setenv("FASTLORA_CUDA_ARCHS", bad)
        with pytest.raises(ValueError, match=match):
            cfg.cuda_archs()


def test_setup_never_fails_the_install():
    """setup.py with a compiler that fails: a warning and success (pure Python), unless forced."""
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "CXX": "false", "CC": "false", "MAX_JOBS": "1"}
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", d, "--build-temp", d]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "building the native extension failed" in proc.stderr and "installing without native" in proc.stderr
        assert not list(Path(d).rglob("_C*.so"))
        forced = subprocess.run(
            cmd, cwd=ROOT, env={**env, "FASTLORA_FORCE_EXT": "1"}, capture_output=True, text=True, timeout=300
        )
        assert forced.returncode != 0
        skipped = subprocess.run(
            cmd, cwd=ROOT, env={**env, "FASTLORA_NO_EXT": "1"}, capture_output=True, text=True, timeout=300
        )
        assert skipped.returncode == 0 and "FASTLORA_NO_EXT is set" in skipped.stderr


# -- the CUDA sources, compiled with plain nvcc (no GPU, no CUDA torch) ---------------------------------


@pytest.fixture(scope="module")
def cuda_resource_usage():
    """Every csrc/cuda/*.cu compiled for sm_80 and sm_90 (ptxas resource report per kernel)."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): the CUDA sources are compiled where it is")
    usage = {}
    with tempfile.TemporaryDirectory() as d:
        for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            gencode = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
            out = os.path.join(d, source.stem + ".o")
            cmd = [nvcc, "-std=c++17", "-O3", "-c", str(source), "-o", out, "--resource-usage", *gencode]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stderr[-4000:]}"
            pattern = (
                r"Compiling entry function '(\S+)' for '(sm_\d+)'.*?(\d+) bytes stack frame, (\d+) bytes spill "
                r"stores, (\d+) bytes spill loads.*?Used (\d+) registers"
            )
            for m in re.finditer(pattern, proc.stdout + proc.stderr, re.S):
                usage[(m.group(1), m.group(2))] = {
                    "stack": int(m.group(3)), "spill_stores": int(m.group(4)), "spill_loads": int(m.group(5)),
                    "registers": int(m.group(6)),
                }  # fmt: skip
    return usage


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile_without_spills(cuda_resource_usage, arch):
    kernels = {name: u for (name, a), u in cuda_resource_usage.items() if a == arch}
    for kind in ("dequantize_4bit_kernel", "gemv_4bit_kernel", "gemv_4bit_mma_kernel", "merge_4bit_kernel"):
        assert any(kind in name for name in kernels), f"no {kind} in the {arch} build"
    assert sum("gemv_4bit_kernel" in name for name in kernels) == 15  # 3 dtypes x M in {1, 2, 4, 8, 16}
    assert sum("gemv_4bit_mma_kernel" in name for name in kernels) == 4  # fp16/bf16 x M <= 8 / 16
    for name, u in kernels.items():
        assert u["spill_stores"] == 0 and u["spill_loads"] == 0 and u["stack"] == 0, f"{name} on {arch}: {u}"
        assert 0 < u["registers"] <= 255, f"{name} on {arch}: {u}"


def _cuda_sass():
    """benchmarks/cuda_sass.py, the static model of the decode GEMV, loaded from its file (not installed)."""
    return load_file("cuda_sass", ROOT / "benchmarks" / "cuda_sass.py")


def test_decode_gemv_instruction_budget():
    """The streaming loops of the decode GEMV stay as lean and as deep as in benchmarks/results/
    static-sm90-2026-11-25 (sm_90 SASS, per 16-byte chunk = 32 weights a lane: about 188 instructions for
    the tensor-core kernel at M <= 8 and 196 at M <= 16, 198 for the fp32 CUDA-core kernel at M = 1;
    issue-bound ceilings near 88 / 84 / 83 % of H100 bandwidth), and the tensor-core kernel keeps two
    steps of W in flight (about 4.3 16-byte loads a lane) at 128 registers, two blocks an SM: a guard
    against work creeping into the hot loops and against the prefetch collapsing."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the SASS budget is checked where it is")
    cuda_sass = _cuda_sass()
    rows = cuda_sass.gemv_loops(*cuda_sass.disassemble(nvcc))
    loops = {(r["kernel"], r["dtype"], r["M"]): r for r in rows}
    assert len(loops) == 9  # 16-bit x on the 16-byte path always takes the tensor cores
    for dtype in ("fp16", "bf16"):
        for m, limit, hmma, wavefronts in ((8, 195, 4, 48), (16, 205, 8, 56)):
            r = loops[("tensor cores", dtype, m)]
            assert r["instructions"] <= limit, r
            # one table lookup and one multiply a weight, 8 mma.sync (x 1 or 2 token tiles) per 2 chunks
            assert r["lds"] == 32 and r["fmul"] <= 34 and r["hmma"] == hmma, r
            # W of two steps (2 x 2 loads a lane) outstanding through most of the loop, at two blocks an SM
            assert r["in_flight"] >= 4.0 and r["blocks_per_sm"] >= 2, r
            assert r["wavefronts"] <= wavefronts, r  # L1: 32 table lookups, W, absmax and x (8 or 16) a chunk
            latency = cuda_sass.latency_ceiling(r, sms=132, bandwidth_tbs=3.35, latency_ns=1000)
            assert latency == 1.0, r  # enough in flight for H100 bandwidth even at 1 µs of latency
    m1 = loops[("CUDA cores", "fp32", 1)]
    assert m1["instructions"] <= 210 and m1["lds"] == 32 and m1["fmul"] <= 34, m1


def test_sass_model_counts_loads_in_flight_and_occupancy():
    """The static model's inputs on hand-made cases: load-to-use distance around the back edge, L1
    wavefronts per load, and register-limited occupancy (per-warp allocation in units of 256 registers)."""
    cuda_sass = _cuda_sass()
    loop = [
        "LDG.E.NA.128.CONSTANT R8, desc[UR4][R2.64]",  # used at 3: 3 instructions
        "IMAD R16, R14, 0x2, R1",
        "LDG.E.NA.128.CONSTANT R12, desc[UR4][R4.64]",  # used at 1 of the next iteration: 4 instructions
        "FFMA R20, R11, R20, R21",
        "BRA 0x0",
    ]
    assert cuda_sass._in_flight(loop) == pytest.approx((3 + 4) / 5)
    wavefronts = [cuda_sass._wavefronts(op) for op in (*loop, "LDS R3, [R2]", "@!P1 LDG.E.64 R4, desc[UR4][R6.64]")]
    assert wavefronts == [4, 0, 4, 0, 0, 1, 2]
    assert cuda_sass.blocks_per_sm(128, 256) == 2 and cuda_sass.blocks_per_sm(129, 256) == 1
    assert cuda_sass.blocks_per_sm(124, 128) == 4 and cuda_sass.blocks_per_sm(32, 256) == 8
    row = {"blocks_per_sm": 2, "threads": 256, "in_flight": 4.0}  # 32 KiB an SM x 132 = 4.3 MB
    assert cuda_sass.latency_ceiling(row, sms=132, bandwidth_tbs=3.35, latency_ns=600) == 1.0
    assert cuda_sass.latency_ceiling(row, sms=132, bandwidth_tbs=3.35, latency_ns=2000) == pytest.approx(
        132 * 2 * 256 * 4 * 16 / (3.35e12 * 2e-6)
    )


@pytest.mark.slow
def test_cuda_binding_compiles_against_torch_headers():
    """bindings_cuda.cpp only builds into a CUDA torch; here it is at least parsed and type-checked
    against torch's and CUDA's headers (the CPU wheel lacks one generated CMake header: stubbed)."""
    nvcc = find_nvcc()
    if nvcc is None or not compiler_available():
        pytest.skip("needs nvcc (for the CUDA headers) and a C++ compiler")
    from torch.utils import cpp_extension

    cuda_include = os.path.join(cuda_home(), "include")
    with tempfile.TemporaryDirectory() as d:
        stub = Path(d, "c10", "cuda", "impl")
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes = [*cpp_extension.include_paths(), d, cuda_include, str(ROOT / "csrc")]
        import sysconfig

        includes.append(sysconfig.get_paths()["include"])
        cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only", "-DFASTLORA_WITH_CUDA",
               *(f"-I{i}" for i in includes), str(ROOT / "csrc" / "bindings_cuda.cpp")]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
