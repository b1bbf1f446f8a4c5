"""Which path runs each pass of a LoRA/QLoRA linear, by size: the one place that decides.

Every pass of :func:`fastlora.lora_linear` (forward, input gradient, the LoRA gradients) runs on
one of two paths:

- ``"fused"`` (decode, small batches): one kernel reads the 4-bit W, dequantises it tile by tile in
  registers and carries the low-rank term as extra inner steps, ``[x | u]·[Wᵀ ; Bᵀ]`` (Triton,
  :mod:`fastlora.kernels.lora`), or, for at most 16 rows on a CPU, the native GEMV. Nothing but the
  output is written; it wins while the GEMM is too small to hide the in-loop dequantisation.
- ``"dequant_gemm"`` (training, prefill): W dequantised once per use into a scratch buffer shared by
  every layer, at memory speed, then one GEMM on dense operands that carries the low-rank term
  itself (:mod:`fastlora.ops.lora_paths`). Dense bases take it without the dequantisation.

The crossover M (fused while M <= it) is data, :mod:`fastlora.ops.crossover_table`, per
(arch, quant, dtype, K, N), from the static sm_90 model until GPU measurements replace it; a
shape not in it takes the nearest row (in log K + log N) of the same quant and dtype.

:func:`plan` answers which path, backend and kernel run a call and why; the op asks it the same
question, so the answer is what runs. Overrides: ``path=`` (``lora_linear``'s argument) or the
``FASTLORA_PATH`` environment variable; ``backend=`` / ``FASTLORA_BACKEND`` for the backend.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from fastlora import dispatch
from fastlora.ops import crossover_table

PATHS = ("fused", "dequant_gemm")
PATH_ENV = "FASTLORA_PATH"
OP = "lora_linear"
OP_DX = "lora_linear_dx"
OP_GRADS = "lora_grads"
ARCH = 90  # the model's architecture: its table serves every CUDA GPU until others are measured
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def requested_path(path: str | None) -> str | None:
    """The path asked for: ``path``, else ``FASTLORA_PATH``, else None (by size); validated."""
    choice = path or os.environ.get(PATH_ENV) or None
    if choice is not None and choice not in PATHS:
        raise ValueError(f"fastlora lora_linear: path must be one of {PATHS}, got {choice!r}")
    return choice


@dataclasses.dataclass(frozen=True)
class Crossover:
    """The table row a shape uses: fused while M <= ``fwd_max_m`` (forward) / ``dx_max_m`` (input gradient)."""

    fwd_max_m: int
    dx_max_m: int
    row: tuple | None  # the row of crossover_table.ROWS, None when no row has this quant and dtype
    fwd_gemm: str = "cublas_c"  # dequant_gemm's GEMM: "cublas_c" (cuBLAS, C = the low-rank term) or "kext"
    dx_gemm: str = "cublas_c"  # (the K-extended Triton kernel over the dense scratch)

    def describe(self) -> str:
        if self.row is None:
            return "no row of the crossover table for this quant and dtype: fused only for M <= 16"
        arch, quant, dtype, k, n = self.row[:5]
        return f"crossover table row sm_{arch} {quant} {dtype} K={k} N={n} ({crossover_table.SOURCE})"


def crossover(k: int, n: int, quant: str | None, dtype: torch.dtype) -> Crossover:
    """The crossover M of a (K = in_features, N = out_features) layer, from the nearest table row."""
    qname = quant or "dense"
    dname = _DTYPE_NAMES.get(dtype, str(dtype))
    col = {c: i for i, c in enumerate(crossover_table.COLUMNS)}
    rows = [
        r
        for r in crossover_table.ROWS
        if r[col["arch"]] == ARCH and r[col["quant"]] == qname and r[col["dtype"]] == dname
    ]
    if not rows:
        return Crossover(16, 16, None)

    def distance(r: tuple) -> float:
        return abs(math.log(max(k, 1) / r[col["k"]])) + abs(math.log(max(n, 1) / r[col["n"]]))

    best = min(rows, key=distance)
    gemm = [best[col[c]] if c in col else "cublas_c" for c in ("fwd_gemm", "dx_gemm")]
    return Crossover(best[col["fwd_max_m"]], best[col["dx_max_m"]], best, *gemm)


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """How one pass runs.

    Attributes:
        name: "forward", "input_grad" or "lora_grads".
        backend: "torch", "triton" or "native".
        path: "fused" or "dequant_gemm" ("-" for the LoRA gradients, which take no W).
        how: what runs, in words.
        reason: why this backend and path.
    """

    name: str
    backend: str
    path: str
    how: str
    reason: str


@dataclasses.dataclass(frozen=True)
class LoRAPlan:
    """The plan of one LoRA/QLoRA linear call: :func:`plan`'s answer. ``str()`` prints it as a table."""

    m: int
    k: int
    n: int
    r: int
    dtype: torch.dtype
    quant: str | None
    device: str
    dropout_p: float
    forward: PassPlan
    input_grad: PassPlan
    lora_grads: PassPlan
    crossover: Crossover

    @property
    def passes(self) -> tuple[PassPlan, PassPlan, PassPlan]:
        return self.forward, self.input_grad, self.lora_grads

    def __str__(self) -> str:
        head = (
            f"fastlora plan: M={self.m} K={self.k} N={self.n} r={self.r} {_DTYPE_NAMES.get(self.dtype, self.dtype)} "
            f"{self.quant or 'dense'} on {self.device}, dropout {self.dropout_p:g}"
        )
        lines = [head]
        for p in self.passes:
            lines.append(f"  {p.name:<10} {p.backend:<6} {p.path:<12} {p.how}")
            lines.append(f"  {'':<10} {'':<6} {'':<12} why: {p.reason}")
        return "\n".join(lines)


def _how(name: str, backend: str, path: str, quant: str | None, dropout: bool, gemm: str = "cublas_c") -> str:
    w = "the 4-bit W" if quant else "W"
    if name == "lora_grads":
        if backend == "triton":
            return "v = s·g·B and dB = s·gᵀ·u in one pass over g; dA = vᵀ·d(x) with the mask regenerated in-kernel"
        return "v = s·g·B, dB = s·gᵀ·u, dA = vᵀ·d(x) by torch matmuls"
    if backend == "native":
        return "native GEMV: W read once, dequantised in registers, s·u·Bᵀ added in its epilogue"
    if backend == "torch":
        return f"PyTorch: {w} dequantised, then matmuls (the reference)" if quant else "PyTorch matmuls (the reference)"
    if path == "fused":
        what = "[x | u]·[Wᵀ ; Bᵀ]" if name == "forward" else "[g | v]·[W ; A]"
        drop = ", the dropout mask regenerated on the low-rank sum" if dropout and name == "input_grad" else ""
        deq = ", W dequantised tile by tile in registers" if quant else ""
        return f"Triton fused GEMM {what}{deq}{drop} (one launch)"
    deq = f"{w} dequantised into the shared scratch (one pass at memory speed), then " if quant else ""
    if gemm == "kext":
        what = "[x | u]·[W_dqᵀ ; Bᵀ]" if name == "forward" else "[g | v]·[W_dq ; A]"
        return deq + f"the K-extended Triton GEMM {what} on dense operands (no [M, N] pass outside it)"
    if name == "forward":
        return deq + "one cuBLAS GEMM x·W_dqᵀ with C = s·u·Bᵀ + b read in its epilogue"
    return deq + "one cuBLAS GEMM g·W_dq with C = d'(v·A) read in its epilogue"


def _pass(name: str, op: str, device: torch.device, backend: str | None, path: str | None, m: int, k: int, n: int,
          quant: str | None, dtype: torch.dtype, dropout: bool) -> PassPlan:  # fmt: skip
    choice = dispatch.choose(op, device, backend, m=m, quantized=quant is not None)
    if name == "lora_grads":
        return PassPlan(name, choice.backend, "-", _how(name, choice.backend, "-", quant, dropout), choice.reason)
    chosen, why = decide_path(op, choice.backend, path, m, k, n, quant, dtype)
    cross = crossover(k, n, quant, dtype)
    gemm = cross.fwd_gemm if op == OP else cross.dx_gemm
    how = _how(name, choice.backend, chosen, quant, dropout, gemm)
    return PassPlan(name, choice.backend, chosen, how, f"{choice.reason}; {why}" if why else choice.reason)


def plan(
    m: int,
    k: int,
    n: int,
    r: int = 16,
    *,
    dtype: torch.dtype = torch.bfloat16,
    quant: str | None = "nf4",
    device: torch.device | str = "cuda",
    dropout_p: float = 0.0,
    backend: str | None = None,
    path: str | None = None,
) -> LoRAPlan:
    """Which backend, path and kernel run each pass of a LoRA/QLoRA linear of this size, and why.

    Args:
        m: rows of the call (tokens: batch x sequence).
        k, n: the layer's in_features and out_features (W is (n, k)).
        r: the LoRA rank.
        dtype: the activations' dtype (fp32/fp16/bf16).
        quant: "nf4", "fp4" or None for a dense base.
        device: where the call runs ("cuda", "cpu", a torch.device).
        dropout_p: the LoRA dropout probability.
        backend: "torch", "triton" or "native", as :func:`fastlora.lora_linear` takes it (default: by device).
        path: "fused" or "dequant_gemm" to force a path (default ``FASTLORA_PATH``, else by size).

    Returns:
        A :class:`LoRAPlan`: ``.forward``, ``.input_grad``, ``.lora_grads`` (each a :class:`PassPlan`) and
        the crossover row used; ``print()`` it for a table.
    """
    if quant not in (None, "nf4", "fp4"):
        raise ValueError(f"fastlora plan: quant must be 'nf4', 'fp4' or None, got {quant!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastlora plan: dropout_p must be in [0, 1), got {dropout_p!r}")
    device = torch.device(device)
    wanted = requested_path(path)
    args = (device, backend, wanted, m, k, n, quant, dtype, dropout_p > 0)
    fwd, dx, grads = (_pass(name, op, *args) for name, op in
                      (("forward", OP), ("input_grad", OP_DX), ("lora_grads", OP_GRADS)))  # fmt: skip
    return LoRAPlan(m, k, n, r, dtype, quant, str(device), dropout_p, fwd, dx, grads, crossover(k, n, quant, dtype))


def decide_path(op: str, backend: str, path: str | None, m: int, k: int, n: int, quant: str | None,
                dtype: torch.dtype) -> tuple[str, str]:  # fmt: skip
    """(path, why) of one pass already dispatched to ``backend``: what the op runs and :func:`plan` reports.

    Native runs the fused GEMV and the reference dequantises then multiplies, whatever is asked; on Triton the
    request (``path``, else ``FASTLORA_PATH``) wins, else the crossover table: fused while M <= its limit."""
    wanted = requested_path(path)
    if backend == "native":
        ignored = wanted == "dequant_gemm"
        return "fused", "path dequant_gemm requested, but the native kernel is the fused GEMV" if ignored else ""
    if backend != "triton":
        ignored = wanted == "fused"
        return "dequant_gemm", "path fused requested, but the PyTorch reference has no fused kernel" if ignored else ""
    cross = crossover(k, n, quant, dtype)
    if wanted is not None:
        chosen, why = wanted, f"path {wanted} requested"
    else:
        max_m = cross.fwd_max_m if op == OP else cross.dx_max_m
        chosen = "fused" if m <= max_m else "dequant_gemm"
        why = f"M={m} {'<=' if chosen == 'fused' else '>'} {max_m}, the crossover of the {cross.describe()}"
    if chosen == "dequant_gemm":
        why += f"; GEMM {cross.fwd_gemm if op == OP else cross.dx_gemm}, the faster at training M in that row"
    return chosen, why
