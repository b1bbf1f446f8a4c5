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

    python benchmarks/cuda_sass.py            # markdown table for H100 SXM (132 SMs, 1.98 GHz, 3.35 TB/s)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "quant4_cuda.cu"
DTYPE_NAMES = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if path.is_file():
        return str(path)
    found = shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump: neither triton's (backends/nvidia/bin) nor one on PATH")
    return found


def sass(nvcc: str, arch: str = "sm_90") -> str:
    """The SASS of every kernel in quant4_cuda.cu for `arch`."""
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "q.cubin")
        cmd = [nvcc, "-std=c++17", "-O3", "-cubin", f"-arch={arch}", str(SOURCE), "-o", cubin]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        out = subprocess.run([_cuobjdump(), "--dump-sass", cubin], check=True, capture_output=True, text=True)
    return out.stdout


def gemv_loops(sass_text: str) -> list[dict]:
    """Per GEMV instantiation: kernel ("tensor cores" / "CUDA cores"), dtype, M (the largest M it serves),
    and per 16-byte chunk of the streaming loop: instructions, LDS, FP32 multiplies (FMUL + FFMA), HMMA
    and global loads. Sorted by kernel, dtype, M."""
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
        rows.append({
            "kernel": "tensor cores" if tensor else "CUDA cores", "dtype": DTYPE_NAMES[name.group(2)],
            "M": 8 * int(name.group(3)) if tensor else int(name.group(3)),
            "instructions": len(ops) / chunks, "lds": sum("LDS" in op for op in ops) / chunks,
            "fmul": sum("FMUL" in op or "FFMA" in op for op in ops) / chunks,
            "hmma": sum("HMMA" in op for op in ops) / chunks, "ldg": sum("LDG" in op for op in ops) / chunks,
        })  # fmt: skip
    order = list(DTYPE_NAMES.values())
    return sorted(rows, key=lambda r: (r["kernel"] != "tensor cores", order.index(r["dtype"]), r["M"]))


def issue_ceiling(instructions_per_chunk: float, *, sms: int, clock_ghz: float, bandwidth_tbs: float,
                  bytes_per_weight: float) -> float:  # fmt: skip
    """Fraction of `bandwidth_tbs` an issue-bound loop can stream (capped at 1)."""
    weights_per_cycle = 4 * 32 * 32 / instructions_per_chunk  # per SM: 4 warp-instr/clk, 32 lanes x 32 weights
    needed = bandwidth_tbs * 1e12 / (sms * clock_ghz * 1e9) / bytes_per_weight
    return min(1.0, weights_per_cycle / needed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--clock-ghz", type=float, default=1.98)
    parser.add_argument("--bandwidth-tbs", type=float, default=3.35)
    parser.add_argument("--blocksize", type=int, default=64, help="NF4 blocksize (double-quantised absmax)")
    args = parser.parse_args()
    bytes_per_weight = 0.5 + 1.0 / args.blocksize  # packed nibble + one 8-bit nested absmax per block
    print(f"sm_90 SASS of {SOURCE.relative_to(ROOT)}; ceiling for {args.sms} SMs at {args.clock_ghz} GHz, "
          f"{args.bandwidth_tbs} TB/s, {bytes_per_weight:.3f} B/weight\n")  # fmt: skip
    columns = ["kernel", "x dtype", "M", "instr / chunk", "instr / weight", "LDS", "FMUL+FFMA", "HMMA", "LDG",
               "issue-bound ceiling"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in gemv_loops(sass(args.nvcc)):
        ceiling = issue_ceiling(r["instructions"], sms=args.sms, clock_ghz=args.clock_ghz,
                                bandwidth_tbs=args.bandwidth_tbs, bytes_per_weight=bytes_per_weight)  # fmt: skip
        m = f"≤ {r['M']}" if r["kernel"] == "tensor cores" else str(r["M"])
        print(f"| {r['kernel']} | {r['dtype']} | {m} | {r['instructions']:.1f} | {r['instructions'] / 32:.2f} | "
              f"{r['lds']:g} | {r['fmul']:g} | {r['hmma']:g} | {r['ldg']:g} | {ceiling:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
