"""One timer, one peak-memory probe and the device's own limits, so every figure is measured the same way.

- :func:`measure`: median and 20th/80th percentiles in ms. CUDA: ``triton.testing.do_bench`` (L2 flushed
  between reps, CUDA events). CPU: ``time.perf_counter`` around each call after a warm-up, repeated until
  both a minimum count and a time budget are reached.
- :func:`peak_mib`: CUDA ``max_memory_allocated`` over one call, above what was allocated before it. On a
  CPU there is no allocator high-water mark to read, so it returns None ("n/a"), never an estimate.
- :func:`device_peaks`: the matmul rate and copy bandwidth of this device, measured in the same run, the
  lines a roofline is drawn against.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, 20th and 80th percentile over ``reps`` timed calls."""

    ms: float
    q20: float
    q80: float
    reps: int


@dataclasses.dataclass(frozen=True)
class TimerConfig:
    """CUDA: ``warmup_ms``/``rep_ms`` go to ``do_bench``. CPU: ``warmup`` untimed calls, then timed calls
    until ``min_reps`` are done and ``rep_ms`` has passed, at most ``max_reps``."""

    warmup_ms: float = 10.0
    rep_ms: float = 60.0  # do_bench repeats ~60 ms of calls: hundreds of reps for a decode kernel, ~5 at 16k tokens
    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 50


DEFAULT_TIMER = TimerConfig()
QUICK_TIMER = TimerConfig(warmup_ms=10.0, rep_ms=40.0, warmup=1, min_reps=5, max_reps=25)


def _clear(reset: Sequence[torch.Tensor]) -> None:
    for t in reset:
        t.grad = None


def measure(
    fn: Callable[[], object],
    *,
    cuda: bool,
    reset: Sequence[torch.Tensor] = (),
    config: TimerConfig | None = None,
    wallclock: bool = False,
) -> Timing:
    """Time ``fn()``; the ``.grad`` of every tensor in ``reset`` is set to None before each call, untimed.

    Args:
        fn: the call to time, with no arguments; its result is dropped.
        cuda: time with ``triton.testing.do_bench`` (CUDA events) instead of the CPU wall clock.
        reset: tensors whose gradients accumulate across calls (inputs and trainable weights).
        config: warm-up and repetition budget.
        wallclock: on CUDA too, time whole synchronised calls with the wall clock (for calls of many
            kernels and host work, like a training step, where do_bench's few reps would be all there is).

    Returns:
        :class:`Timing` in milliseconds.
    """
    config = config or DEFAULT_TIMER
    if cuda and not wallclock:
        import triton.testing

        med, q20, q80 = triton.testing.do_bench(
            fn, warmup=config.warmup_ms, rep=config.rep_ms, grad_to_none=list(reset), quantiles=[0.5, 0.2, 0.8]
        )
        reps = max(1, int(config.rep_ms / max(med, 1e-6)))  # do_bench's own estimate of its rep count
        return Timing(float(med), float(q20), float(q80), reps)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(config.warmup):
        _clear(reset)
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < config.max_reps and (
        len(times) < config.min_reps or (time.perf_counter() - start) * 1e3 < config.rep_ms
    ):
        _clear(reset)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    _clear(reset)
    med, q20, q80 = np.quantile(np.asarray(times), [0.5, 0.2, 0.8])
    return Timing(float(med), float(q20), float(q80), len(times))


def peak_mib(fn: Callable[[], object], *, cuda: bool, reset: Sequence[torch.Tensor] = ()) -> float | None:
    """Peak MiB allocated by one call of ``fn`` above what was allocated before it; None on a CPU (n/a).

    PyTorch's CPU allocator keeps no high-water mark, and process RSS counts the allocator's cache and
    other threads, so no CPU number would mean what the CUDA one means.
    """
    if not cuda:
        return None
    _clear(reset)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    _clear(reset)
    return peak / 2**20


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """Measured, not from a datasheet: ``tflops[dtype]`` of an n×n×n matmul and ``copy_gbs`` of a
    device-to-device copy (bytes read + written)."""

    tflops: dict[str, float]
    copy_gbs: float
    matmul_n: int
    copy_mib: int


def device_peaks(dtypes: Sequence[torch.dtype], *, cuda: bool, quick: bool) -> DevicePeaks:
    """Measure the matmul rate per dtype and the copy bandwidth of the current device.

    GPU: 8192³ matmul (4096³ with ``quick``), 1 GiB copy. CPU: 1024³ (512³) matmul, 64 MiB (32 MiB) copy.
    """
    device = "cuda" if cuda else "cpu"
    n = (4096 if quick else 8192) if cuda else (512 if quick else 1024)
    copy_mib = (256 if quick else 1024) if cuda else (32 if quick else 64)
    config = QUICK_TIMER if quick else DEFAULT_TIMER
    tflops: dict[str, float] = {}
    for dtype in dict.fromkeys(dtypes):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t = measure(lambda a=a, b=b: a @ b, cuda=cuda, config=config)
        tflops[dtype_name(dtype)] = 2 * n**3 / t.ms / 1e9
    src = torch.empty(copy_mib * 2**20, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), cuda=cuda, config=config)
    copy_gbs = 2 * src.numel() / t.ms / 1e6
    return DevicePeaks(tflops=tflops, copy_gbs=copy_gbs, matmul_n=n, copy_mib=copy_mib)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16"."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"fastlora bench: dtype must be one of {list(DTYPES.values())}, got {dtype}")
