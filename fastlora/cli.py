"""The ``fastlora`` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def _setup_logging() -> None:
    """fastlora's warnings to stderr as plain lines; bitsandbytes' import-time note about an optional
    CPU kernel package (``kernels``) silenced: it is not used by fastlora."""
    log = logging.getLogger("fastlora")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command. An error a user or the machine can cause is one ``fastlora: ...``
    line on stderr and exit 2 (as argparse's usage errors), not a traceback; only a bug keeps its traceback."""
    _setup_logging()
    parser = argparse.ArgumentParser(prog="fastlora", description="Kernel-optimised LoRA/QLoRA for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    from fastlora.bench.cli import add_parser as add_bench
    from fastlora.env import add_parser as add_env
    from fastlora.quant import BLOCKSIZES
    from fastlora.train.cli import add_parsers as add_train
    from fastlora.train.cli import count

    demo = sub.add_parser("demo", help="quantise a layer to NF4, check it against bitsandbytes, print error and memory")
    demo.add_argument("--in-features", type=count(1), default=4096, help="[>= 1]")
    demo.add_argument("--out-features", type=count(1), default=4096, help="[>= 1]")
    demo.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    demo.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=64)
    demo.add_argument("--seed", type=count(0), default=0, help="[>= 0]")

    sub.add_parser("aot", help="compile every Triton kernel for sm_80/sm_90 and print registers, spills, wgmma use")

    plan = sub.add_parser("plan", help="which path, backend and kernel run each pass of a LoRA linear, and why")
    plan.add_argument("--m", type=count(1), nargs="+", default=[1, 16, 256, 4096, 8192], help="rows (tokens) [>= 1]")
    plan.add_argument("--k", type=count(1), default=4096, help="in_features [>= 1]")
    plan.add_argument("--n", type=count(1), default=4096, help="out_features [>= 1]")
    plan.add_argument("--r", type=count(1), default=16, help="LoRA rank [>= 1]")
    plan.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    plan.add_argument("--quant", choices=["nf4", "fp4", "none"], default="nf4")
    plan.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    plan.add_argument("--dropout", type=float, default=0.0)
    plan.add_argument("--backend", choices=["torch", "triton", "native"], default=None)
    plan.add_argument("--path", choices=["fused", "dequant_gemm"], default=None)

    add_train(sub)
    add_bench(sub)
    add_env(sub)

    args = parser.parse_args(argv)
    if args.command in ("finetune", "merge", "generate", "eval", "compare"):
        from fastlora.train.commands import run

        return run(args)  # which reports errors as fastlora: lines itself, with each command's advice
    try:
        return _run_other(args)
    except KeyboardInterrupt:
        print("fastlora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from fastlora.train.guards import explain

        message = explain(e)
        if message is None:
            raise  # a bug: its traceback is what to report
        print(message, file=sys.stderr)
        return 2


def _run_other(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from fastlora.demo import run_demo

        report = run_demo(args.in_features, args.out_features, args.quant_type, args.blocksize, args.seed)
        ok = report["plain_bnb_identical"] and report["dq_bnb_identical"]
        return 0 if ok else 1
    if args.command == "aot":
        from fastlora.aot import main as aot_main

        return aot_main([])
    if args.command == "plan":
        import torch

        from fastlora.ops import plan

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        for m in args.m:
            print(plan(m, args.k, args.n, args.r, dtype=dtype, quant=None if args.quant == "none" else args.quant,
                       device=args.device, dropout_p=args.dropout, backend=args.backend, path=args.path))  # fmt: skip
        return 0
    if args.command == "env":
        from fastlora.env import run as run_env

        return run_env(args)
    if args.command == "bench":
        from fastlora.bench.cli import run as run_bench

        return run_bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
