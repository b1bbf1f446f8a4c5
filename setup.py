"""Build script: package metadata lives in pyproject.toml; this adds the native extension.

``fastlora._C`` (csrc/, see csrc/README.md) is built with ``torch.utils.cpp_extension`` and ninja
when torch is importable at build time (``pip install --no-build-isolation``, as ``make`` does):
the OpenMP CPU kernels always, the CUDA kernels too when torch has CUDA and nvcc is found
(SASS for sm_80, sm_89, sm_90 plus PTX). A plain ``pip install .`` builds in an isolated
environment without torch (pulling a multi-GB torch into it would also build against another torch
than the one that runs it): then nothing is compiled here, and fastlora compiles the same sources
on first use into its cache (fastlora/native/loader.py). Either way the sources are copied into the
package as ``fastlora/_csrc`` for that. A build that cannot run or fails never fails the install:
a warning is printed and the first use compiles instead (or the Triton/PyTorch paths run).

Environment:
    FASTLORA_NO_EXT=1        skip native code entirely
    FASTLORA_FORCE_EXT=1     a failed or impossible build fails the install (CI, release builds)
    FASTLORA_NO_CUDA=1       CPU kernels only, even with a CUDA build of torch
    FASTLORA_CUDA_ARCHS      compute capabilities of the CUDA build, default "80;89;90"
    MAX_JOBS                 parallel compile jobs (read by torch's ninja build)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(message: str) -> None:
    bar = "*" * 100
    print(
        f"\n{bar}\nfastlora: {message}\nfastlora: installing without native kernels; they are compiled on first use "
        f"(FASTLORA_NO_JIT=1 opts out), or with `python setup.py build_ext --inplace` (see csrc/README.md).\n{bar}\n",
        file=sys.stderr,
        flush=True,
    )


def _build_config():
    spec = importlib.util.spec_from_file_location("fastlora_csrc_build", HERE / "csrc" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _native_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); empty when native code is skipped or cannot build."""
    force = _env("FASTLORA_FORCE_EXT")
    if _env("FASTLORA_NO_EXT"):
        print("fastlora: FASTLORA_NO_EXT is set; installing without native kernels", file=sys.stderr)
        return [], {}
    try:
        with warnings.catch_warnings():
            # torch warns when numpy is not installed yet (pip installs it after this build): the build needs no numpy
            warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
            import torch
            from torch.utils import cpp_extension
    except Exception as e:
        if force:
            raise RuntimeError(f"fastlora: FASTLORA_FORCE_EXT is set but torch is not importable: {e}") from e
        # pip's isolated build: the usual case for `pip install .`, not a problem worth a banner
        print(f"fastlora: torch is not importable at build time ({e}); the native kernels are compiled on first use",
              file=sys.stderr)  # fmt: skip
        return [], {}

    cfg = _build_config()
    if not cfg.ensure_ninja_on_path():
        print("fastlora: ninja not found (pip install ninja); compiling the extension serially", file=sys.stderr)
    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and not _env("FASTLORA_NO_CUDA")
    kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    compile_args = {"cxx": cfg.cxx_flags(cuda)}
    if cuda:
        compile_args["nvcc"] = cfg.nvcc_flags()
    ext = kind(
        name="fastlora._C",
        sources=[os.path.relpath(s, HERE) for s in cfg.sources(cuda)],
        include_dirs=[str(cfg.ROOT)],
        depends=[os.path.relpath(f, HERE) for f in cfg.all_files()],
        extra_compile_args=compile_args,
        extra_link_args=cfg.link_flags(),
    )
    what = f"CPU + CUDA (sm {', '.join(cfg.cuda_archs())})" if cuda else "CPU only"
    if torch.version.cuda is not None and not cuda and not _env("FASTLORA_NO_CUDA"):
        print("fastlora: torch has CUDA but nvcc was not found (set CUDA_HOME); building the CPU kernels only")

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """BuildExtension (ninja) whose failure leaves a working pure-Python install."""

        def run(self):
            start = time.perf_counter()
            print(f"fastlora: building the native extension fastlora._C ({what})", file=sys.stderr, flush=True)
            try:
                super().run()
            except Exception as e:  # compiler missing, compile error, ...: never break the install
                if force:
                    raise
                _warn(f"building the native extension failed: {type(e).__name__}: {e}")
                self._failed = True
                return
            print(f"fastlora: built fastlora._C in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

        def get_outputs(self):
            return [] if getattr(self, "_failed", False) else super().get_outputs()

        def get_output_mapping(self):
            return {} if getattr(self, "_failed", False) else super().get_output_mapping()

    return [ext], {"build_ext": OptionalBuildExt}


class BuildPyWithSources(build_py):
    """build_py that also puts csrc/ (sources, headers, build.py) into the package as ``fastlora/_csrc``:
    an installed fastlora compiles them on first use when no ``fastlora._C`` was built. An editable
    install reads the checkout's csrc/ instead."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "fastlora" / "_csrc"
        for source in _build_config().all_files():
            dest = target / Path(source).relative_to(HERE / "csrc")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)


ext_modules, cmdclass = _native_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
