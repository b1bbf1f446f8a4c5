"""A static cost model of the CUDA decode GEMV (csrc/cuda/quant4_cuda.cu), from its sm_90 SASS.

No GPU needed: nvcc compiles the kernels, triton's cuobjdump disassembles them, and for every GEMV
instantiation this finds the streaming loop (the innermost loop around the `LDG.E.NA.128` loads of
the packed weight, each one 16-byte chunk = 32 weights of one lane) and counts its instructions per
chunk. Two kernels: the tensor-core one (fp16/bf16 x: one instantiation for M <= 8, one for M <= 16)
and the CUDA-core one (fp32 x: one per M rounded up to a power of two). A warp scheduler issues at
most one instruction a cycle, so an SM issues at most 4 warp-instructions (128 lane-instructions) a
cycle; the HBM stream needs `bandwidth / (SMs x clock)` bytes a cycle per SM. Their ratio is the
ceiling on the fraction of the bandwidth the kernel can use when it is issue-bound — an upper bound,
not a measurement (latency, LDS and L1 limits come on top). The count is static: both sides of a
branch inside the loop count (the plain and the double-quantised absmax), so it errs high.

The second ceiling is the L1 data path: an SM's L1/shared-memory pipe returns one 128-byte wavefront a
cycle; per warp, a conflict-free 32-bit LDS (the code table) is one wavefront and a 16-byte load of 32
distinct addresses four (x at its largest M: every lane reads its own token and chunk; W). Wavefronts per
chunk against 1024 weights a warp-chunk give a third bound (x loads count at the kernel's largest M, so
it errs low for smaller M, where lanes share tokens).

The third ceiling is latency (Little's law): the bandwidth a kernel can draw is at most the bytes it
keeps in flight over the memory latency. From the same SASS: how long each streaming load waits for its
first use (instructions in the loop, the back edge included), hence the 16-byte loads a lane has in
flight on average; from ptxas' register count, the blocks an SM holds (65536 registers, allocated per
warp in units of 256; 2048 threads). Their product over every SM, against bandwidth x latency, is the
ceiling for a grid that fills the GPU (smaller grids draw less). The latency is an assumption
(`--latency-ns`; published H100 figures run from about 400 to 700 ns).

    python benchmarks/cuda_sass.py            # markdown table for H100 SXM (132 SMs, 1.98 GHz, 3.35 TB/s)
    python benchmarks/cuda_sass.py --source <(git show REV:csrc/cuda/quant4_cuda.cu)   # an older kernel
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sass_common beside this file (run as a script or by path)
from sass_common import blocks_per_sm  # part of this module's interface
from sass_common import cuobjdump as _cuobjdump

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "quant4_cuda.cu"
DTYPE_NAMES = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}


def disassemble(nvcc: str, arch: str = "sm_90", source: Path = SOURCE) -> tuple[str, dict[str, int]]:
    """The SASS of every kernel in `source` (quant4_cuda.cu, or a copy of another version of it) for `arch`,
    and each kernel's register count (mangled name -> registers a thread)."""
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "q.cubin")
        src = os.path.join(d, "quant4_cuda.cu")  # a copy: `source` may be a pipe; its includes come by -I
        shutil.copyfile(source, src)
        cmd = [nvcc, "-std=c++17", "-O3", "-cubin", f"-arch={arch}", f"-I{SOURCE.parent}", src, "-o", cubin]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        text, usage = (
            subprocess.run([_cuobjdump(), flag, cubin], check=True, capture_output=True, text=True).stdout
            for flag in ("--dump-sass", "--dump-resource-usage")
        )
    registers = re.findall(r"Function (\S+?):\s*\n?\s*REG:(\d+)", usage)
    return text, {name: int(r) for name, r in registers}


def _in_flight(loop: list[str]) -> float:
    """Streaming (16-byte, L1-bypassing) loads a lane has in flight on average over the loop body: each
    is outstanding from its issue to the first instruction that reads its destination registers, in
    instructions, around the back edge if it is used in a later iteration."""
    n, total = len(loop), 0
    for i, op in enumerate(loop):
        if "LDG.E.NA.128" not in op:
            continue
        base = int(re.search(r"LDG\S* R(\d+)", op).group(1))
        dest = [f"R{base + k}" for k in range(4)]
        for dist in range(1, 2 * n):
            nxt = loop[(i + dist) % n]
            sources = nxt.split(",", 1)[1] if "," in nxt else ""
            if any(re.search(rf"\b{r}\b", sources) for r in dest):
                total += dist
                break
        else:
            raise AssertionError(f"streaming load never used: {op}")
    return total / n


def _wavefronts(op: str) -> int:
    """L1 wavefronts a warp's load costs: 32-bit shared loads conflict-free (1), global loads from 32 distinct
    addresses (1 per 4 bytes a lane); 0 for anything else."""
    m = re.match(r"(?:@!?U?P\w+\s+)?(LDS|LDG)(\S*)", op)
    if m is None:
        return 0
    width = re.search(r"\.(64|128)\b", m.group(2))
    return int(width.group(1)) // 32 if width else 1


def gemv_loops(sass_text: str, registers: dict[str, int] | None = None) -> list[dict]:
    """Per GEMV instantiation: kernel ("tensor cores" / "CUDA cores"), dtype, M (the largest M it serves),
    and per 16-byte chunk of the streaming loop: instructions, LDS, FP32 multiplies (FMUL + FFMA), HMMA
    and global loads; "in_flight": the streaming loads a lane has in flight on average; with `registers`
    (from :func:`disassemble`) also "registers" and "blocks_per_sm". Sorted by kernel, dtype, M."""
    rows = []
    for body in re.split(r"\n\s*Function : ", sass_text)[1:]:
        header = body.split("\n", 1)[0]
        name = re.search(r"gemv_4bit_(mma_)?kernelI(\w+?)Li(\d+)E", header)
        if name is None:
            continue
        ins = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]
        stream = [a for a, op in ins if "LDG.E.NA.128" in op]
        if not stream:
            continue  # a 16-bit CUDA-core instantiation: only its element-wise path is left
        loop = None  # the innermost backward branch around a streaming load
        for a, op in ins:
            target = re.search(r"BRA (0x[0-9a-f]+)", op)
            if target and int(target.group(1), 16) < a:
                lo = int(target.group(1), 16)
                if any(lo <= s <= a for s in stream) and (loop is None or a - lo < loop[1] - loop[0]):
                    loop = (lo, a)
        assert loop is not None, f"no streaming loop found in {name.group(0)}"
        ops = [op for a, op in ins if loop[0] <= a <= loop[1]]
        chunks = sum("LDG.E.NA.128" in op for op in ops)
        tensor = name.group(1) is not None
        row = {
            "kernel": "tensor cores" if tensor else "CUDA cores", "dtype": DTYPE_NAMES[name.group(2)],
            "M": 8 * int(name.group(3)) if tensor else int(name.group(3)),
            "instructions": len(ops) / chunks, "lds": sum("LDS" in op for op in ops) / chunks,
            "fmul": sum("FMUL" in op or "FFMA" in op for op in ops) / chunks,
            "hmma": sum("HMMA" in op for op in ops) / chunks, "ldg": sum("LDG" in op for op in ops) / chunks,
            "in_flight": _in_flight(ops), "threads": 256 if tensor else 128,
            "wavefronts": sum(_wavefronts(op) for op in ops) / chunks,
        }  # fmt: skip
        regs = (registers or {}).get(header.strip())
        if regs is not None:
            row["registers"], row["blocks_per_sm"] = regs, blocks_per_sm(regs, row["threads"])
        rows.append(row)
    order = list(DTYPE_NAMES.values())
    return sorted(rows, key=lambda r: (r["kernel"] != "tensor cores", order.index(r["dtype"]), r["M"]))


def _of_bandwidth(weights_per_cycle: float, *, sms: int, clock_ghz: float, bandwidth_tbs: float,
                  bytes_per_weight: float) -> float:  # fmt: skip
    """Fraction of `bandwidth_tbs` that an SM consuming `weights_per_cycle` weights a cycle reaches (capped at 1)."""
    needed = bandwidth_tbs * 1e12 / (sms * clock_ghz * 1e9) / bytes_per_weight
    return min(1.0, weights_per_cycle / needed)


def issue_ceiling(instructions_per_chunk: float, **device: float) -> float:
    """Fraction of the bandwidth an issue-bound loop can stream (`device`: see :func:`_of_bandwidth`)."""
    return _of_bandwidth(4 * 32 * 32 / instructions_per_chunk, **device)  # 4 warp-instr/clk, 32 lanes x 32 weights


def l1_ceiling(wavefronts_per_chunk: float, **device: float) -> float:
    """Fraction of the bandwidth the L1 data path (one wavefront a cycle an SM) leaves."""
    return _of_bandwidth(32 * 32 / wavefronts_per_chunk, **device)  # a warp-chunk: 32 lanes x 32 weights


def in_flight_bytes_per_sm(row: dict) -> float:
    """Bytes of W an SM has outstanding: resident blocks x threads x 16-byte loads in flight a lane."""
    return row["blocks_per_sm"] * row["threads"] * row["in_flight"] * 16


def latency_ceiling(row: dict, *, sms: int, bandwidth_tbs: float, latency_ns: float) -> float:
    """Fraction of `bandwidth_tbs` the bytes a full GPU keeps in flight can draw at `latency_ns` (capped at 1)."""
    return min(1.0, sms * in_flight_bytes_per_sm(row) / (bandwidth_tbs * 1e12 * latency_ns * 1e-9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    parser.add_argument("--source", type=Path, default=SOURCE, help="another version of quant4_cuda.cu")
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--clock-ghz", type=float, default=1.98)
    parser.add_argument("--bandwidth-tbs", type=float, default=3.35)
    parser.add_argument("--latency-ns", type=float, default=600.0, help="loaded DRAM latency assumed")
    parser.add_argument("--blocksize", type=int, default=64, help="NF4 blocksize (double-quantised absmax)")
    args = parser.parse_args()
    bytes_per_weight = 0.5 + 1.0 / args.blocksize  # packed nibble + one 8-bit nested absmax per block
    print(f"sm_90 SASS of {args.source}; ceilings for {args.sms} SMs at {args.clock_ghz} GHz, "
          f"{args.bandwidth_tbs} TB/s, {bytes_per_weight:.3f} B/weight, {args.latency_ns:g} ns latency\n")  # fmt: skip
    columns = ["kernel", "x dtype", "M", "instr / chunk", "instr / weight", "LDS", "FMUL+FFMA", "HMMA", "LDG",
               "issue-bound ceiling", "L1 wavefronts / chunk", "L1 ceiling", "registers", "blocks / SM",
               "16-B loads in flight / lane", "KiB in flight / SM", "latency ceiling"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("| --- | --- |" + " ---: |" * (len(columns) - 2))
    device = {"sms": args.sms, "clock_ghz": args.clock_ghz, "bandwidth_tbs": args.bandwidth_tbs,
              "bytes_per_weight": bytes_per_weight}  # fmt: skip
    for r in gemv_loops(*disassemble(args.nvcc, source=args.source)):
        issue, l1 = issue_ceiling(r["instructions"], **device), l1_ceiling(r["wavefronts"], **device)
        latency = latency_ceiling(r, sms=args.sms, bandwidth_tbs=args.bandwidth_tbs, latency_ns=args.latency_ns)
        kib = in_flight_bytes_per_sm(r) / 1024
        m = f"≤ {r['M']}" if r["kernel"] == "tensor cores" else str(r["M"])
        print(f"| {r['kernel']} | {r['dtype']} | {m} | {r['instructions']:.1f} | {r['instructions'] / 32:.2f} | "
              f"{r['lds']:g} | {r['fmul']:g} | {r['hmma']:g} | {r['ldg']:g} | {issue:.0%} | {r['wavefronts']:.1f} | "
              f"{l1:.0%} | {r['registers']} | {r['blocks_per_sm']} | {r['in_flight']:.2f} | {kib:.1f} | "
              f"{latency:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
