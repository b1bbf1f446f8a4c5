"""``fastlora bench``: run the benchmark suites, print the tables, write JSON/CSV/markdown and plots.

    fastlora bench --quick                       # CPU: a reduced set in about a minute; GPU: a fast check
    fastlora bench --suite layer --out results/  # GPU: Llama-3-8B/70B layer shapes, M up to 16384
    fastlora bench --suite all --out DIR         # everything (the GPU run behind `make bench-gpu`)
    python -m fastlora.bench ...                 # the same, without the `fastlora` entry point

Exit status: 0; 1 when one of fastlora's own implementations FAILED its correctness guard (a peer's
failure is reported in the table, not fatal); 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time

SUITE_CHOICES = ("layer", "model", "decode", "adapter", "multi", "all")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _suites(text: str) -> list[str]:
    names = _names(text)
    bad = [n for n in names if n not in SUITE_CHOICES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(SUITE_CHOICES)} (comma-separated), got {text!r}")
    return ["layer", "decode", "model", "adapter"] if "all" in names else list(dict.fromkeys(names))


def _shapes(text: str):
    from fastlora.bench.cases import parse_shapes

    try:
        return parse_shapes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark fastlora against plain PyTorch, peft and bitsandbytes (tables, JSON/CSV, plots)",
        description="Measure fastlora's layers, decode path, training step and adapters against the references. "
        "Every implementation is checked against a higher-precision reference before it is timed; a "
        "wrong one is reported as FAILED and never timed.",
    )
    p.add_argument("--suite", type=_suites, default="all", metavar="{layer,model,decode,adapter,multi,all}",
                   help="suite(s) to run, comma-separated (default: all)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="reduced cases and a shorter timer (the CPU smoke run)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: ./fastlora-bench/<date>_<device>)")
    p.add_argument(
        "--shapes",
        type=_shapes,
        metavar="KxN,...",
        help="layer shapes, in x out (e.g. 4096x14336), or presets llama3-8b, llama3-70b, tiny",
    )
    p.add_argument("--tokens", type=_ints, metavar="M,...", help="token counts M (e.g. 1,16,4096)")
    p.add_argument("--ranks", type=_ints, metavar="R,...", help="LoRA ranks (e.g. 8,16,64)")
    p.add_argument("--dtypes", type=_names, metavar="DT,...", help="bf16, fp16, fp32")
    p.add_argument("--models", type=_names, metavar="NAME,...",
                   help="model suite configs: llama-125m, llama-1b, llama-8b, llama-5m")  # fmt: skip
    p.add_argument("--impls", type=_names, metavar="NAME,...", help="keep only these implementations")
    p.add_argument("--passes", type=_names, metavar="P,...", help="fwd, bwd, fwd+bwd")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60]


def run(args: argparse.Namespace) -> int:
    """Run ``fastlora bench`` from parsed arguments; returns the exit status."""
    import torch

    from fastlora.bench import records, report
    from fastlora.bench.suites import SUITES, Overrides, fastlora_failures, run_benchmarks, write_outputs

    cuda = torch.cuda.is_available()
    if args.threads is not None:
        if args.threads <= 0:
            print(f"fastlora bench: --threads must be positive, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    suites = list(SUITES) if args.suite == "all" else list(args.suite)
    overrides = Overrides(shapes=args.shapes, tokens=args.tokens, ranks=args.ranks, dtypes=args.dtypes,
                          models=args.models, impls=args.impls, passes=args.passes)  # fmt: skip
    try:
        overrides.validate()
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    device = records.device_name(cuda)
    out_dir = args.out or os.path.join(
        "fastlora-bench", f"{datetime.date.today().isoformat()}_{_slug(device)}{'_quick' if args.quick else ''}"
    )
    print(f"fastlora bench: {', '.join(suites)} on {device}{' (quick)' if args.quick else ''} -> {out_dir}")
    if not cuda:
        print(f"No CUDA device. {report.CPU_NOTICE}")
    start = time.perf_counter()
    last = [None]

    def progress(rec) -> None:
        if (rec.suite, rec.case) != last[0]:
            last[0] = (rec.suite, rec.case)
            print(f"[{time.perf_counter() - start:6.0f} s] {rec.suite}: {rec.case}", file=sys.stderr, flush=True)

    os.makedirs(out_dir, exist_ok=True)
    partial = os.path.join(out_dir, "results.partial.json")
    meta, recs = run_benchmarks(suites, quick=args.quick, cuda=cuda, overrides=overrides,
                                argv=sys.argv, on_record=progress, partial_json=partial)  # fmt: skip
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    report.print_tables(recs, meta, [s for s in report.SUITE_ORDER if any(r.suite == s for r in recs)])
    paths = write_outputs(out_dir, meta, recs, plots=not args.no_plots)
    if os.path.exists(partial):
        os.remove(partial)
    print(f"wrote {', '.join(os.path.basename(p) for p in paths)} to {out_dir} ({meta['elapsed_s']:.0f} s)")
    if not cuda:
        print(f"No CUDA device. {report.CPU_NOTICE}")
    failed = fastlora_failures(recs)
    for r in failed:
        print(f"FAILED: {r.impl} on {r.suite} {r.case} ({r.pass_}): {r.note}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastlora.bench [options]``: the ``bench`` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="fastlora")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run(args)
