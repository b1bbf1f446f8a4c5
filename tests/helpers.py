"""What the test files share besides fixtures: readable ids, the numeric bound of the kernel tests, and the
paths, loaders and inputs of the native-extension tests.

Plain names, imported as ``from helpers import DTYPES, FLOOR, id_formatter, rel_error`` (pytest puts tests/
on the path, as for ``models``); fixtures and hooks stay in conftest.py, which nothing imports.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository: csrc/, benchmarks/, setup.py


def id_formatter(name):
    """Readable parametrize ids: ``id_formatter("bs")`` -> ``bs=64``."""

    def fmt(value):
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        return f"{name}={value}"

    return fmt


# The numeric bound of the kernel tests: error ≤ 2x PyTorch's own error in that dtype plus this floor
# (flash-attention's rule), errors relative to a float64 reference.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref||, in float64 (a zero reference counts as norm 1e-30)."""
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# -- the native extension (test_native_*.py) ------------------------------------------------------------


def compiler_available() -> bool:
    """A C++ compiler ($CXX, else c++) on PATH: without one the native tests skip instead of failing."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def cuda_home() -> str | None:
    """A CUDA toolkit with nvcc and the runtime headers (CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc's)."""
    which = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if which:  # resolves wrapper scripts only as far as symlinks go
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(which))))
    needed = (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    for home in candidates:
        if home and all(os.path.isfile(os.path.join(home, *f)) for f in needed):
            return home
    return None


def find_nvcc() -> str | None:
    """The nvcc of :func:`cuda_home`, or None."""
    home = cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def load_file(name: str, path: Path) -> ModuleType:
    """A module loaded from its file, for scripts that are not installed (``csrc/build.py``,
    ``benchmarks/cuda_sass.py``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def csrc_build() -> ModuleType:
    """``csrc/build.py``, the build configuration setup.py and the JIT loader share (source hash, CUDA archs)."""
    return load_file("csrc_build", ROOT / "csrc" / "build.py")


def rounding_cases() -> torch.Tensor:
    """fp32 values at every fp16 and bf16 rounding boundary: each tie between neighbouring finite
    values (subnormals included) and the fp32 values just below and above it, both signs."""
    h = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    ties16 = (h[:-1].double() + h[1:].double()) / 2  # exact in fp32 (12 significant bits)
    b = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    ties_bf16 = (b[:-1].double() + b[1:].double()) / 2
    ties = torch.cat([ties16, ties_bf16, torch.tensor([65520.0, 65504.0, 2.0**-25, 2.0**-24, 3.4e38])]).float()
    around = torch.cat([ties, torch.nextafter(ties, torch.tensor(0.0)), torch.nextafter(ties, torch.tensor(1e39))])
    return torch.cat([around, -around])


def loss_before_after(model, batch, optimizer, steps: int) -> tuple[float, float]:
    """The loss of ``model`` on ``batch`` before and after ``steps`` steps of ``optimizer`` (hosts are built in
    eval mode, so both losses are deterministic)."""
    with torch.no_grad():
        first = model(**batch).loss.item()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        return first, model(**batch).loss.item()


def snapshot(module) -> dict:
    """A detached copy of ``module``'s state dict, to compare after training."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
