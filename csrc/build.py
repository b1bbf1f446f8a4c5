"""How ``fastlora._C`` is compiled: sources and flags, shared by setup.py and the JIT fallback.

Imported by path (``importlib``), not as a package module, so it depends on the standard library
only; the callers pass what they get from ``torch.utils.cpp_extension``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CPU_SOURCES = ("bindings.cpp", "cpu/quant4_cpu.cpp")
CUDA_SOURCES = ("bindings_cuda.cpp", "cuda/quant4_cuda.cu")
DEFAULT_CUDA_ARCHS = ("80", "89", "90")
_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def sources(cuda: bool) -> list[str]:
    """Absolute paths of the translation units (CPU always; the CUDA ones when ``cuda``)."""
    names = CPU_SOURCES + (CUDA_SOURCES if cuda else ())
    return [str(ROOT / name) for name in names]


def all_files() -> list[str]:
    """Absolute paths of every source and header (CUDA ones too) and this file: the extension's
    rebuild triggers (``depends``), which also puts all of them in an sdist."""
    return [*sorted(str(p) for p in ROOT.rglob("*") if p.suffix in _SOURCE_SUFFIXES), str(ROOT / "build.py")]


def source_hash() -> str:
    """sha256 (16 hex digits) over every C++/CUDA source and header: a built module records it,
    and fastlora.native refuses a module built from other sources (a stale in-place build)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in ROOT.rglob("*") if p.suffix in _SOURCE_SUFFIXES):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_ninja_on_path() -> bool:
    """torch.utils.cpp_extension runs ``ninja`` from PATH; a venv's own ninja (the ``ninja`` wheel)
    is not on PATH unless the venv is activated, so add its directory. True when ninja is found."""
    if shutil.which("ninja"):
        return True
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for directory in dirs:
        if any(os.path.isfile(os.path.join(directory, name)) for name in ("ninja", "ninja.exe")):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return True
    return False


def openmp_flags() -> list[str]:
    """OpenMP on Linux with GCC/Clang; elsewhere the kernels build single-threaded (``#ifdef _OPENMP``)."""
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cxx_flags(cuda: bool) -> list[str]:
    # -ffp-contract=off: no FMA contraction, so quantise/dequantise round exactly like torch's
    # separate multiply and add (bit-identity); never -ffast-math for the same reason.
    flags = ["-O3", "-ffp-contract=off", f"-DFASTLORA_SOURCE_HASH=h{source_hash()}", *openmp_flags()]
    if cuda:
        flags.append("-DFASTLORA_WITH_CUDA")
    return flags


def link_flags() -> list[str]:
    return openmp_flags()


def cuda_archs() -> list[str]:
    """Compute capabilities from ``FASTLORA_CUDA_ARCHS`` ("80;89;90", commas or spaces also work)."""
    raw = os.environ.get("FASTLORA_CUDA_ARCHS", "")
    archs = [a.strip().replace(".", "").removeprefix("sm_") for a in raw.replace(",", ";").replace(" ", ";").split(";")]
    archs = [a for a in archs if a] or list(DEFAULT_CUDA_ARCHS)
    bad = [a for a in archs if not a.isdigit()]
    if bad:
        raise ValueError(f"fastlora: FASTLORA_CUDA_ARCHS must list compute capabilities like '80;90', got {raw!r}")
    old = [a for a in archs if int(a) < 80]
    if old:
        raise ValueError(
            f"fastlora: FASTLORA_CUDA_ARCHS={raw!r} names {', '.join(old)}: the CUDA kernels need compute capability "
            "8.0 or newer (bf16 and mma.sync m16n8k16)"
        )
    return archs


def nvcc_flags(archs: list[str] | None = None) -> list[str]:
    """SASS for each architecture (``archs``, default :func:`cuda_archs`) plus PTX of the newest, so later
    GPUs JIT-compile it."""
    archs = archs or cuda_archs()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    # --threads=0: the architectures compile in parallel, one thread per CPU
    return ["-O3", "--expt-relaxed-constexpr", "--threads=0", "-DFASTLORA_WITH_CUDA", *gencode]
