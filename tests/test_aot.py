"""Every Triton kernel and tuning config compiles for sm_80 and sm_90, with no GPU and no spills,
with the installed triton and with the GPU machine's (3.6, which ``make env`` installs beside the
venv's: the two compilers differ, e.g. in register allocation and in typing float literals; 3.6 is also what
torch 2.11 brings to consumer Ampere/Ada GPUs, which build the sm_80 code path).

Spills are read from the SASS (local stores/loads; disassembled where the cubin has a stack frame, since without one
there is no local memory to spill to, and for sm_90 tensor-core kernels). The cubin's stack size also counts call
frames, e.g. of the IEEE division slow path the quantiser needs for bit-exactness, so
``stack == 0`` is required only of the tensor-core GEMM kernels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

import fastlora.kernels
from fastlora.aot import registered

SPEC_NAMES = [spec.name for spec in registered()]
# The GPU machine's triton, a plain directory that only the compile subprocess puts on its path
# (Makefile: GPU_TRITON, installed with pip --target by `make env`).
GPU_TRITON_DIR = Path(sys.prefix) / "gpu-triton"
GPU_TRITON_VERSION = "3.6."


def _compile_all(gpu: bool, archs: str) -> dict:
    """Compile every spec for ``archs`` in a subprocess without TRITON_INTERPRET (real JITFunctions), with the
    installed triton or (``gpu``) the GPU machine's; {(name, arch): result}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if gpu:
        if not (GPU_TRITON_DIR / "triton").is_dir():
            pytest.skip(f"the GPU machine's triton is not installed at {GPU_TRITON_DIR} (make env installs it)")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GPU_TRITON_DIR), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "fastlora.aot", "--json", "--arch", archs],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert proc.stdout, proc.stderr[-4000:]
    results = json.loads(proc.stdout)
    versions = {r["triton"] for r in results}
    if gpu:
        assert versions and all(v.startswith(GPU_TRITON_VERSION) for v in versions), versions
    else:
        assert versions == {triton.__version__}, versions
    return {(r["name"], r["arch"]): r for r in results}


@pytest.fixture(scope="module")
def compiled():
    """The installed triton, sm_80 and sm_90."""
    return _compile_all(False, "80,90")


@pytest.fixture(scope="module")
def compiled_gpu_triton():
    """The GPU machine's triton (3.6), sm_80 and sm_90."""
    return _compile_all(True, "80,90")


def _check(result, name, arch):
    assert result["ok"], f"triton {result['triton']}: {result.get('error')}"
    assert result["spill_stores"] == 0 and result["spill_loads"] == 0, f"{name} on sm_{arch} spills: {result}"
    assert 0 < result["registers"] <= 255
    if result["tensor_core"]:
        # GEMM kernels: not even a call frame, and wgmma on Hopper.
        assert result["stack"] == 0, f"{name} on sm_{arch} uses stack: {result}"
        if arch == 90:
            assert result["hgmma"] > 0, f"{name}: no wgmma (HGMMA) on sm_90: {result}"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_kernel_compiles_without_spills(compiled, name, arch):
    _check(compiled[(name, arch)], name, arch)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_kernel_compiles_without_spills_on_the_gpu_triton(compiled_gpu_triton, name, arch):
    _check(compiled_gpu_triton[(name, arch)], name, arch)


def test_every_kernel_has_a_spec():
    """A kernel added without registering its compile specs would escape the GPU-compile check."""
    covered = {getattr(spec.fn, "__name__", None) or spec.fn.fn.__name__ for spec in registered()}
    kernels = set()
    for module_name in dir(fastlora.kernels):
        module = getattr(fastlora.kernels, module_name)
        for attr in dir(module):
            obj = getattr(module, attr)
            if attr.endswith("_kernel") and hasattr(obj, "fn"):
                kernels.add(obj.fn.__name__)
    assert kernels, "no kernels found"
    assert kernels <= covered, f"kernels without AOT specs: {sorted(kernels - covered)}"


def test_triton_version_is_supported():
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    assert (major, minor) >= (3, 6)


def test_kernel_float_literals_are_fp32_on_every_triton():
    """triton 3.6 (the GPU machine's) types a bare float literal outside fp32's normal range (a
    subnormal such as 1e-38, or past 3.4e38) as fp64, and an fp32-only op then fails to compile;
    triton 3.9 (CI's) accepts it. Such constants must be built as fp32 (tl.full(..., tl.float32))."""
    import ast
    import inspect
    import textwrap

    smallest_normal, largest = 2.0**-126, 3.4028234663852886e38
    found = set()
    for fn in {spec.fn.fn for spec in registered()}:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        in_full = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "full"
                   for a in n.args}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, float) and id(node) not in in_full:
                v = abs(node.value)
                if 0 < v < float("inf") and not smallest_normal <= v <= largest:
                    found.add(f"{fn.__name__}: {node.value!r} (line {node.lineno} of the kernel)")
    assert not found, sorted(found)
