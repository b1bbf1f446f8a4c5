"""How one implementation on one case becomes result rows: build it, guard it, time it.

Each suite's ``guarded(case, name, ...)`` builds an implementation, runs the correctness guard and
returns a :class:`Guarded` (the calls to time and their FLOP/byte counts), or raises :class:`Skip`
(cannot run here) or :class:`~fastlora.bench.guard.WrongResult`. :func:`time_guarded` turns that into
records: timed rows, or SKIPPED / FAILED rows with the reason, never timed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from fastlora.bench import guard
from fastlora.bench.records import FAILED, SKIPPED, Record
from fastlora.bench.timing import TimerConfig, measure, peak_mib


class Skip(Exception):
    """The implementation cannot run here (a package is missing, the device is unsupported)."""


@dataclasses.dataclass
class Guarded:
    """An implementation that passed the guard on one case: what to time, and what each pass counts.

    Attributes:
        fns: pass -> the call to time.  reset: tensors whose ``.grad`` is cleared before each call.
        counts: pass -> (FLOPs, bytes).  errors: the guard's (rel, worst) error per compared tensor.
    """

    fns: dict[str, Callable[[], object]]
    reset: list[torch.Tensor]
    counts: dict[str, tuple[int, int | None]]
    errors: dict[str, tuple[float, float]]


def time_guarded(
    base: dict, passes: Sequence[str], make: Callable[[], Guarded], *, cuda: bool, timer: TimerConfig
) -> list[Record]:
    """Records of one implementation on one case: ``make()`` builds and guards it, then each pass is timed.

    A :class:`Skip` gives SKIPPED records; a :class:`~fastlora.bench.guard.WrongResult` or any other
    exception gives FAILED records with the reason (out of memory: SKIPPED); none of them is timed.
    ``base`` holds the record fields of the case.
    """
    try:
        ready = make()
    except Skip as e:
        return [Record(**base, pass_=p, status=SKIPPED, note=f"skipped: {e}") for p in passes]
    except torch.cuda.OutOfMemoryError as e:
        return [Record(**base, pass_=p, status=SKIPPED, note=f"out of memory: {e}") for p in passes]
    except Exception as e:  # wrong result, or a crash while building or checking: reported, never timed
        note = str(e) if isinstance(e, guard.WrongResult) else f"raised {type(e).__name__}: {e}"
        return [Record(**base, pass_=p, status=FAILED, note=note) for p in passes]
    out = []
    rel = max((e[0] for e in ready.errors.values()), default=0.0)
    for p in passes:
        fn = ready.fns[p]
        t = measure(fn, cuda=cuda, reset=ready.reset, config=timer)
        flops, nbytes = ready.counts[p]
        rec = Record(**base, pass_=p, ms=t.ms, q20=t.q20, q80=t.q80, reps=t.reps, flops=flops, bytes=nbytes)
        rec.peak_mib = peak_mib(fn, cuda=cuda, reset=ready.reset)
        rec.max_rel_err = rel
        out.append(rec.finish())
    for t in ready.reset:
        t.grad = None
    return out
