"""Loading fastlora's native extension (csrc/): never at import of fastlora, at the first call that wants it.

``fastlora._C`` holds OpenMP C++ kernels for CPU tensors (always) and CUDA kernels (when built
against a CUDA torch). :func:`load` finds one, in this order:

1. ``import fastlora._C``, the module setup.py builds when torch is importable at build time
   (``pip install --no-build-isolation -e .``, as ``make`` does, or ``python setup.py build_ext
   --inplace``). A module built from other sources than the ``csrc/`` beside it is refused as
   stale (its ops could disagree with the Python side).
2. A module compiled earlier on this machine into the cache (:func:`cache_dir`: one directory per
   torch version, Python, CPU/CUDA variant and source hash), imported without compiling.
3. Otherwise it compiles the shipped sources once into that cache with
   ``torch.utils.cpp_extension.load`` (ninja), printing one line before (with the expected time)
   and one after (with the time it took). A plain ``pip install .`` builds in an isolated
   environment without torch, so there is no ``fastlora._C``: this is how pip users get the kernels.
   The sources travel inside the package (``fastlora/_csrc``, copied by setup.py; a checkout's own
   ``csrc/`` otherwise). A failed build says why once, leaves ``FAILED.txt`` (with the compiler's
   output) in its cache directory so later processes do not retry a broken toolchain, and
   everything falls back to the Triton / PyTorch paths.

Without native kernels :func:`is_built` is False, the dispatcher keeps the Triton / PyTorch paths,
and :mod:`fastlora.native`'s functions fall back to the PyTorch reference with one logged warning.
``fastlora env`` prints :func:`status`.

Environment: ``FASTLORA_NO_EXT=1`` (never load native code), ``FASTLORA_NO_JIT=1`` (never compile:
only a built or cached module), ``FASTLORA_JIT=1`` (compile even after a failed attempt),
``FASTLORA_CACHE_DIR`` (the cache's root, default ``$XDG_CACHE_HOME/fastlora`` or ``~/.cache/fastlora``),
``FASTLORA_NO_CUDA=1`` (CPU kernels only), ``FASTLORA_CUDA_ARCHS`` (default: the visible GPUs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

from fastlora import _alloc
from fastlora.native import jit

_PACKAGE = Path(__file__).resolve().parent.parent
# The sources: shipped inside the package by setup.py (a wheel), else a source checkout's csrc/.
_SOURCE_DIRS = (_PACKAGE / "_csrc", _PACKAGE.parent / "csrc")
_CSRC = next((d for d in _SOURCE_DIRS if (d / "build.py").is_file()), _SOURCE_DIRS[-1])
_log = logging.getLogger("fastlora")
_lock = threading.Lock()
_module: ModuleType | None = None
_origin: str | None = None  # where the loaded module came from ("built" or "cache") and its path
_reason: str | None = None  # why there is no module (None while nothing was tried)
_jit_tried = False
_no_compile = threading.local()  # set by no_compile(): load() may import but not compile


@functools.cache
def _warn_once(message: str) -> None:
    _log.warning(message)


def _build_config() -> ModuleType | None:
    """csrc/build.py of the shipped or checked-out sources, or None when they are missing."""
    path = _CSRC / "build.py"
    if not (path.is_file() and (_CSRC / "quant4_format.h").is_file()):
        return None
    spec = importlib.util.spec_from_file_location("fastlora_csrc_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_NOT_BUILT = "the native extension fastlora._C is not built (see csrc/README.md)"


def _import_built() -> tuple[ModuleType | None, str | None]:
    """``fastlora._C`` if it is built and current: (module, None) or (None, reason)."""
    spec = importlib.util.find_spec("fastlora._C")
    if spec is None or spec.origin is None:
        return None, _NOT_BUILT
    cfg = _build_config()
    if cfg is not None:  # sources beside it: refuse a module compiled from other sources
        expected = "h" + cfg.source_hash()
        # The hash is a string literal in the binary; reading it before the import keeps a stale
        # module from registering its ops at all.
        if expected.encode() not in Path(spec.origin).read_bytes():
            return None, (
                f"{spec.origin} was built from other sources than {_CSRC} (stale build); rebuild it with "
                "`python setup.py build_ext --inplace` (or delete it: the sources are then compiled into the cache)"
            )
    try:
        return importlib.import_module("fastlora._C"), None
    except ImportError as e:  # e.g. built against another torch
        return None, f"fastlora._C failed to load ({e}); rebuild it with `python setup.py build_ext --inplace`"


def cache_dir() -> Path | None:
    """The build cache directory of the current sources, torch, Python and variant (None without sources)."""
    cfg = _build_config()
    return None if cfg is None else jit.cache_dir(cfg)


def _find_or_compile(allow: bool | None) -> tuple[ModuleType | None, str | None, str | None, bool]:
    """(module, origin, reason, final): the cached module, else a compile where ``allow`` (None: the
    environment) permits. ``final`` is False only for a look that compiled nothing but may later."""
    cfg = _build_config()
    if cfg is None:
        where = " or ".join(map(str, _SOURCE_DIRS))
        return None, None, f"{_NOT_BUILT.split(' (')[0]} and its csrc/ sources are not installed ({where})", True
    directory = jit.cache_dir(cfg)
    module, broken = jit.import_cached(directory)
    if module is not None:
        return module, f"cache {directory}", None, True
    if broken is not None:
        _warn_once(f"fastlora: {broken}; compiling it again")
    forced = allow is True or _env("FASTLORA_JIT")
    failed = directory / "FAILED.txt"
    if failed.is_file() and not forced:
        reason = f"an earlier compile of the native kernels failed (see {failed}); FASTLORA_JIT=1 retries"
    else:
        reason = f"{_NOT_BUILT.split(' (')[0]}: its sources are compiled on first use into {directory}"
        if _env("FASTLORA_NO_JIT") and not forced:
            reason += ", but FASTLORA_NO_JIT is set"
        elif allow is False or getattr(_no_compile, "on", False):
            reason += " (not yet)"
        else:
            reason = None
    if reason is not None:
        return None, None, reason, allow is not False and not getattr(_no_compile, "on", False)
    module, reason = jit.compile_into_cache(cfg)
    return module, (f"cache {directory}" if module is not None else None), reason, True


def load(jit: bool | None = None) -> ModuleType | None:
    """The native extension module, or None (then :func:`unavailable_reason` says why, and one warning has).

    Args:
        jit: True: compile the sources now when no built or cached module loads (even after a failed
            attempt); False: never compile; None: compile unless ``FASTLORA_NO_JIT=1`` or an earlier
            compile of these sources failed (``FASTLORA_JIT=1`` retries).
    """
    global _module, _origin, _reason, _jit_tried
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _env("FASTLORA_NO_EXT"):
            return None
        if _reason is None:
            _module, _reason = _import_built()
            if _module is not None:
                _origin = f"built {_module.__file__}"
            elif _reason != _NOT_BUILT:
                _warn_once(f"fastlora: {_reason}")  # a broken or stale build is worth a warning at once
        if _module is None and (not _jit_tried or jit is True):
            _module, _origin, reason, _jit_tried = _find_or_compile(jit)
            if _module is None:
                _reason = reason
                if _jit_tried:  # never silent: the CPU 4-bit ops now run the PyTorch reference
                    _warn_once(f"fastlora: no native kernels ({reason}); the PyTorch reference runs instead")
        if _module is not None:
            _reason = None
            _register_fakes()
        return _module


@contextlib.contextmanager
def no_compile():
    """Within this block :func:`load` imports a built or cached module but never starts a compile
    (``fastlora env`` reports the state without a minute's wait)."""
    previous = getattr(_no_compile, "on", False)
    _no_compile.on = True
    try:
        yield
    finally:
        _no_compile.on = previous


@dataclasses.dataclass(frozen=True)
class Status:
    """What :func:`status` found: ``state`` is "loaded", "disabled" or "not loaded"; ``origin`` says from
    where ("built PATH" or "cache DIR"); ``reason`` why not; ``sources``/``cache`` the directories used."""

    state: str
    origin: str | None
    reason: str | None
    sources: str | None
    cache: str | None
    has_cuda: bool


def status() -> Status:
    """The native extension's state, without compiling anything (a built or cached module is loaded)."""
    with no_compile():
        module = load()
        reason = unavailable_reason()
    cfg = _build_config()
    directory = jit.cache_dir(cfg) if cfg is not None else None
    sources = str(cfg.ROOT) if cfg is not None else None
    cache = str(directory) if directory is not None else str(jit.cache_root() / "native")
    if module is not None:
        return Status("loaded", _origin, None, sources, cache, bool(module.has_cuda()))
    if _env("FASTLORA_NO_EXT"):
        return Status("disabled", None, "FASTLORA_NO_EXT is set", sources, cache, False)
    return Status("not loaded", None, reason, sources, cache, False)


def is_built() -> bool:
    """True when the native kernels are loaded (a built or cached module, else compiled now unless opted out)."""
    return load() is not None


def has_cuda() -> bool:
    """True when the native CUDA kernels are compiled in (a CUDA torch and nvcc at build time)."""
    module = load()
    return module is not None and bool(module.has_cuda())


def unavailable_reason(device: torch.device | str = "cpu") -> str | None:
    """Why no native kernel runs on ``device`` (None when one does)."""
    module = load()
    if module is None:
        if _env("FASTLORA_NO_EXT"):
            return "FASTLORA_NO_EXT is set"
        return _reason or "the native extension is not loaded"
    if torch.device(device).type == "cuda" and not module.has_cuda():
        return "fastlora._C was built without its CUDA kernels (torch without CUDA, or no nvcc at build time)"
    if torch.device(device).type not in ("cpu", "cuda"):
        return f"no native kernels for {torch.device(device).type} tensors"
    return None


def ops(device: torch.device, what: str):
    """torch.ops.fastlora after syncing test poisoning, or None (with one warning) without native code."""
    reason = unavailable_reason(device)
    if reason is not None:
        _warn_once(f"fastlora: {reason}; native {what} falls back to the PyTorch reference")
        return None
    _module._set_poison(_alloc._poison)
    return torch.ops.fastlora


# -- fake (meta) implementations: output shapes for torch.compile / FakeTensor ---------------------

_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("fastlora::quantize_4bit_native")
    def _(w, midpoints, order, blocksize):
        n = w.numel()
        return w.new_empty(((n + 1) // 2,), dtype=torch.uint8), w.new_empty((-(-n // blocksize),), dtype=torch.float32)

    @torch.library.register_fake("fastlora::quantize_blockwise_native")
    def _(x, lut, blocksize):
        n = x.numel()
        return x.new_empty((n,), dtype=torch.uint8), x.new_empty((-(-n // blocksize),), dtype=torch.float32)

    @torch.library.register_fake("fastlora::dequantize_4bit_native")
    def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel, out_dtype):
        return packed.new_empty((numel,), dtype=out_dtype)

    @torch.library.register_fake("fastlora::gemv_4bit_native")
    def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias, lora_a,
          lora_b, lora_u, scale):  # fmt: skip
        return x.new_empty((x.shape[0], out_features))

    if hasattr(torch.ops.fastlora, "gemv_4bit_multi_native"):  # absent from a module built before it

        @torch.library.register_fake("fastlora::gemv_4bit_multi_native")
        def _(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, out_features, bias, lora_u,
              pool_b, scales, adapter_idx):  # fmt: skip
            return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("fastlora::merge_4bit_native")
    def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, lora_a, lora_b, scale,
          out_dtype):  # fmt: skip
        return packed.new_empty((lora_b.shape[0], lora_a.shape[1]), dtype=out_dtype)
