"""Loading fastlora's native extension (csrc/), never at import of fastlora and never compiling unless asked.

``fastlora._C`` holds OpenMP C++ kernels for CPU tensors (always) and CUDA kernels (when built
against a CUDA torch). Loading (:func:`load`):

1. ``import fastlora._C``, the module setup.py builds (``pip install --no-build-isolation -e .``
   or ``python setup.py build_ext --inplace``). In a source checkout a module built from other
   sources than the current ``csrc/`` is refused as stale (its ops could disagree with this file).
2. With ``load(jit=True)`` or ``FASTLORA_JIT=1``: compile ``csrc/`` with
   ``torch.utils.cpp_extension.load`` into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
   default ``~/.cache/torch_extensions``) once, and reuse it afterwards.
3. Otherwise no native kernels: :func:`is_built` is False, the dispatcher keeps the Triton /
   PyTorch paths, and :mod:`fastlora.native`'s functions fall back to the PyTorch reference with
   one logged warning.

Environment: ``FASTLORA_JIT=1`` (allow the JIT build), ``FASTLORA_NO_EXT=1`` (never load native code).
"""

from __future__ import annotations

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

_CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
_log = logging.getLogger("fastlora")
_lock = threading.Lock()
_module: ModuleType | None = None
_reason: str | None = None  # why there is no module (None while nothing was tried)
_jit_tried = False


@functools.cache
def _warn_once(message: str) -> None:
    _log.warning(message)


def _build_config() -> ModuleType | None:
    """csrc/build.py of this source checkout, or None in an install without csrc/."""
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
    if cfg is not None:  # a source checkout: refuse a module compiled from other sources
        expected = "h" + cfg.source_hash()
        # The hash is a string literal in the binary; reading it before the import keeps a stale
        # module from registering its ops at all.
        if expected.encode() not in Path(spec.origin).read_bytes():
            return None, (
                f"{spec.origin} was built from other sources than {_CSRC} (stale build); rebuild it with "
                "`python setup.py build_ext --inplace`, or set FASTLORA_JIT=1"
            )
    try:
        return importlib.import_module("fastlora._C"), None
    except ImportError as e:  # e.g. built against another torch
        return None, f"fastlora._C failed to load ({e}); rebuild it with `python setup.py build_ext --inplace`"


def _jit_build() -> tuple[ModuleType | None, str | None]:
    cfg = _build_config()
    if cfg is None:
        return None, f"the JIT build needs the csrc/ sources, not found at {_CSRC}"
    from torch.utils import cpp_extension

    if not cfg.ensure_ninja_on_path():
        return None, "the JIT build needs ninja (pip install ninja)"
    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and not _env("FASTLORA_NO_CUDA")
    _log.warning("fastlora: compiling the native kernels (csrc/, %s) with torch.utils.cpp_extension.load; "
                 "this happens once", "CPU + CUDA" if cuda else "CPU")  # fmt: skip
    try:
        module = cpp_extension.load(
            name="fastlora_native",
            sources=cfg.sources(cuda),
            extra_cflags=cfg.cxx_flags(cuda),
            extra_cuda_cflags=cfg.nvcc_flags() if cuda else None,
            extra_ldflags=cfg.link_flags(),
            extra_include_paths=[str(cfg.ROOT)],
            with_cuda=cuda,
        )
    except Exception as e:  # compiler missing, compile error
        return None, f"the JIT build of csrc/ failed: {type(e).__name__}: {str(e)[-2000:]}"
    return module, None


def load(jit: bool | None = None) -> ModuleType | None:
    """The native extension module, or None (then :func:`unavailable_reason` says why).

    Args:
        jit: compile ``csrc/`` with ``torch.utils.cpp_extension.load`` when no built module can be
            imported; None: only when the environment sets ``FASTLORA_JIT=1``.
    """
    global _module, _reason, _jit_tried
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _env("FASTLORA_NO_EXT"):
            return None
        if _reason is None:
            _module, _reason = _import_built()
            if _module is None and _reason != _NOT_BUILT:
                _warn_once(f"fastlora: {_reason}")  # a broken or stale build is worth a warning at once
        if _module is None and (jit if jit is not None else _env("FASTLORA_JIT")) and not _jit_tried:
            _jit_tried = True
            _module, jit_reason = _jit_build()
            if _module is None:
                _reason = jit_reason
                _warn_once(f"fastlora: {jit_reason}")
        if _module is not None:
            _reason = None
            _register_fakes()
        return _module


def is_built() -> bool:
    """True when the native kernels are loaded (importing a built module; never compiles unless
    ``FASTLORA_JIT=1``)."""
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

    @torch.library.register_fake("fastlora::merge_4bit_native")
    def _(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, lora_a, lora_b, scale,
          out_dtype):  # fmt: skip
        return packed.new_empty((lora_b.shape[0], lora_a.shape[1]), dtype=out_dtype)
