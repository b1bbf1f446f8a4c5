"""The decode suite: the memory-bound paths of inference with a 4-bit base (M <= 16 tokens) and dequantisation.

Pass "fwd" (under ``torch.inference_mode``), same weights as the layer suite (NF4, blocksize 64, double
quantisation, r = 16, s = 2):

    torch          F.linear(x, W) + s·(x Aᵀ) Bᵀ on the dense bf16/fp16 W: 4x the bytes of a 4-bit W
    fastlora-nf4   FastLoRALinear
    native-nf4     fastlora.native.gemv_4bit(x, W4, state, lora_a=A, lora_b=B, scale=s): the native decode
                   kernel with the LoRA term fused (only where the extension is built for the device)
    peft+bnb-nf4   peft's LoRA over bnb.nn.Linear4bit (bitsandbytes' 4-bit GEMV at M = 1 on a GPU)
    bnb-nf4        bnb.nn.Linear4bit alone, no LoRA term: bitsandbytes' own 4-bit GEMV, the speed to beat
    dequant-nf4    fastlora.dequantize_4bit(W4) then the torch expression

    FLOPs = 2MKN + 2Mr(K+N) (2MKN without LoRA); bytes = x + W (packed + statistics) + A + B + y.
    The GB/s column against the measured copy bandwidth is the figure of merit here.

Suite "dequant" (run with the decode suite): NF4 (K, N) -> dense, fastlora (Triton on a GPU, torch on a
CPU; "fastlora-native" with ``backend="native"`` where the native extension is built) vs
``bitsandbytes.functional.dequantize_4bit`` vs a device copy of the dense weight. Bytes = packed +
statistics + the dense output (copy: 2x the output).
Every output must equal fastlora's torch reference bit for bit.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fastlora.bench import guard
from fastlora.bench.cases import LayerCase
from fastlora.bench.harness import Guarded, Skip, time_guarded
from fastlora.bench.layer import Impl, Weights, bnb_linear4bit, make_weights
from fastlora.bench.layer import build as build_layer
from fastlora.bench.records import Record
from fastlora.bench.timing import DEFAULT_TIMER, DTYPES, TimerConfig

IMPLS = ("torch", "fastlora-nf4", "native-nf4", "peft+bnb-nf4", "bnb-nf4", "dequant-nf4")
DEQUANT_IMPLS = ("fastlora", "fastlora-native", "bitsandbytes", "copy")
REFERENCES = ("torch", "peft+bnb-nf4", "bnb-nf4")
DEQUANT_REFERENCES = ("bitsandbytes", "copy")


def native_module(device: torch.device | str):
    """``fastlora.native`` when its kernels run on ``device``; raises :class:`Skip` saying why otherwise
    (never its fallback to the PyTorch reference, which would be timed under the native kernel's name)."""
    try:
        import fastlora.native as native
    except ImportError as e:
        raise Skip(f"fastlora.native is not available ({e})") from e
    if not native.is_built():
        raise Skip("fastlora.native is not built on this machine (see csrc/README.md)")
    reason = native.unavailable_reason(device) if hasattr(native, "unavailable_reason") else None
    if reason:
        raise Skip(f"fastlora.native: {reason}")
    return native


def build(name: str, wt: Weights, dtype: torch.dtype) -> Impl:
    """Build decode implementation ``name`` (one of :data:`IMPLS`); raises :class:`Skip`."""
    packed, state = wt.quant["nf4"]
    s = wt.scale
    if name == "native-nf4":
        native = native_module(packed.device)
        if "lora_a" in inspect.signature(native.gemv_4bit).parameters:  # the LoRA term fused in the kernel
            return Impl(name, lambda x: native.gemv_4bit(x, packed, state, lora_a=wt.a, lora_b=wt.b, scale=s),
                        {}, "nf4")  # fmt: skip
        return Impl(name, lambda x: native.gemv_4bit(x, packed, state) + s * F.linear(F.linear(x, wt.a), wt.b),
                    {}, "nf4")  # fmt: skip
    if name == "bnb-nf4":
        return Impl(name, bnb_linear4bit(packed, state, dtype), {}, "nf4-base")
    return build_layer(name, wt, dtype)


def decode_flops(m: int, k: int, n: int, r: int, lora: bool) -> int:
    return 2 * m * k * n + (2 * m * r * (k + n) if lora else 0)


def decode_bytes(m: int, k: int, n: int, r: int, itemsize: int, weight_bytes: int, lora: bool) -> int:
    return (m * k + m * n + ((k + n) * r if lora else 0)) * itemsize + weight_bytes


def _reference(wt: Weights, kind: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    rd = guard.reference_dtype(x.dtype)
    with guard.no_tf32():
        xr = x.to(rd)
        y = xr @ wt.dense(kind.removesuffix("-base"), rd).T
        if not kind.endswith("-base"):
            y = y + wt.scale * (xr @ wt.a.to(rd).T) @ wt.b.to(rd).T
    return {"y": y}


def guarded(case: LayerCase, name: str, *, cuda: bool, cache: dict | None = None) -> Guarded:
    """Build decode implementation ``name`` for ``case``, check y, return the timed inference call ("fwd").

    ``cache`` is shared by the implementations of one case (it may come with "weights" in it).

    Raises:
        Skip: it cannot run here.  WrongResult: its output is wrong.
    """
    device, dtype = ("cuda" if cuda else "cpu"), DTYPES[case.dtype]
    cache = {} if cache is None else cache
    if "weights" not in cache:
        cache["weights"] = make_weights(case.k, case.n, case.r, dtype, device)
    wt = cache["weights"]
    impl = build(name, wt, dtype)
    if "x" not in cache:
        gen = torch.Generator(device).manual_seed(case.m)
        cache["x"] = torch.randn(case.m, case.k, device=device, generator=gen).to(dtype)
    x = cache["x"]
    for kind in ("dense", impl.kind):
        if kind not in cache:
            cache[kind] = _reference(wt, kind, x)
    if "baseline" not in cache:
        with torch.inference_mode():
            cache["baseline"] = guard.baseline({"y": build_layer("torch", wt, dtype).forward(x)}, cache["dense"])
    with torch.inference_mode():
        errors = guard.check(name, {"y": impl.forward(x)}, cache[impl.kind], dtype, cache["baseline"])

    def fn() -> torch.Tensor:
        with torch.inference_mode():
            return impl.forward(x)

    lora, kind = impl.kind != "nf4-base", impl.kind.removesuffix("-base")
    flops = decode_flops(case.m, case.k, case.n, case.r, lora)
    nbytes = decode_bytes(case.m, case.k, case.n, case.r, dtype.itemsize, wt.weight_bytes(kind), lora)
    return Guarded({"fwd": fn}, [], {"fwd": (flops, nbytes)}, errors)


def guarded_dequant(k: int, n: int, dtype: str, name: str, *, cuda: bool, cache: dict | None = None) -> Guarded:
    """NF4 (double-quantised) (N, K) -> dense ``dtype`` by implementation ``name``, checked bit for bit
    against fastlora's torch reference; the timed call is under "dequant" (FLOPs: 0)."""
    from fastlora.quant import dequantize_4bit, quantize_4bit

    device = "cuda" if cuda else "cpu"
    cache = {} if cache is None else cache
    if "packed" not in cache:
        w = torch.randn(n, k, device=device, generator=torch.Generator(device).manual_seed(0)) / math.sqrt(k)
        cache["packed"], cache["state"] = quantize_4bit(w.to(DTYPES[dtype]), "nf4", 64, double_quant=True)
        cache["expected"] = dequantize_4bit(cache["packed"], cache["state"], DTYPES[dtype], backend="torch")
    packed, state, expected = cache["packed"], cache["state"], cache["expected"]
    out_bytes = expected.numel() * expected.element_size()
    moved = packed.numel() * packed.element_size() + state.nbytes() + out_bytes
    fn, nbytes = _dequant_impl(name, packed, state, expected, moved, out_bytes)
    got = fn()
    if got.shape != expected.shape or got.dtype != expected.dtype or not torch.equal(got, expected):
        raise guard.WrongResult(f"{name}: the dequantised weight differs from fastlora's torch reference")
    return Guarded({"dequant": fn}, [], {"dequant": (0, nbytes)}, {"w": (0.0, 0.0)})


def run(
    cases: Sequence[LayerCase],
    *,
    cuda: bool,
    timer: TimerConfig = DEFAULT_TIMER,
    impls: Sequence[str] = IMPLS,
    dequant_impls: Sequence[str] = DEQUANT_IMPLS,
    on_record: Callable[[Record], None] = lambda r: None,
) -> list[Record]:
    """Run the decode suite, then one dequantisation case per distinct shape and dtype with ``dequant_impls``."""
    device = "cuda" if cuda else "cpu"
    records: list[Record] = []

    def emit(recs: list[Record]) -> None:
        for rec in recs:
            records.append(rec)
            on_record(rec)

    weights: dict[tuple[int, int, int, str], Weights] = {}
    for case in cases:
        key = (case.k, case.n, case.r, case.dtype)
        if key not in weights:
            weights.clear()  # one group's weights alive at a time
            weights[key] = make_weights(case.k, case.n, case.r, DTYPES[case.dtype], device)
        cache: dict = {"weights": weights[key]}
        for name in impls:
            base = dict(suite="decode", case=case.id, impl=name, shape=case.shape, m=case.m, r=case.r, dtype=case.dtype)
            make = functools.partial(guarded, case, name, cuda=cuda, cache=cache)
            emit(time_guarded(base, ("fwd",), make, cuda=cuda, timer=timer))
        del cache
    weights.clear()
    for k, n, dt in dict.fromkeys((c.k, c.n, c.dtype) for c in cases) if dequant_impls else ():
        cache = {}
        for name in dequant_impls:
            base = dict(suite="dequant", case=f"{k}x{n}-{dt}", impl=name, shape=f"{k}x{n}", dtype=dt)
            make = functools.partial(guarded_dequant, k, n, dt, name, cuda=cuda, cache=cache)
            emit(time_guarded(base, ("dequant",), make, cuda=cuda, timer=timer))
        del cache
        if cuda:
            torch.cuda.empty_cache()
    return records


def _dequant_impl(name, packed, state, expected, moved, out_bytes) -> tuple[Callable[[], torch.Tensor], int]:
    from fastlora.quant import dequantize_4bit

    dtype = expected.dtype
    if name == "fastlora":
        return (lambda: dequantize_4bit(packed, state, dtype)), moved
    if name == "fastlora-native":
        native_module(packed.device)
        return (lambda: dequantize_4bit(packed, state, dtype, backend="native")), moved
    if name == "bitsandbytes":
        try:
            import bitsandbytes.functional as bnb_f
        except Exception as e:
            raise Skip(f"bitsandbytes is unavailable ({type(e).__name__}: {e})") from e
        bnb_state = state.to_bnb()
        return (lambda: bnb_f.dequantize_4bit(packed, bnb_state)), moved
    if name == "copy":
        dst = torch.empty_like(expected)
        return (lambda: dst.copy_(expected)), 2 * out_bytes
    raise ValueError(f"fastlora bench: unknown dequant implementation {name!r}; expected one of {DEQUANT_IMPLS}")
