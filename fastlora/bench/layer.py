"""The layer suite: one LoRA / QLoRA linear layer, forward, backward and both, against the alternatives.

All implementations share the weights: W (N, K), A (r, K), B (N, r), s = alpha / r = 2 (so the LoRA term
is as large as the base term and a wrong one shows), no bias. x requires grad (a training pass: frozen
base, x and the LoRA factors receive gradients); the backward uses one fixed random upstream gradient g.

    torch            F.linear(x, W) + s·F.linear(F.linear(x, A), B) in the run dtype: cuBLAS, the limit
    peft             peft's LoRA over an nn.Linear
    fastlora         FastLoRALinear, dense base
    fastlora-nf4/fp4 FastLoRALinear, 4-bit base (blocksize 64, double quantisation: the QLoRA recipe)
    peft+bnb-nf4     peft's LoRA over bnb.nn.Linear4bit, the same NF4 bytes (bitsandbytes' own 4-bit path)
    dequant-nf4      fastlora.dequantize_4bit(W) every call, then the torch expression above
    unsloth-nf4      unsloth's fast path, written here (bench/unsloth_style.py): W dequantised into a shared
                     scratch, cuBLAS, the low-rank term by an in-place addmm_ (fwd and dx); no dropout
    fastlora-nf4@P   fastlora-nf4 with FASTLORA_PATH=P ("fused" or "dequant_gemm") in forward and backward
    peft-dora        peft's DoRA (LoraConfig(use_dora=True)) over an nn.Linear
    peft+bnb-dora-nf4  peft's DoRA over bnb.nn.Linear4bit (the same NF4 bytes)
    fastlora-dora, fastlora-dora-nf4  FastLoRALinear(use_dora=True), dense and NF4 base

DoRA rows: y = m ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) / ‖W + s B A‖_row, the norm a constant in backward (peft's detach), with
m = ‖W + s B A‖ ⊙ (0.5 .. 1.5 per row, fixed) so the scaling shows; the guard also compares dm. Their FLOP and
byte counts are LoRA's (the norm's extra pass and the scaling are not counted as useful work).

Counted work (dequantisation and elementwise work are free; a 4-bit W counts its packed bytes + statistics):

    FLOPs  fwd = 2MKN + 2Mr(K+N)            bwd = 2MKN + 4Mr(K+N)   (dx through the frozen W; dA, dB, v A)
    bytes  fwd = x + W + A + B + y + u      bwd = g + x + u + W + A + B + dx + dA + dB
           (u = x Aᵀ, M×r; each tensor read or written once: the compulsory traffic)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastlora.bench import guard
from fastlora.bench.cases import LayerCase
from fastlora.bench.harness import Guarded, Skip, time_guarded
from fastlora.bench.records import Record
from fastlora.bench.timing import DEFAULT_TIMER, DTYPES, TimerConfig
from fastlora.bench.unsloth_style import path_scope, unsloth_style_lora

PATHS = ("fused", "dequant_gemm")  # fastlora's LoRA paths (fastlora.ops.planner), forced by FASTLORA_PATH
IMPLS = (
    "torch",
    "peft",
    "fastlora",
    "fastlora-nf4",
    "fastlora-fp4",
    "peft+bnb-nf4",
    "dequant-nf4",
    "unsloth-nf4",
    *(f"fastlora-nf4@{p}" for p in PATHS),
    "peft-dora",
    "peft+bnb-dora-nf4",
    "fastlora-dora",
    "fastlora-dora-nf4",
)
REFERENCES = ("torch", "peft", "peft+bnb-nf4", "dequant-nf4", "unsloth-nf4", "peft-dora")


def lora_flops(m: int, k: int, n: int, r: int, pass_: str) -> int:
    """FLOPs of one pass of a LoRA linear with a frozen base (see the module docstring)."""
    fwd = 2 * m * k * n + 2 * m * r * (k + n)
    bwd = 2 * m * k * n + 4 * m * r * (k + n)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def lora_bytes(m: int, k: int, n: int, r: int, itemsize: int, weight_bytes: int, pass_: str) -> int:
    """Compulsory bytes of one pass: every input read once, every output written once."""
    lora = (k + n) * r * itemsize
    fwd = (m * k + m * n + m * r) * itemsize + weight_bytes + lora
    bwd = (m * n + 2 * m * k + m * r) * itemsize + weight_bytes + 2 * lora
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


@dataclasses.dataclass
class Weights:
    """Shared weights of one (K, N, r, dtype) group, and their 4-bit forms."""

    w: torch.Tensor  # (N, K) dtype
    a: torch.Tensor  # (r, K) dtype
    b: torch.Tensor  # (N, r) dtype
    scale: float
    alpha: float
    quant: dict[str, tuple[torch.Tensor, object]]  # "nf4"/"fp4" -> (packed, QuantState)
    mag_factor: torch.Tensor  # (N,) fp32 in [0.5, 1.5): DoRA's m = ‖W + s B A‖ ⊙ mag_factor

    def dense(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        """(N, K) base weight in ``dtype``: W itself ("dense", "dora-dense") or the dequantised 4-bit W."""
        from fastlora.quant import dequantize_4bit

        kind = kind.removeprefix("dora-")
        if kind == "dense":
            return self.w.to(dtype)
        packed, state = self.quant[kind]
        return dequantize_4bit(packed, state, torch.float32).to(dtype)

    def magnitude(self, kind: str) -> torch.Tensor:
        """(N,) fp32 DoRA magnitude for a base of ``kind`` (its norm ‖W + s B A‖ times the fixed factor)."""
        merged = self.dense(kind, torch.float32) + self.scale * self.b.float() @ self.a.float()
        return merged.norm(dim=1) * self.mag_factor

    def weight_bytes(self, kind: str) -> int:
        kind = kind.removeprefix("dora-")
        if kind == "dense":
            return self.w.numel() * self.w.element_size()
        packed, state = self.quant[kind]
        return packed.numel() * packed.element_size() + state.nbytes()


def make_weights(k: int, n: int, r: int, dtype: torch.dtype, device: str, seed: int = 0) -> Weights:
    from fastlora.quant import quantize_4bit

    gen = torch.Generator(device).manual_seed(seed)
    w = (torch.randn(n, k, device=device, generator=gen) / math.sqrt(k)).to(dtype)
    a = ((torch.rand(r, k, device=device, generator=gen) * 2 - 1) / math.sqrt(k)).to(dtype)
    b = ((torch.rand(n, r, device=device, generator=gen) * 2 - 1) / math.sqrt(r)).to(dtype)
    quant = {qt: quantize_4bit(w, qt, 64, double_quant=True) for qt in ("nf4", "fp4")}
    mag = torch.rand(n, device=device, generator=gen) + 0.5
    return Weights(w, a, b, scale=2.0, alpha=2.0 * r, quant=quant, mag_factor=mag)


@dataclasses.dataclass
class Impl:
    """A built implementation: ``forward(x) -> y``, its trainable tensors by gradient name, and its reference.

    ``params`` maps the name the guard compares a gradient under ("dA", "dB"...) to the trainable tensor.
    """

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    params: dict[str, torch.Tensor]
    kind: str  # "dense", "nf4", "fp4", "dora-dense", "dora-nf4": which reference it must match


def _torch_lora(wt: Weights, weight: Callable[[], torch.Tensor], name: str, kind: str) -> Impl:
    a, b, s = wt.a.clone().requires_grad_(), wt.b.clone().requires_grad_(), wt.scale
    return Impl(name, lambda x: F.linear(x, weight()) + s * F.linear(F.linear(x, a), b), {"dA": a, "dB": b}, kind)


class _Holder(nn.Module):
    """The smallest model peft can wrap: one linear layer named ``proj``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer


def _peft(wt: Weights, base: nn.Module, four_bit: bool, dora: bool = False) -> Impl:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise Skip(f"peft is not installed ({e})") from e
    holder = _Holder(base)
    holder.is_loaded_in_4bit = four_bit  # peft picks its bnb Linear4bit LoRA layer only for 4-bit models
    config = LoraConfig(r=wt.a.shape[0], lora_alpha=wt.alpha, lora_dropout=0.0, target_modules=["proj"],
                        use_dora=dora)  # fmt: skip
    inject_adapter_in_model(config, holder)
    layer = holder.proj
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    kind = "nf4" if four_bit else "dense"
    with torch.no_grad():
        lora_a.data, lora_b.data = wt.a.clone(), wt.b.clone()
    params = {"dA": lora_a, "dB": lora_b}
    if dora:
        mag = layer.lora_magnitude_vector["default"].weight
        with torch.no_grad():
            mag.data = wt.magnitude(kind).to(lora_a.dtype)
        params["dm"], kind = mag, f"dora-{kind}"
    name = ("peft+bnb" if four_bit else "peft") + ("-dora" if dora else "") + ("-nf4" if four_bit else "")
    return Impl(name, layer, params, kind)


def bnb_linear4bit(packed: torch.Tensor, state, dtype: torch.dtype) -> nn.Module:
    """A ``bnb.nn.Linear4bit`` holding exactly these packed bytes and statistics (no re-quantisation)."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # not installed, or no usable backend on this machine
        raise Skip(f"bitsandbytes is unavailable ({type(e).__name__}: {e})") from e
    n, k = state.shape
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type=state.quant_type, device="meta")
    stats = {key.removeprefix("weight."): v for key, v in state.state_dict("weight.").items()}
    layer.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, device=packed.device, module=layer)
    layer.compute_dtype = dtype
    return layer


def build(name: str, wt: Weights, dtype: torch.dtype) -> Impl:
    """Build implementation ``name`` (one of :data:`IMPLS`) on the shared weights; raises :class:`Skip`."""
    from fastlora.modules import FastLoRALinear
    from fastlora.quant import dequantize_4bit

    n, k = wt.w.shape
    r = wt.a.shape[0]
    if name == "torch":
        return _torch_lora(wt, lambda: wt.w, name, "dense")
    if name == "dequant-nf4":
        packed, state = wt.quant["nf4"]
        return _torch_lora(wt, lambda: dequantize_4bit(packed, state, dtype), name, "nf4")
    if name == "peft":
        linear = nn.Linear(k, n, bias=False, device=wt.w.device, dtype=dtype)
        linear.weight = nn.Parameter(wt.w.clone(), requires_grad=False)
        return _peft(wt, linear, four_bit=False)
    if name in ("peft-dora", "peft+bnb-nf4", "peft+bnb-dora-nf4"):
        if name == "peft-dora":
            base = nn.Linear(k, n, bias=False, device=wt.w.device, dtype=dtype)
            base.weight = nn.Parameter(wt.w.clone(), requires_grad=False)
        else:
            base = bnb_linear4bit(*wt.quant["nf4"], dtype)
        return _peft(wt, base, four_bit=name != "peft-dora", dora="dora" in name)
    if name == "unsloth-nf4":
        packed, state = wt.quant["nf4"]
        a, b = wt.a.clone().requires_grad_(), wt.b.clone().requires_grad_()
        fwd = functools.partial(unsloth_style_lora, lora_a=a, lora_b=b, packed=packed, state=state, scale=wt.scale)
        return Impl(name, fwd, {"dA": a, "dB": b}, "nf4")
    if name.startswith("fastlora") and "@" in name and name in IMPLS:
        impl = build(name.partition("@")[0], wt, dtype)
        return dataclasses.replace(impl, name=name, forward=path_scope(impl.forward, name.partition("@")[2]))
    if name.startswith("fastlora") and name in IMPLS:
        kind = name.removeprefix("fastlora").removeprefix("-").removeprefix("dora").removeprefix("-") or "dense"
        dora = name.startswith("fastlora-dora")
        weight, state = (wt.w, None) if kind == "dense" else wt.quant[kind]
        layer = FastLoRALinear(weight, None, r, wt.alpha, quant_state=state, init="none", use_dora=dora)
        params = {"dA": layer.lora_A, "dB": layer.lora_B}
        with torch.no_grad():
            layer.lora_A.copy_(wt.a)
            layer.lora_B.copy_(wt.b)
            if dora:
                params["dm"] = layer.adapter.lora_magnitude_vector
                params["dm"].copy_(wt.magnitude(kind))
        return Impl(name, layer, params, f"dora-{kind}" if dora else kind)
    raise ValueError(f"fastlora bench: unknown layer implementation {name!r}; expected one of {IMPLS}")


def reference(wt: Weights, kind: str, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """y, dx, dA, dB of ``x Wᵀ + s (x Aᵀ) Bᵀ`` in the reference dtype (fp32 with TF32 off, or float64); a
    "dora-*" kind: that times m / ‖W + s B A‖ (the norm detached), and dm."""
    rd = guard.reference_dtype(x.dtype)
    with guard.no_tf32():
        xr, ar, br = (t.detach().to(rd).requires_grad_() for t in (x, wt.a, wt.b))
        w = wt.dense(kind, rd)
        y = xr @ w.T + wt.scale * (xr @ ar.T) @ br.T
        if kind.startswith("dora-"):
            mr = wt.magnitude(kind).to(x.dtype).to(rd).requires_grad_()  # m as the implementations hold it
            y = y * (mr / (w + wt.scale * br @ ar).norm(dim=1).detach())
        y.backward(g.to(rd))
    out = {"y": y.detach(), "dx": xr.grad, "dA": ar.grad, "dB": br.grad}
    return {**out, "dm": mr.grad} if kind.startswith("dora-") else out


def run_once(impl: Impl, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """One forward + backward of ``impl``; returns y, dx and every parameter gradient, leaving none behind."""
    reset = [x, *impl.params.values()]
    for t in reset:
        t.grad = None
    y = impl.forward(x)
    y.backward(g)
    got = {"y": y.detach(), "dx": x.grad, **{key: p.grad for key, p in impl.params.items()}}
    for t in reset:
        t.grad = None
    return got


def timed_passes(
    impl: Impl, x: torch.Tensor, g: torch.Tensor, passes: Sequence[str]
) -> dict[str, Callable[[], object]]:
    """The callables that are timed: forward; backward of a retained graph; forward + backward."""
    fns: dict[str, Callable[[], object]] = {}
    if "fwd" in passes:
        fns["fwd"] = lambda: impl.forward(x)
    if "bwd" in passes:
        y = impl.forward(x)
        fns["bwd"] = lambda: y.backward(g, retain_graph=True)
    if "fwd+bwd" in passes:
        fns["fwd+bwd"] = lambda: impl.forward(x).backward(g)
    return fns


def inputs(case: LayerCase, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) requiring grad and the upstream gradient g (M, N) of a case, seeded by M."""
    gen = torch.Generator(device).manual_seed(case.m)
    x = torch.randn(case.m, case.k, device=device, generator=gen).to(DTYPES[case.dtype]).requires_grad_()
    return x, torch.randn(case.m, case.n, device=device, generator=gen).to(DTYPES[case.dtype])


def guarded(
    case: LayerCase,
    name: str,
    *,
    cuda: bool,
    passes: Sequence[str] = ("fwd", "bwd", "fwd+bwd"),
    builder: Callable[[str, Weights, torch.dtype], Impl] = build,
    cache: dict | None = None,
) -> Guarded:
    """Build ``name`` on ``case``, check it against the reference, and return its timed callables.

    Args:
        builder: builds an implementation by name (tests swap in a wrong one to exercise the guard).
        cache: a dict shared by the implementations of one case, so weights, inputs, references and the
            baseline are made once (it may come with "weights" already in it).

    Raises:
        Skip: it cannot run here.  WrongResult: its output or a gradient is wrong (it must not be timed).
    """
    device, dtype = ("cuda" if cuda else "cpu"), DTYPES[case.dtype]
    cache = {} if cache is None else cache
    if "weights" not in cache:
        cache["weights"] = make_weights(case.k, case.n, case.r, dtype, device)
    wt = cache["weights"]
    impl = builder(name, wt, dtype)
    if "x" not in cache:
        cache["x"], cache["g"] = inputs(case, device)
    x, g = cache["x"], cache["g"]
    for kind in ("dense", impl.kind):
        if kind not in cache:
            cache[kind] = reference(wt, kind, x, g)
    if "baseline" not in cache:
        cache["baseline"] = guard.baseline(run_once(build("torch", wt, dtype), x, g), cache["dense"])
    errors = guard.check(name, run_once(impl, x, g), cache[impl.kind], dtype, cache["baseline"])
    counts = {p: _counts(case, wt, impl, p) for p in passes}
    return Guarded(timed_passes(impl, x, g, passes), [x, *impl.params.values()], counts, errors)


def _counts(case: LayerCase, wt: Weights, impl: Impl, pass_: str) -> tuple[int, int]:
    m, k, n, r = case.m, case.k, case.n, case.r
    nbytes = lora_bytes(m, k, n, r, wt.w.element_size(), wt.weight_bytes(impl.kind), pass_)
    return lora_flops(m, k, n, r, pass_), nbytes


def _groups(cases: Iterable[LayerCase]) -> dict[tuple[int, int, int, str], list[LayerCase]]:
    groups: dict[tuple[int, int, int, str], list[LayerCase]] = {}
    for c in cases:
        groups.setdefault((c.k, c.n, c.r, c.dtype), []).append(c)
    return groups


def run(
    cases: Sequence[LayerCase],
    *,
    cuda: bool,
    timer: TimerConfig = DEFAULT_TIMER,
    passes: Sequence[str] = ("fwd", "bwd", "fwd+bwd"),
    impls: Sequence[str] = IMPLS,
    on_record: Callable[[Record], None] = lambda r: None,
    builder: Callable[[str, Weights, torch.dtype], Impl] = build,
) -> list[Record]:
    """Run the layer suite: per case, guard every implementation, then time each pass of those that pass.

    Args:
        cases: the layer cases (see :func:`fastlora.bench.cases.layer_cases`).
        cuda: run on the GPU (else the CPU, where fastlora takes its torch path).
        timer: warm-up and repetition budget.
        passes: subset of ("fwd", "bwd", "fwd+bwd").
        impls: subset of :data:`IMPLS`.
        on_record: called with every record as soon as it exists (progress, incremental writes).
        builder: builds an implementation by name (tests swap in a wrong one to exercise the guard).

    Returns:
        One record per (case, implementation, pass): timed, FAILED (guard or crash, untimed) or SKIPPED.
    """
    device = "cuda" if cuda else "cpu"
    records: list[Record] = []
    for (k, n, r, dt), group in _groups(cases).items():
        wt = make_weights(k, n, r, DTYPES[dt], device)
        for case in group:
            cache: dict = {"weights": wt}
            for name in impls:
                base = dict(suite="layer", case=case.id, impl=name, shape=case.shape, m=case.m, r=r, dtype=dt)
                make = functools.partial(guarded, case, name, cuda=cuda, passes=passes, builder=builder, cache=cache)
                for rec in time_guarded(base, passes, make, cuda=cuda, timer=timer):
                    records.append(rec)
                    on_record(rec)
            del cache
            if cuda:
                torch.cuda.empty_cache()
        del wt
        if cuda:
            torch.cuda.empty_cache()
    return records
