"""Dequantisation bandwidth: fastlora's Triton kernel vs bitsandbytes' CUDA dequant vs a device copy.

GB/s counts bytes read (packed 4-bit + statistics) plus bytes written (the dequantised weight).
Every timed output is first checked equal to bitsandbytes' (or the reference's) result.

    python benchmarks/bench_dequant.py                       # GPU: 4096x14336 bf16, writes results/
    python benchmarks/bench_dequant.py --rows 256 --cols 512 # CPU smoke run (reference backend)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
from _harness import time_ms, write_results

from fastlora.quant import dequantize_4bit, quantize_4bit


def run(rows: int, cols: int, dtype: torch.dtype, double_quant: bool) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randn(rows, cols, dtype=dtype, device=device)
    packed, state = quantize_4bit(w, "nf4", 64, double_quant)
    out_bytes = w.numel() * w.element_size()
    moved = packed.numel() + state.nbytes() + out_bytes
    rows_out: list[dict] = []

    def add(name, fn, nbytes):
        med, q20, q80 = time_ms(fn, device == "cuda")
        rows_out.append(
            {"impl": name, "ms": med, "ms_q20": q20, "ms_q80": q80, "GB/s": nbytes / med / 1e6, "bytes": nbytes}
        )

    reference = dequantize_4bit(packed, state, backend="torch")
    backend = "triton" if device == "cuda" else "torch"
    assert torch.equal(dequantize_4bit(packed, state, backend=backend), reference)
    add(f"fastlora ({backend})", lambda: dequantize_4bit(packed, state, backend=backend), moved)
    try:
        import bitsandbytes.functional as F

        bnb_state = state.to_bnb()
        assert torch.equal(F.dequantize_4bit(packed, bnb_state), reference)
        add("bitsandbytes", lambda: F.dequantize_4bit(packed, bnb_state), moved)
    except ImportError:
        print("bitsandbytes not installed: no bitsandbytes row")
    src = torch.empty_like(w)
    add("copy (w.copy_)", lambda: src.copy_(w), 2 * out_bytes)
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=14336)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = {
        "device": device_name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "shape": [args.rows, args.cols],
        "dtype": args.dtype,
        "quant": "nf4, blocksize 64",
    }
    lines = [f"# NF4 dequantisation, {args.rows}x{args.cols} -> {args.dtype}", "", json.dumps(meta), ""]
    results = {}
    for dq in (False, True):
        rows = run(args.rows, args.cols, dtype, dq)
        results[f"double_quant={dq}"] = rows
        copy_gbs = rows[-1]["GB/s"]
        lines += [f"## double_quant={dq}", "", "| impl | ms (median) | q20-q80 | GB/s | of copy |"]
        lines.append("|---|---|---|---|---|")
        for r in rows:
            lines.append(
                f"| {r['impl']} | {r['ms']:.4f} | {r['ms_q20']:.4f}-{r['ms_q80']:.4f} | {r['GB/s']:.1f} | "
                f"{r['GB/s'] / copy_gbs:.0%} |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if device_name != "cpu":
        write_results(args.out, f"dequant_{meta['date']}_{device_name.replace(' ', '_')}", text, meta, results)


if __name__ == "__main__":
    main()
