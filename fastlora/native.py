"""fastlora's native kernels (csrc/): loading the extension, and the public entry points.

``fastlora._C`` holds OpenMP C++ kernels for CPU tensors (always) and CUDA kernels (when built
against a CUDA torch): blockwise 4-bit quantise / dequantise, bit-identical to
:mod:`fastlora.quant`'s PyTorch path; a 4-bit GEMV for small M with a fused LoRA term; and the
LoRA merge ``dequant(W) + s·B A``. They are ``torch.library`` ops (``torch.ops.fastlora.*_native``)
with fake implementations, so ``torch.compile`` treats them as opaque ops with known shapes.

Loading (:func:`load`), never at import of fastlora and never compiling unless asked:

1. ``import fastlora._C``, the module setup.py builds (``pip install --no-build-isolation -e .``
   or ``python setup.py build_ext --inplace``). In a source checkout a module built from other
   sources than the current ``csrc/`` is refused as stale (its ops could disagree with this file).
2. With ``load(jit=True)`` or ``FASTLORA_JIT=1``: compile ``csrc/`` with
   ``torch.utils.cpp_extension.load`` into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
   default ``~/.cache/torch_extensions``) once, and reuse it afterwards.
3. Otherwise no native kernels: :func:`is_built` is False, :mod:`fastlora._backend` keeps the
   Triton / PyTorch paths, and the functions below fall back to the PyTorch reference with one
   logged warning.

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
from fastlora.quant.codes import get_bounds
from fastlora.quant.state import QuantState

__all__ = [
    "MAX_CUDA_M",
    "dequantize_4bit",
    "dequantize_4bit_cpu",
    "gemv_4bit",
    "gemv_4bit_ref",
    "has_cuda",
    "is_built",
    "load",
    "merge_4bit",
    "merge_4bit_ref",
    "quantize_4bit_cpu",
    "unavailable_reason",
]

MAX_CUDA_M = 16  # rows of x the CUDA decode GEMV takes (one register accumulator per row)
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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


def _ops(device: torch.device, what: str):
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


# -- raw kernels (used by fastlora.quant.api when the "cuda" backend is chosen) ----------------------


def _state_args(state: QuantState) -> tuple:
    nested = state.nested
    if nested is None:
        return state.absmax, state.code, None, None, 0.0, state.blocksize
    return state.absmax, state.code, nested.absmax, nested.code, float(nested.offset), state.blocksize


def quantize_4bit_blocks(w: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Native twin of :func:`~fastlora.quant.ref.quantize_4bit_ref` (bit-identical; CPU).

    Args:
        w: fp32/fp16/bf16 CPU tensor, any shape, n finite values.

    Returns:
        packed: (ceil(n / 2),) uint8; absmax: (ceil(n / blocksize),) fp32.
    """
    ops = _ops(w.device, "quantisation")
    if ops is None:
        from fastlora.quant.ref import quantize_4bit_ref

        return quantize_4bit_ref(w, quant_type, blocksize)
    midpoints, order = get_bounds(quant_type, w.device)
    return ops.quantize_4bit_native(w, midpoints, order, blocksize)


def quantize_blockwise_blocks(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Native twin of :func:`~fastlora.quant.ref.quantize_blockwise_ref` (bit-identical; CPU).

    Args:
        x: (n,) fp32 CPU tensor; code: (256,) fp32 sorted code.

    Returns:
        q: (n,) uint8; absmax: (ceil(n / blocksize),) fp32.
    """
    from fastlora.quant.ref import _blockwise_lut, quantize_blockwise_ref

    ops = _ops(x.device, "quantisation")
    if ops is None:
        return quantize_blockwise_ref(x, code, blocksize)
    lut = _blockwise_lut(tuple(code.tolist()))
    return ops.quantize_blockwise_native(x.reshape(-1).float(), lut.to(x.device), blocksize)


def dequantize_blocks(packed: torch.Tensor, state: QuantState, out_dtype: torch.dtype) -> torch.Tensor:
    """Native twin of :func:`~fastlora.quant.ref.dequantize_4bit_ref`, de-nesting in the kernel.

    Args:
        packed: ``state.packed_numel`` bytes of packed data (any storage dtype), CPU or CUDA.
        state: its validated :class:`QuantState`, same device.
        out_dtype: fp32, fp16 or bf16.

    Returns:
        Tensor of ``state.shape`` and ``out_dtype`` (bit-identical to the reference).
    """
    ops = _ops(packed.device, "dequantisation")
    if ops is None:
        from fastlora.quant.api import dequantize_4bit as dequantize_torch

        return dequantize_torch(packed, state, out_dtype, backend="torch")
    flat = packed.reshape(-1) if packed.is_contiguous() else packed.contiguous().reshape(-1)
    out = ops.dequantize_4bit_native(flat, *_state_args(state), state.numel, out_dtype)
    return out.view(state.shape)


# -- public API ------------------------------------------------------------------------------------


def quantize_4bit_cpu(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    *,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """:func:`fastlora.quantize_4bit` through the native CPU kernels (OpenMP), bit-identical to it.

    Args:
        w: fp32/fp16/bf16 CPU tensor of any shape (n elements).
        quant_type, blocksize, double_quant, quant_storage: as :func:`fastlora.quantize_4bit`.

    Returns:
        packed: (ceil(n / 2) / itemsize(quant_storage), 1) of ``quant_storage``; state: its :class:`QuantState`.
    """
    if isinstance(w, torch.Tensor) and w.device.type != "cpu":
        raise ValueError(f"fastlora quantize_4bit_cpu: w must be a CPU tensor, got one on {w.device}")
    from fastlora.quant.api import quantize_4bit

    return quantize_4bit(w, quant_type, blocksize, double_quant, quant_storage=quant_storage, backend="cuda")


def dequantize_4bit_cpu(
    packed: torch.Tensor, quant_state: QuantState, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """:func:`fastlora.dequantize_4bit` through the native CPU kernels, bit-identical to it.

    Args:
        packed: packed 4-bit CPU data (any storage dtype); quant_state: its :class:`QuantState`.
        out_dtype: fp32, fp16 or bf16; default ``quant_state.dtype``.

    Returns:
        Tensor of ``quant_state.shape`` and ``out_dtype``.
    """
    if isinstance(packed, torch.Tensor) and packed.device.type != "cpu":
        raise ValueError(f"fastlora dequantize_4bit_cpu: packed must be a CPU tensor, got one on {packed.device}")
    return dequantize_4bit(packed, quant_state, out_dtype)


def dequantize_4bit(
    packed: torch.Tensor, quant_state: QuantState, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """:func:`fastlora.dequantize_4bit` through the native kernel of the tensor's device (CPU or CUDA)."""
    from fastlora.quant.api import dequantize_4bit as dequantize

    return dequantize(packed, quant_state, out_dtype, backend="cuda")


def _check_quant_state(where: str, packed: torch.Tensor, quant_state: QuantState) -> tuple[int, int]:
    if not isinstance(quant_state, QuantState):
        got = type(quant_state).__name__
        raise TypeError(f"fastlora {where}: quant_state must be a fastlora QuantState, got {got}")
    if len(quant_state.shape) != 2:
        got = tuple(quant_state.shape)
        raise ValueError(f"fastlora {where}: the 4-bit weight must be 2-D (N, K), got shape {got}")
    quant_state.validate(packed, where=f"fastlora {where}")
    n, k = quant_state.shape
    return n, k


def gemv_4bit(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    quant_state: QuantState,
    bias: torch.Tensor | None = None,
    *,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_u: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``y = x Wᵀ + bias (+ scale · (x Aᵀ) Bᵀ)`` with W a 4-bit (N, K) weight, in one native kernel.

    The decode-time GEMV: W is read once and dequantised in registers, the products accumulate
    in fp32 and y is rounded once. On CUDA at most :data:`MAX_CUDA_M` rows; on CPU any M (the
    OpenMP kernel reuses each dequantised row of W for every row of x).

    Args:
        x: (..., K) fp32/fp16/bf16; M = prod of the leading dims.
        packed_weight: the packed data of W, described by ``quant_state`` (shape (N, K)).
        quant_state: :class:`QuantState` of W, on x's device.
        bias: (N,) in x's dtype, or None.
        lora_a: (r, K) and lora_b: (N, r), in x's dtype: adds ``scale · (x Aᵀ) Bᵀ``.
        lora_u: (..., r) in x's dtype, an already computed ``u = x Aᵀ`` (e.g. with dropout) used
            with ``lora_b`` instead of ``lora_a``.
        scale: the LoRA scaling.

    Returns:
        (..., N) in x's dtype. Without the native extension: the same through
        :func:`gemv_4bit_ref` in fp32, after one warning.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"fastlora gemv_4bit: x must be a float32/float16/bfloat16 tensor, got {got}")
    n, k = _check_quant_state("gemv_4bit", packed_weight, quant_state)
    if x.dim() == 0 or x.shape[-1] != k:
        got = tuple(x.shape)
        raise ValueError(f"fastlora gemv_4bit: x must be (..., {k}) for a weight of shape ({n}, {k}), got {got}")
    if x.device != packed_weight.device:
        raise ValueError(f"fastlora gemv_4bit: x is on {x.device}, the weight on {packed_weight.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x.is_cuda and x2.shape[0] > MAX_CUDA_M:
        raise ValueError(
            f"fastlora gemv_4bit: the CUDA decode kernel takes at most {MAX_CUDA_M} rows of x, got {x2.shape[0]} "
            "(use fastlora.lora_linear for larger batches)"
        )
    u2 = lora_u.reshape(-1, lora_u.shape[-1]) if lora_u is not None else None
    ops = _ops(x.device, "GEMV")
    if ops is None:
        y = gemv_4bit_ref(x2, packed_weight, quant_state, bias, lora_a=lora_a, lora_b=lora_b, lora_u=u2, scale=scale)
    else:
        y = ops.gemv_4bit_native(
            x2, packed_weight.reshape(-1), *_state_args(quant_state), n, _contiguous(bias), _contiguous(lora_a),
            _contiguous(lora_b), _contiguous(u2), float(scale),
        )  # fmt: skip
    return y.view(*lead, n)


def merge_4bit(
    packed_weight: torch.Tensor,
    quant_state: QuantState,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dequant(W) + scale · B A``: a 4-bit (N, K) weight with its LoRA update merged, in float.

    Computed in fp32 and rounded once. Re-quantise the result with :func:`fastlora.quantize_4bit`
    for a 4-bit merged weight.

    Args:
        packed_weight, quant_state: the 4-bit weight W of shape (N, K).
        lora_a: (r, K) and lora_b: (N, r), fp32/fp16/bf16 (one dtype), on W's device.
        out_dtype: fp32, fp16 or bf16; default ``quant_state.dtype``.

    Returns:
        (N, K) tensor of ``out_dtype``.
    """
    n, k = _check_quant_state("merge_4bit", packed_weight, quant_state)
    out_dtype = out_dtype or quant_state.dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fastlora merge_4bit: out_dtype must be float32/float16/bfloat16, got {out_dtype}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"fastlora merge_4bit: {name} must be a 2-D tensor, got {getattr(t, 'shape', t)!r}")
    if lora_a.shape[1] != k or lora_b.shape[0] != n or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"fastlora merge_4bit: need lora_a (r, {k}) and lora_b ({n}, r) for a ({n}, {k}) weight, "
            f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    ops = _ops(packed_weight.device, "merge")
    if ops is None:
        return merge_4bit_ref(packed_weight, quant_state, lora_a, lora_b, scale, out_dtype)
    return ops.merge_4bit_native(
        packed_weight.reshape(-1), *_state_args(quant_state), _contiguous(lora_a), _contiguous(lora_b), float(scale),
        out_dtype,
    )  # fmt: skip


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


# -- PyTorch references (the spec of the native GEMV and merge) --------------------------------------


def gemv_4bit_ref(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    quant_state: QuantState,
    bias: torch.Tensor | None = None,
    *,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_u: torch.Tensor | None = None,
    scale: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of :func:`gemv_4bit` for x of shape (M, K): every operand in ``compute_dtype``
    (fp32 like the kernels, or float64 for tests), the result cast to x's dtype."""
    from fastlora.quant.api import dequantize_4bit as dequantize

    w = dequantize(packed_weight, quant_state, torch.float32, backend="torch").to(compute_dtype)
    xc = x.to(compute_dtype)
    y = xc @ w.T
    if bias is not None:
        y = y + bias.to(compute_dtype)
    if lora_b is not None:
        u = lora_u.to(compute_dtype) if lora_u is not None else xc @ lora_a.to(compute_dtype).T
        y = y + (scale * u) @ lora_b.to(compute_dtype).T
    return y.to(x.dtype)


def merge_4bit_ref(
    packed_weight: torch.Tensor,
    quant_state: QuantState,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of :func:`merge_4bit`: ``dequant(W) + scale · B A`` in ``compute_dtype``, cast to ``out_dtype``."""
    from fastlora.quant.api import dequantize_4bit as dequantize

    w = dequantize(packed_weight, quant_state, torch.float32, backend="torch").to(compute_dtype)
    return (w + scale * (lora_b.to(compute_dtype) @ lora_a.to(compute_dtype))).to(out_dtype)
