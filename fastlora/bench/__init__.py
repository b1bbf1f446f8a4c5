"""Benchmarks of fastlora against the alternatives, measured the same way every time (``fastlora bench``).

Suites (each in its own module, with its FLOP/byte accounting in the docstring):

- :mod:`~fastlora.bench.layer`: one LoRA/QLoRA linear layer, fwd / bwd / fwd+bwd, vs plain PyTorch (cuBLAS,
  the limit), peft over nn.Linear, peft over bnb.nn.Linear4bit, dequantise-then-matmul.
- :mod:`~fastlora.bench.decode`: inference at M <= 16 with a 4-bit base (and NF4 dequantisation bandwidth)
  vs bitsandbytes' own 4-bit GEMV and a device copy; the native kernel where built.
- :mod:`~fastlora.bench.model`: one training step of a Llama-style model, fastlora QLoRA vs peft+bitsandbytes
  QLoRA vs bf16 LoRA: tokens/s and peak memory.
- :mod:`~fastlora.bench.adapter`: the fused bottleneck adapter vs the plain-PyTorch adapter.

Shared pieces: :mod:`~fastlora.bench.cases` (what is measured, full and quick), :mod:`~fastlora.bench.timing`
(timer, peak memory, measured device peaks), :mod:`~fastlora.bench.guard` (every implementation is checked
against a higher-precision reference before it is timed; a wrong one is FAILED, never timed),
:mod:`~fastlora.bench.records` (rows, metadata, JSON/CSV), :mod:`~fastlora.bench.report` (tables, plots),
:mod:`~fastlora.bench.suites` (:func:`run_benchmarks`, :func:`write_outputs`), :mod:`~fastlora.bench.cli`.
"""

from fastlora.bench.guard import WrongResult
from fastlora.bench.records import Record
from fastlora.bench.suites import Overrides, run_benchmarks, write_outputs

__all__ = ["Overrides", "Record", "WrongResult", "run_benchmarks", "write_outputs"]
