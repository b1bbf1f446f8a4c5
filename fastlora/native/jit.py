"""Compiling the native kernels on first use into a per-machine cache (used by :mod:`fastlora.native.loader`).

A plain ``pip install .`` builds fastlora in an isolated environment without torch, so no
``fastlora._C`` is built there; the sources travel inside the package instead (setup.py copies
``csrc/`` to ``fastlora/_csrc``) and are compiled here with ``torch.utils.cpp_extension.load``
(ninja) against the torch that runs them, once per torch version, Python, variant and source hash.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType

import torch

NAME = "fastlora_native"
_log = logging.getLogger("fastlora")


def _env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """fastlora's cache: ``FASTLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastlora`` or ``~/.cache/fastlora``."""
    if os.environ.get("FASTLORA_CACHE_DIR"):
        return Path(os.environ["FASTLORA_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fastlora"


def with_cuda() -> bool:
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and not _env("FASTLORA_NO_CUDA")


def _cuda_archs(cfg: ModuleType) -> list[str]:
    """``FASTLORA_CUDA_ARCHS`` when set, else the visible GPUs' (one architecture compiles in a fraction
    of the time of the release set), else the release set."""
    if os.environ.get("FASTLORA_CUDA_ARCHS") or not torch.cuda.is_available():
        return cfg.cuda_archs()
    found = {"".join(map(str, torch.cuda.get_device_capability(i))) for i in range(torch.cuda.device_count())}
    return sorted(a for a in found if int(a) >= 80) or cfg.cuda_archs()


def cache_dir(cfg: ModuleType, cuda: bool | None = None) -> Path:
    """This machine's build directory for ``cfg``'s sources (csrc/build.py), torch, Python and variant."""
    cuda = with_cuda() if cuda is None else cuda
    variant = f"cu{torch.version.cuda}-sm{'_'.join(_cuda_archs(cfg))}" if cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / "native" / f"torch{torch.__version__}-{python}-{variant}-{cfg.source_hash()}"


def import_cached(directory: Path) -> tuple[ModuleType | None, str | None]:
    """The module compiled earlier into ``directory``: (module, None); (None, None) when there is none;
    (None, reason) when it does not load (then it is compiled again)."""
    path = directory / (NAME + (".pyd" if sys.platform == "win32" else ".so"))  # cpp_extension's LIB_EXT
    if not ((directory / "BUILT.txt").is_file() and path.is_file()):
        return None, None
    try:
        spec = importlib.util.spec_from_file_location(NAME, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as e:
        return None, f"the cached native module {path} does not load ({e})"
    return module, None


def _toolchain_problem(cfg: ModuleType) -> str | None:
    """Why the sources cannot compile here, found without running a compiler (None when they might)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: `{compiler}` is not on PATH (install g++ or clang, or set CXX)"
    if not cfg.ensure_ninja_on_path():
        return "ninja is not installed (pip install ninja)"
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").is_file():
        return f"the Python headers are missing ({include}/Python.h; install python3-dev or python3-devel)"
    return None


def compile_into_cache(cfg: ModuleType) -> tuple[ModuleType | None, str | None]:
    """Compile the sources into the cache: (module, None) or (None, reason)."""
    if (problem := _toolchain_problem(cfg)) is not None:
        return None, f"cannot compile the native kernels: {problem}"
    from torch.utils import cpp_extension

    cuda = with_cuda()
    directory = cache_dir(cfg, cuda)
    directory.mkdir(parents=True, exist_ok=True)
    archs = _cuda_archs(cfg) if cuda else []
    what = f"CPU + CUDA sm {', '.join(archs)}, several minutes" if cuda else "CPU, about a minute"
    _log.warning(f"fastlora: compiling the native kernels once ({what}) into {directory}; FASTLORA_NO_JIT=1 skips this")
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=NAME,
            sources=cfg.sources(cuda),
            extra_cflags=cfg.cxx_flags(cuda),
            extra_cuda_cflags=cfg.nvcc_flags(archs) if cuda else None,
            extra_ldflags=cfg.link_flags(),
            extra_include_paths=[str(cfg.ROOT)],
            build_directory=str(directory),
            with_cuda=cuda,
        )
    except Exception as e:  # compile error, a broken toolchain
        log = directory / "FAILED.txt"
        log.write_text(f"{type(e).__name__}: {e}\n")
        tail = "\n".join(str(e).strip().splitlines()[-12:])
        return None, f"compiling the native kernels failed (full output in {log}): {tail}"
    seconds = time.perf_counter() - start
    (directory / "FAILED.txt").unlink(missing_ok=True)
    (directory / "BUILT.txt").write_text(f"compiled in {seconds:.0f} s with torch {torch.__version__}\n")
    _log.warning(f"fastlora: compiled the native kernels in {seconds:.0f} s (cached for later runs)")
    return module, None
