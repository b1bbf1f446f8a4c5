"""A static sm_90 cost model of fastlora's Triton kernels, and the crossover table of the LoRA size dispatch.

No GPU needed. Every modelled kernel spec of the registry (``fastlora.kernels.specs``) is compiled for
sm_90 exactly as the launcher's JIT builds it at the training shapes (``KernelSpec.runtime_signature``:
int arguments equal to 1 become constants, pointers and multiples of 16 get the divisibility hint), with
the installed triton (the figures) and with the GPU machine's 3.6 (the chosen configs, side by side);
triton's cuobjdump disassembles it, and the main loop is read: the innermost loop doing the most
HGMMA/HMMA FLOP (tensor-core GEMMs: the K loop, not the LoRA term's R loop), else the most FFMA (fp32
GEMMs), else one with a global load (streaming kernels); a kernel with no loop is modelled per program.
Specs that declare no run-time hints (``ones`` empty, ``div16`` None) get the 8B training shapes' hints
here (:func:`_lora_hints`), reported in the output.

Per config and per *unit* (one main-loop iteration of one CTA, or one program) the model counts warp
instructions by class and turns them into SM clocks per resource (assumptions, sm_90, per SM per clock):

- issue: 4 warp-instructions (4 schedulers x 1);
- FMA pipe: FFMA/FMUL/FADD/HFMA2 4 warp-instructions (FMA-heavy + FMA-lite, 32 lanes a scheduler);
  IMAD (all forms, incl. IMAD.MOV) only on FMA-heavy: 2; the pipe's clocks are max((fp32 + imad) / 4, imad / 2);
- ALU pipe: integer/logic (LOP3, SHF, IADD3, VIADD, LEA, ISETP, PRMT, R2P, ...), FSEL/SEL, FSETP/FMNMX,
  F2FP/I2FP conversions: 2 (16 lanes a scheduler);
- XU (MUFU, I2F, F2I, F2F, POPC, FLO): 0.5 (4 lanes a scheduler);
- shared memory: 128 B/clk: LDS/STS/LDSM/STSM bytes (at least one 128-byte wavefront a warp-instruction), the
  shared-memory write of LDGSTS, and HGMMA operand reads: B (k x n) once per wgmma (broadcast to the four
  sub-cores), A (64 x k) too when it comes from shared memory (``gdesc`` first operand);
- L2: global load bytes (at least a 32-byte sector a warp-instruction) against 10 TB/s (A100's documented
  5120 B/clk scaled to 132 SMs at 1.83 GHz gives 11.5; 5.5, a microbenchmark figure, would cap a 128x256x64
  Triton GEMM at 47 %, far under what such kernels measure);
- tensor: dense bf16/fp16 wgmma 4096 FLOP/clk/SM nominal (989 TFLOP/s at 1.83 GHz on 132 SMs), sustaining
  ``TENSOR_EFF`` = 80 % of it (the one calibrated constant, see below); mma.sync (HMMA, the 16-row decode tiles)
  2048; fp32 kernels are measured against the FFMA peak, 256 FLOP/clk/SM.

Each ceiling is the nominal tensor (or FFMA) clocks of a unit over that resource's clocks (capped at 1). When the
wgmma wait depth is 0 (``WARPGROUP.DEPBAR.LE gsb0, 0x0`` in the loop) and one CTA fills an SM, a CTA's
non-tensor work cannot run under its own MMA: the *overlap* bound adds the two. *Latency*: a loop
whose global loads are used in the same iteration (plain LDG) exposes one memory latency per iteration
per CTA on the SM (an L2 hit, 300 clocks, when other M tiles read the same W tile; 600 ns from DRAM when
one M tile does, i.e. decode); loads staged by cp.async (LDGSTS) ``num_stages - 1`` deep expose
latency / (stages - 1). The kernel's ceiling is the smallest.

Calibration: with every other resource as counted, a plain Triton 128x256x64 GEMM would be bound only by
shared memory at 95 % of peak; cuBLAS measures 70-80 % on H100, so wgmma is taken to sustain 80 % of its
nominal rate (sustained clock under tensor load, wgmma issue gaps), which lands that GEMM at 77 %.

Time of one kernel at (M, N, K): CTAs = ceil(M / BM) ceil(N / BN) spread over 132 SMs; the busiest SM runs
ceil(CTAs / 132) of them, ceil(K / BK) units each, at the bounding resource's clocks (latency divided by
the CTAs it holds at once), plus 0.5 us a wave of CTAs (prologue and epilogue); the kernel takes at least
its HBM bytes at the copy bandwidth, plus 1 us launch. cuBLAS GEMMs run at the efficiency this model
gives a plain Triton bf16 GEMM with a standard good config (``calibration``, 128x256x64, 8 warps, 3
stages; cuBLAS reaches 70-80 % of peak on H100), memory-bound passes at the copy bandwidth (90 % of the
HBM figure), and fastlora's dequantisation kernel at its own modelled fraction of HBM (see
:func:`dequant_fraction`).

Clock: 1.83 GHz, the clock at which NVIDIA's 989 TFLOP/s dense bf16 figure holds (132 x 4096 x 1.83e9);
the 1.98 GHz boost is not sustained under tensor load (power-capped). H200: same SMs and clock, 4.8 TB/s.

    python benchmarks/triton_sass.py --out benchmarks/results/static-sm90-2026-12-02 --write-crossover
    python benchmarks/triton_sass.py --out DIR --write-budgets   # also refresh DIR/budgets.json (chosen configs)
    python benchmarks/triton_sass.py --rev a1508a5 --out DIR      # the kernels of a git revision
    python benchmarks/triton_sass.py --cache FILE ...             # reuse the compile results of an earlier run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sass_common beside this file (run as a script or by path)
from sass_common import blocks_per_sm, cuobjdump, functions, innermost_loop, instructions, opcode

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "static-sm90-2026-12-02"
CROSSOVER_FILE = ROOT / "fastlora" / "ops" / "crossover_table.py"
GPU_TRITON = ROOT / ".venv" / "gpu-triton"

# ----------------------------------------------------------------------------------------------- assumptions


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    hbm_tbs: float
    sms: int = 132
    clock_ghz: float = 1.83
    l2_tbs: float = 10.0  # L2 -> SM: A100's documented 5120 B/clk scaled to 132 SMs at 1.83 GHz is 11.5 TB/s
    latency_ns: float = 600.0  # loaded DRAM latency
    l2_latency_clk: float = 300.0  # L2 hit (a W tile other CTAs already read)

    @property
    def hbm_per_clk(self) -> float:
        """HBM bytes per clock per SM."""
        return self.hbm_tbs * 1e12 / (self.sms * self.clock_ghz * 1e9)

    @property
    def l2_per_clk(self) -> float:
        return self.l2_tbs * 1e12 / (self.sms * self.clock_ghz * 1e9)

    @property
    def latency_clk(self) -> float:
        return self.latency_ns * self.clock_ghz


H100 = Device("H100 SXM", 3.35)
H200 = Device("H200", 4.8)
TENSOR_FLOP_CLK = 4096  # dense bf16/fp16 wgmma FLOP per clock per SM (nominal)
TENSOR_EFF = 0.80  # the one calibrated constant: wgmma's sustained fraction of nominal (see calibration)
FFMA_FLOP_CLK = 256  # fp32 FFMA: 128 lanes x 2
HMMA_FLOP_CLK = 2048  # mma.sync (HMMA) on sm_90: assumed half the wgmma rate
PIPE_RATE = {"issue": 4.0, "alu": 2.0, "xu": 0.5}  # warp-instructions per clock per SM
SMEM_B_CLK = 128
COPY_EFF = 0.90  # fraction of the HBM figure a copy kernel reaches (H100: ~3.0 of 3.35 TB/s)
LAUNCH_US = 1.0  # per kernel: launch gap and ramp
WAVE_US = 0.5  # per wave of CTAs of a Triton kernel: first loads and the epilogue's store
CUBLAS_FP32_EFF = 0.80  # cuBLAS SGEMM (no TF32) against the FFMA peak
DEQUANT_FALLBACK = 0.85  # fraction of the copy bandwidth assumed when the dequant kernel is not registered
ASSUMPTIONS = (
    "H100 SXM: 132 SMs, 1.83 GHz (NVIDIA's 989 TFLOP/s dense bf16 = 132 x 4096 FLOP/clk x 1.83 GHz; the 1.98 GHz "
    "boost is not sustained under tensor load), HBM 3.35 TB/s; H200: same SMs and clock, HBM 4.8 TB/s; "
    "L2 to SMs 10 TB/s (A100's 5120 B/clk scaled to 132 SMs and 1.83 GHz: 11.5); "
    "loaded memory latency 600 ns; copy kernels reach 90 % of the HBM figure; per SM per clock: 4 issue, FP32 4 "
    "(IMAD 2, FMA-heavy only), ALU 2 (integer, logic, select, F2FP/I2FP), XU 0.5 warp-instructions, shared memory "
    "128 B (HGMMA operand reads included); 1 us a kernel launch, 0.5 us a wave of Triton CTAs"
)

# ----------------------------------------------------------------------------------------- SASS -> counts

CLASSES = ("tensor", "fp32", "imad", "int_alu", "select", "convert", "xu", "global", "shared", "barrier", "branch",
           "uniform", "other")  # fmt: skip
_INT_ALU = (
    "LOP",
    "SHF",
    "IADD",
    "VIADD",
    "LEA",
    "ISETP",
    "PRMT",
    "R2P",
    "P2R",
    "IMNMX",
    "VIMNMX",
    "IABS",
    "PLOP3",
    "BMSK",
    "SGXT",
    "FSETP",
    "FMNMX",
    "MOV",
    "SHL",
    "SHR",
    "BFE",
    "BFI",
    "HSETP2",
    "HMNMX2",
    "LOP3",
    "ICMP",
)


def classify(opc: str) -> str:
    """Class of one opcode (predicate stripped, modifiers kept), see ``CLASSES``."""
    base = opc.split(".")[0]
    if base in ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA"):
        return "tensor"
    if base in ("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "FFMA2", "FMUL2", "FADD2"):
        return "fp32"
    if base in ("IMAD", "IMUL", "IMADSP"):
        return "imad"
    if base in ("FSEL", "SEL"):
        return "select"
    if base in ("F2FP", "I2FP"):
        return "convert"
    if base in ("MUFU", "I2F", "F2I", "F2F", "FRND", "POPC", "FLO", "BREV"):
        return "xu"
    if base in ("LDG", "LDGSTS", "STG", "ATOMG", "RED", "ATOM", "UTMALDG", "UTMASTG", "LDGDEPBAR", "UBLKCP"):
        return "global" if base != "LDGDEPBAR" else "barrier"
    if base in ("LDS", "STS", "LDSM", "STSM", "ATOMS"):
        return "shared"
    if base in ("BAR", "DEPBAR", "WARPGROUP", "MEMBAR", "FENCE", "SYNCS", "WARPSYNC", "BSSY", "BSYNC", "ARRIVES",
                "ERRBAR", "CCTL", "NANOSLEEP", "VOTE", "VOTEU", "ELECT"):  # fmt: skip
        return "barrier"
    if base in ("BRA", "EXIT", "RET", "CALL", "JMP", "BRX", "JMX"):
        return "branch"
    if base.startswith("U") or base in ("R2UR", "S2UR", "LDCU"):
        return "uniform"
    if base in _INT_ALU or base.startswith(("LOP", "SHF", "IADD", "ISETP")):
        return "int_alu"
    return "other"  # S2R, CS2R, LDC, NOP, ...


def _width_bytes(opc: str, default: int = 4) -> int:
    """Bytes a lane moves: .128 16, .64 8, .U8/.S8 1, .U16/.S16 2, else ``default``."""
    for token, size in ((".128", 16), (".64", 8), (".U8", 1), (".S8", 1), (".U16", 2), (".S16", 2)):
        if token in opc:
            return size
    return default


def shared_bytes(opc: str) -> int:
    """Shared-memory bytes of one warp-instruction (a wavefront, 128 B, at least); LDGSTS: its shared write."""
    base = opc.split(".")[0]
    if base in ("LDSM", "STSM"):
        count = re.search(r"\.(\d)\b", opc.replace(".M88", "").replace(".MT88", "").replace(".16", ""))
        return 128 * (int(count.group(1)) if count else 1)
    if base in ("LDS", "STS", "LDGSTS"):
        return max(128, 32 * _width_bytes(opc))
    return 0


def global_bytes(opc: str) -> tuple[int, int]:
    """(loaded, stored) global bytes of one warp-instruction, at least a 32-byte sector."""
    base = opc.split(".")[0]
    size = max(32, 32 * _width_bytes(opc))
    if base in ("LDG", "LDGSTS"):
        return size, 0
    if base in ("STG", "RED", "ATOMG"):
        return 0, size
    return 0, 0


_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32\.(\w+)")


def hgmma_info(op: str) -> tuple[int, int]:
    """(FLOP, shared-memory operand bytes) of one wgmma (a warpgroup's HGMMA)."""
    m = _HGMMA.search(op)
    if m is None:
        return 0, 0
    mm, nn, kk = int(m.group(1)), int(m.group(2)), int(m.group(3))
    elem = {"BF16": 2, "F16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1}.get(m.group(4).split(".")[0], 2)
    operands = op.split(None, 1)[1] if " " in op.strip() else ""
    if operands.startswith("@"):
        operands = operands.split(None, 1)[1]
    a_in_shared = operands.split(",")[1].strip().startswith("gdesc") if "," in operands else True
    smem = kk * nn * elem + (mm * kk * elem if a_in_shared else 0)
    return 2 * mm * nn * kk, smem


_HMMA = re.compile(r"HMMA\.(16816|1688|884)\.F32")


def _hmma_flop(op: str) -> int:
    """FLOP of one warp's HMMA (mma.sync): m16n8k16, m16n8k8."""
    m = _HMMA.search(op)
    return {"16816": 2 * 16 * 8 * 16, "1688": 2 * 16 * 8 * 8, "884": 2 * 8 * 8 * 4}[m.group(1)] if m else 0


def _main_loop(ins: list[tuple[int, str]], weight=None) -> tuple[int, int] | None:
    """The innermost loop doing the most tensor-core FLOP (the K loop, not the LoRA term's R loop), or the most
    of ``weight(op)`` when given (e.g. FFMA for the fp32 kernels)."""
    weight = weight or (lambda op: hgmma_info(op)[0] * 4 + _hmma_flop(op))
    branches = []
    for a, op in ins:
        target = re.search(r"BRA(?:\.\w+)* (0x[0-9a-f]+)", op)
        if target and int(target.group(1), 16) < a:
            branches.append((int(target.group(1), 16), a))
    best, best_flop = None, 0
    for lo, hi in branches:
        if any(lo <= t and b < hi and (t, b) != (lo, hi) for t, b in branches):
            continue  # holds another loop: not innermost
        flop = sum(weight(op) for a, op in ins if lo <= a <= hi)
        if flop > best_flop:
            best, best_flop = (lo, hi), flop
    return best


def _used_same_iteration(loop: list[str], i: int) -> bool:
    """True when the destination of the load at ``loop[i]`` is read before the loop's back edge."""
    dest = re.search(r"LDG\S*\s+(R\d+)", loop[i])
    if dest is None:
        return False
    reg = dest.group(1)
    for op in loop[i + 1 :]:
        parts = op.split(",", 1)
        if (len(parts) > 1 and re.search(rf"\b{reg}\b", parts[1])) or re.search(rf"\[{reg}\b", op):
            return True
    return False


def analyse_sass(body: str, *, num_warps: int, num_stages: int) -> dict:
    """Per-unit counts of one kernel's SASS body (one function of ``cuobjdump --dump-sass``).

    Returns: "loop" ("mma" / "ffma" / "stream" / "program"), "length" (instructions a warp a unit),
    "counts" (class -> warp-instructions of one warp), "flop" (per CTA unit), "tensor_kind",
    "smem_bytes", "l2_bytes", "store_bytes" (per CTA unit), "hgmma" (per warpgroup a unit), "wgmma"
    (shapes), "wait_depth" (None without wgmma), "sync_loads" (a plain global load used in its iteration).
    """
    ins = instructions(body)
    loop, kind = _main_loop(ins), "mma"
    if loop is None:
        loop, kind = _main_loop(ins, lambda op: opcode(op).startswith("FFMA")), "ffma"
    if loop is None:
        loop, kind = innermost_loop(ins, lambda op: opcode(op).startswith(("LDG", "LDGSTS"))), "stream"
    if loop is None:
        kind = "program"
    if loop is None:
        ops = [op for _, op in ins]
        while ops and opcode(ops[-1]) in ("BRA", "NOP"):  # the trailing self-branch and padding
            ops.pop()
    else:
        ops = [op for a, op in ins if loop[0] <= a <= loop[1]]
    opcs = [opcode(op) for op in ops]
    counts = dict.fromkeys(CLASSES, 0)
    for o in opcs:
        counts[classify(o)] += 1
    warpgroups = max(1, num_warps // 4)
    flop = smem_mma = 0
    shapes = sorted({m.group(0) for m in map(_HGMMA.search, ops) if m})
    shapes += sorted({m.group(0) for m in map(_HMMA.search, ops) if m})
    for op in ops:
        f, s = hgmma_info(op)
        flop += f * warpgroups + _hmma_flop(op) * num_warps
        smem_mma += s
    tensor_kind = "wgmma" if any("HGMMA" in o for o in opcs) else "mma.sync" if flop else "ffma"
    if not flop:
        flop = 2 * 32 * num_warps * sum(o.startswith("FFMA") for o in opcs)
    waits = [
        int(m.group(1), 16) for m in (re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", op) for op in ops) if m
    ]
    loads = stores = smem = 0
    for o in opcs:
        ld, st = global_bytes(o)
        loads += ld
        stores += st
        smem += shared_bytes(o)
    sync = any(opcode(op).startswith("LDG") and _used_same_iteration(ops, i) for i, op in enumerate(ops))
    return {
        "loop": kind, "length": len(ops), "counts": counts, "flop": flop, "tensor_kind": tensor_kind,
        "hgmma": sum(o.startswith("HGMMA") for o in opcs), "wgmma": shapes,
        "wait_depth": min(waits) if waits else None,
        "smem_bytes": smem * num_warps + smem_mma * warpgroups, "l2_bytes": loads * num_warps,
        "store_bytes": stores * num_warps, "sync_loads": sync,
    }  # fmt: skip


def _peak(a: dict) -> float:
    """Nominal FLOP a clock an SM for the kernel's instruction kind."""
    return {"wgmma": TENSOR_FLOP_CLK, "mma.sync": HMMA_FLOP_CLK}.get(a["tensor_kind"], FFMA_FLOP_CLK)


def resource_clocks(a: dict, num_warps: int) -> dict[str, float]:
    """SM clocks one unit of one CTA takes on each resource (see the module docstring)."""
    c = {k: v * num_warps for k, v in a["counts"].items()}
    peak = _peak(a) * (TENSOR_EFF if a["tensor_kind"] != "ffma" else 1.0)
    return {
        "tensor": a["flop"] / peak,
        "issue": sum(c.values()) / PIPE_RATE["issue"],
        "fma": max((c["fp32"] + c["imad"]) / 4, c["imad"] / 2),
        "alu": (c["int_alu"] + c["select"] + c["convert"]) / PIPE_RATE["alu"],
        "xu": c["xu"] / PIPE_RATE["xu"],
        "smem": a["smem_bytes"] / SMEM_B_CLK,
    }


def unit_clocks(a: dict, dev: Device, ctas_at_once: int, latency_clk: float | None = None) -> dict[str, float]:
    """Per-resource clocks of one unit (at the SM level) with ``ctas_at_once`` CTAs resident, plus "l2",
    "overlap" (wait depth 0 with one CTA: tensor + the non-tensor work) and "latency"; "bound" the largest."""
    r = resource_clocks(a, a["num_warps"])
    r["l2"] = a["l2_bytes"] / dev.l2_per_clk
    busy = max(r["issue"], r["fma"], r["alu"], r["xu"])
    serial = a["wait_depth"] == 0 and ctas_at_once <= 1 and a["tensor_kind"] == "wgmma"
    r["overlap"] = r["tensor"] + busy if serial else max(r["tensor"], busy)
    depth = 1.0 if a["sync_loads"] or a["loop"] == "program" else max(1, a["num_stages"] - 1)
    latency = dev.l2_latency_clk if latency_clk is None else latency_clk
    r["latency"] = latency / depth / max(1, ctas_at_once) if a["l2_bytes"] else 0.0
    r["bound"] = max(r.values())
    return r


def ceilings(a: dict, dev: Device) -> dict[str, float]:
    """Fractions of peak (tensor, or FFMA for fp32 kernels) each resource allows, at full occupancy, the loads
    hitting L2 (large M: every W tile is read by several CTAs)."""
    r = unit_clocks(a, dev, a["ctas_per_sm"])
    nominal = a["flop"] / _peak(a)
    return {k: min(1.0, nominal / v) if v else 1.0 for k, v in r.items()}


def stream_bytes(a: dict) -> float:
    """HBM bytes one program of a streaming kernel moves: for the chunked dequantisation (``CHUNKS`` 16-byte
    chunks of 32 weights) the packed bytes, one nested absmax a 64-weight block and the output; otherwise its
    global loads and stores as compiled (a table read through L1 would count: an overestimate)."""
    chunks = a["tile"].get("CHUNKS")
    if chunks:
        out = 4 if "float32" in a["name"] else 2
        return chunks * (16 + 32 * out + 0.5)
    return a["l2_bytes"] + a["store_bytes"]


def stream_ceilings(a: dict, dev: Device, cap: bool = True) -> dict[str, float]:
    """Fractions of the HBM figure a streaming kernel (e.g. dequantisation) can draw per resource: issue and
    pipes, the L1 data path (every global load and shared access at 128 B a clock), and latency (a program's
    loads in flight from DRAM, the CTAs an SM holds: Little's law)."""
    r = unit_clocks(a, dev, a["ctas_per_sm"], dev.latency_clk)
    r["l1"] = (a["l2_bytes"] + a["smem_bytes"]) / SMEM_B_CLK
    moved = stream_bytes(a)
    skip = ("tensor", "l2", "overlap", "bound", "smem")
    out = {k: moved / v / dev.hbm_per_clk if v else math.inf for k, v in r.items() if k not in skip}
    out["bound"] = min(out.values())
    return {k: min(1.0, v) for k, v in out.items()} if cap else out


# ------------------------------------------------------------------------------------------------ compiling


@triton.jit
def calibration_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """A plain Triton bf16 GEMM C = A B (grouped tile order, masked K tail): the model's calibration."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    c = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


CALIBRATION = "calibration_gemm[bf16,128x256x64,w8,s3]"


def _calibration_spec():
    from fastlora.kernels.specs import KernelSpec

    ints = ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn")
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", **dict.fromkeys(ints, "i32")}
    sig.update(dict.fromkeys(("BM", "BN", "BK", "GROUP_M"), "constexpr"))
    return KernelSpec(
        name=CALIBRATION,
        fn=calibration_gemm_kernel,
        signature=sig,
        constexprs={"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8},
        num_warps=8,
        num_stages=3,
        tensor_core=True,
        ones=("stride_ak", "stride_bn", "stride_cn"),
        div16=("a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "stride_am", "stride_bk", "stride_cm"),
    )


def _lora_hints(spec):
    """The run-time specialisation of a lora_matmul spec at the 8B training shapes (contiguous x, u, out; the
    forward's B (N, r) read as L = Bᵀ, the input gradient's A (r, K) as L = A; dense W: the forward's strides),
    used while the spec itself declares none (``ones`` empty and ``div16`` None)."""
    if spec.ones or spec.div16 is not None or not spec.name.startswith("lora_matmul["):
        return spec, False
    fwd = "-dx" not in spec.name
    ones = ["stride_xk", "stride_ur", "stride_on", "stride_lr" if fwd else "stride_ln"]
    if ",dense," in spec.name:
        ones.append("stride_wk")
    ints = ("M", "N", "K", "R", "M_BUCKET", "stride_xm", "stride_wk", "stride_wn", "W_ROWS", "W_COLS", "stride_um",
            "stride_lr", "stride_ln", "stride_om")  # fmt: skip
    pointers = [n for n, t in spec.signature.items() if t.startswith("*")]
    div16 = tuple(n for n in (*pointers, *ints) if n in spec.signature and n not in ones)
    return dataclasses.replace(spec, ones=tuple(o for o in ones if o in spec.signature), div16=div16), True


def modelled_specs() -> list:
    """The specs the model compiles: the fused LoRA GEMM (bf16 and fp32, dense W and aligned NF4 with double
    quantisation, dropout off; fp16 has bf16's wgmma rate and is modelled by it),
    fastlora's chunked dequantisation kernel when registered, and
    the calibration GEMM. New kernels and configs of these families are picked up from the registry."""
    import importlib

    import fastlora.kernels  # noqa: F401  (registers the specs)
    from fastlora.kernels import specs

    with contextlib.suppress(ImportError):
        importlib.import_module("fastlora.kernels.dequant")
    chosen = []
    for s in specs.registered():
        if "[float16," in s.name:
            continue
        if (s.name.startswith("lora_matmul[") and not re.search(r"-any|-drop|nf4-aligned|fp4", s.name)) or (
            s.name.startswith("dequant_chunks[") and "nested=True" in s.name and "fp4" not in s.name
        ):
            chosen.append(s)
    return [*chosen, _calibration_spec()]


_SPECS: list = []


def _compile_one(index: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec, overridden = _lora_hints(_SPECS[index])
    out = {
        "name": spec.name,
        "triton": triton.__version__,
        "hints_overridden": overridden,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "tile": {k: v for k, v in spec.constexprs.items() if k in ("BM", "BN", "BK", "BR", "CHUNKS", "GROUP_M")},
    }
    try:
        signature, constexprs, attrs = spec.runtime_signature()
        src = ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True).stdout
            sass = subprocess.run([cuobjdump(), "--dump-sass", path], capture_output=True, text=True).stdout
        (body,) = functions(sass).values()
        out["registers"] = int(re.search(r"REG:(\d+)", usage).group(1))
        out["stack"] = int(re.search(r"STACK:(\d+)", usage).group(1))
        out["shared"] = int(compiled.metadata.shared)
        out.update(analyse_sass(body, num_warps=spec.num_warps, num_stages=spec.num_stages))
        out["ok"] = True
    except Exception as e:  # report, keep going
        out.update(ok=False, error=f"{type(e).__name__}: {e}"[:1000])
    return out


def _worker(names: list[str]) -> None:
    global _SPECS
    by_name = {s.name: s for s in modelled_specs()}
    _SPECS = [by_name[n] for n in names if n in by_name]
    json.dump([_compile_one(i) for i in range(len(_SPECS))], sys.stdout)


def compile_all(names: list[str] | None = None, gpu_triton: bool = False, source: Path | None = None) -> list[dict]:
    """Compile ``names`` (default: every modelled spec) for sm_90 in a subprocess (no TRITON_INTERPRET), with the
    installed triton or the GPU machine's (``.venv/gpu-triton``); one result dict per spec, "ok" False on failure."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    path = [str(GPU_TRITON)] if gpu_triton else []
    path += [str(source)] if source else []  # another revision's fastlora (--rev)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*path, env.get("PYTHONPATH")]))
    if names is None:
        cmd = [sys.executable, __file__, "--worker-list"]
        names = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", check=True).stdout)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(names)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=1800)  # fmt: skip
    if not proc.stdout:
        raise RuntimeError(proc.stderr[-4000:])
    rows = json.loads(proc.stdout)
    for r in rows:
        if r.get("ok"):
            threads = 32 * r["num_warps"]
            per_warp = -(-r["registers"] * 32 // 256) * 256
            r["cta_limits"] = {"registers": 65536 // (per_warp * r["num_warps"]), "threads": 2048 // threads,
                               "shared": (228 * 1024) // (r["shared"] + 1024)}  # fmt: skip
            r["ctas_per_sm"] = blocks_per_sm(r["registers"], threads, r["shared"])
    return rows


# ------------------------------------------------------------------------------------------- layer model

ESIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
TL_NAME = {"bf16": "bfloat16", "fp16": "bfloat16", "fp32": "float32"}  # fp16: bf16's figures (same wgmma rate)
RANK = 16
SHAPES_8B = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N) = (in_features, out_features)
CROSSOVER_SHAPES = (*SHAPES_8B, (2048, 2048), (4096, 11008), (11008, 4096), (5120, 5120), (8192, 8192),
                    (8192, 28672), (28672, 8192))  # fmt: skip
LAYER_MS = (1, 16, 64, 256, 4096, 8192)
CROSSOVER_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def w4_bytes(n: int, k: int, blocksize: int = 64) -> float:
    """Bytes of a double-quantised 4-bit (N, K) W: nibbles, one uint8 absmax a block, an fp32 per 256 blocks."""
    return n * k * 0.5 + n * k / blocksize + n * k / blocksize / 256 * 4


class Model:
    """Times (us) of every pass of a LoRA linear on one device, from the compiled kernels' analyses."""

    def __init__(self, rows: list[dict], dev: Device):
        self.rows = {r["name"]: r for r in rows if r.get("ok")}
        self.dev = dev
        cal = self.rows.get(CALIBRATION)
        m = 8192
        self.cublas_eff = (2 * m**3 / (self.kernel_us(cal, m, m, m, 0) * 1e-6) / self.tensor_flops()) if cal else 0.75

    def tensor_flops(self) -> float:
        return TENSOR_FLOP_CLK * self.dev.sms * self.dev.clock_ghz * 1e9

    def copy_us(self, nbytes: float) -> float:
        return nbytes / (self.dev.hbm_tbs * 1e12 * COPY_EFF) * 1e6

    def kernel_us(self, a: dict, m: int, n: int, k: int, nbytes: float, r: int = 0) -> float:
        """A Triton GEMM-like kernel over an (m, n) output and inner size k (+ r LoRA steps)."""
        t = a["tile"]
        bm, bn, bk = t["BM"], t["BN"], t["BK"]
        ctas = math.ceil(m / bm) * math.ceil(n / bn)
        per_sm = math.ceil(ctas / self.dev.sms)
        occ = max(1, a["ctas_per_sm"])
        conc = min(occ, per_sm)
        latency = self.dev.l2_latency_clk if math.ceil(m / bm) > 1 else self.dev.latency_clk
        clocks = unit_clocks(a, self.dev, conc, latency)
        units = math.ceil(k / bk) * (2 * bm * bn * bk / a["flop"])
        lora = 2 * 2 * bm * bn * r / (_peak(a) * (TENSOR_EFF if a["tensor_kind"] != "ffma" else 1.0))
        clk = per_sm * (units * clocks["bound"] + lora)
        compute = clk / (self.dev.clock_ghz * 1e3) + math.ceil(per_sm / occ) * WAVE_US
        return max(compute, self.copy_us(nbytes)) + LAUNCH_US

    def fused_us(self, kind: str, dt: str, m: int, n: int, k: int, wbytes: float) -> tuple[float, str]:
        """The fused kernel (fastest of its configs, as the autotuner picks): out (m, n), inner k."""
        e = ESIZE[dt]
        nbytes = (m * k + m * n + m * RANK + n * RANK) * e + wbytes
        prefix = f"lora_matmul[{TL_NAME[dt]},{kind},cfg"
        best = (math.inf, "")
        for name, a in self.rows.items():
            if name.startswith(prefix) and a["flop"]:
                best = min(best, (self.kernel_us(a, m, n, k, nbytes, RANK), name))
        return best

    def gemm_us(self, m: int, n: int, k: int, dt: str, c_operand: bool = False) -> float:
        """cuBLAS: the calibrated efficiency (bf16/fp16) or CUBLAS_FP32_EFF of the FFMA peak (fp32)."""
        e = ESIZE[dt]
        nbytes = (m * k + n * k + m * n * (2 if c_operand else 1)) * e
        if dt == "fp32":
            rate = FFMA_FLOP_CLK * self.dev.sms * self.dev.clock_ghz * 1e9 * CUBLAS_FP32_EFF
        else:
            rate = self.tensor_flops() * self.cublas_eff
        return max(2 * m * n * k / rate * 1e6, self.copy_us(nbytes)) + LAUNCH_US

    def mem_us(self, nbytes: float) -> float:
        return self.copy_us(nbytes) + LAUNCH_US

    def dequant_fraction(self, dt: str) -> tuple[float, str]:
        """Fraction of the HBM figure fastlora's dequantisation reaches: its SASS model (capped at the copy
        bandwidth) when ``dequant_chunks`` is registered, else DEQUANT_FALLBACK of the copy bandwidth."""
        cands = [
            a
            for n, a in self.rows.items()
            if n.startswith(f"dequant_chunks[{TL_NAME[dt]},") and "nested=True" in n and "fp4" not in n
        ]
        table = [a for a in cands if "table=True" in a["name"]] or cands
        if not table:
            return COPY_EFF * DEQUANT_FALLBACK, "assumed"
        return min(COPY_EFF, stream_ceilings(table[0], self.dev)["bound"]), table[0]["name"]

    def dequant_us(self, n: int, k: int, dt: str, who: str = "fastlora") -> float:
        frac = self.dequant_fraction(dt)[0] if who == "fastlora" else COPY_EFF
        nbytes = w4_bytes(n, k) + n * k * ESIZE[dt]
        return nbytes / (self.dev.hbm_tbs * 1e12 * frac) * 1e6 + LAUNCH_US


PATHS = ("fused", "dequant_gemm", "dequant_gemm_kext", "unsloth", "peft")


def passes(model: Model, path: str, op: str, m: int, k: int, n: int, quant: str = "nf4", dt: str = "bf16") -> list:
    """[(pass, HBM bytes, us)] of one op ("fwd", "dx", "grads") of a LoRA linear (x (m, k), W (n, k), r = 16) on
    one path. Competitors' dequantisation is modelled at the copy bandwidth (optimistic for them)."""
    e, r = ESIZE[dt], RANK
    four = quant != "dense"
    wb = w4_bytes(n, k) if four else n * k * e
    mn, mk, mr = m * n * e, m * k * e, m * r * e
    out = []

    def mem(label, nbytes):
        out.append((label, nbytes, model.mem_us(nbytes)))

    def deq(who="fastlora"):
        if four:
            out.append((f"dequant W ({who})", wb + n * k * e, model.dequant_us(n, k, dt, who)))

    kind = "nf4-nested-aligned" if four else "dense"
    if op == "fwd":
        if path in ("fused", "dequant_gemm", "dequant_gemm_kext"):
            mem("u = d(x) Aᵀ", mk + mr + r * k * e)
        if path == "fused":
            t, cfg = model.fused_us(f"{kind}-fwd" if four else "dense", dt, m, n, k, wb)
            out.append((f"fused [x|s·u]·[Wᵀ;Bᵀ] ({cfg})", mk + wb + mr + mn, t))
        elif path == "dequant_gemm":
            deq()
            mem("C = s·u·Bᵀ + b", mr + n * r * e + mn)
            out.append(("cuBLAS C += x·W_dqᵀ (reads C)", mk + n * k * e + 2 * mn, model.gemm_us(m, n, k, dt, True)))
        elif path == "dequant_gemm_kext":
            deq()
            t, cfg = model.fused_us("dense", dt, m, n, k, n * k * e)
            out.append((f"Triton [x|s·u]·[W_dqᵀ;Bᵀ] ({cfg})", mk + n * k * e + mr + mn, t))
        elif path == "unsloth":
            deq("bnb")
            out.append(("cuBLAS y = x·W_dqᵀ", mk + n * k * e + mn, model.gemm_us(m, n, k, dt)))
            mem("xa = x·Aᵀ", mk + mr)
            mem("y.addmm_(xa, Bᵀ, alpha=s)", 2 * mn + mr)
        elif path == "peft":
            deq("bnb")
            out.append(("cuBLAS y = x·W_dqᵀ", mk + n * k * e + mn, model.gemm_us(m, n, k, dt)))
            mem("result.clone()", 2 * mn)
            mem("lora_A(x)", mk + mr)
            mem("lora_B(·)", mr + mn)
            mem("· x scaling", 2 * mn)
            mem("result + ·", 3 * mn)
    elif op == "dx":
        if path == "fused":
            t, cfg = model.fused_us(f"{kind}-dx" if four else _dense_dx(model, dt), dt, m, k, n, wb)
            out.append((f"fused [g|v]·[W;A] ({cfg})", mn + wb + mr + mk, t))
        elif path == "dequant_gemm":
            deq()
            mem("C = d'(v·A)", mr + r * k * e + mk)
            out.append(("cuBLAS C += g·W_dq (reads C)", mn + n * k * e + 2 * mk, model.gemm_us(m, k, n, dt, True)))
        elif path == "dequant_gemm_kext":
            deq()
            t, cfg = model.fused_us(_dense_dx(model, dt), dt, m, k, n, n * k * e)
            out.append((f"Triton [g|v]·[W_dq;A] ({cfg})", mn + n * k * e + mr + mk, t))
        elif path == "unsloth":
            deq("bnb")
            out.append(("cuBLAS dx = g·W_dq", mn + n * k * e + mk, model.gemm_us(m, k, n, dt)))
            mem("dx.addmm_(v, A, alpha=s)", 2 * mk + mr)
        elif path == "peft":
            deq("bnb")
            mem("grad · scaling", 2 * mn)
            out.append(("cuBLAS dx = g·W_dq", mn + n * k * e + mk, model.gemm_us(m, k, n, dt)))
            mem("dx_lora = v·A", mr + mk)
            mem("dx + dx_lora", 3 * mk)
    elif op == "grads":
        if path in ("dequant_gemm", "dequant_gemm_kext"):
            mem("v = s·g·B, dB = s·gᵀ·u (one pass over g)", mn + 2 * mr + n * r * e)
        else:
            mem("v = s·g·B", mn + mr)
            mem("dB = s·gᵀ·u", mn + mr + n * r * e)
        mem("dA = vᵀ·d(x)", mk + mr + r * k * e)
    return out


def _dense_dx(model: Model, dt: str) -> str:
    """The dense input-gradient variant's name ("dense-dx" once registered, else "dense")."""
    return "dense-dx" if any(n.startswith(f"lora_matmul[{TL_NAME[dt]},dense-dx,") for n in model.rows) else "dense"


def op_us(model: Model, path: str, op: str, m: int, k: int, n: int, quant: str = "nf4", dt: str = "bf16") -> float:
    return sum(t for _, _, t in passes(model, path, op, m, k, n, quant, dt))


DORA_SMALL_OPS = 18  # launches of dora_weight_norm / dora_linear on (N, r), (r, r), (N,) tensors (fastlora/ops/dora.py)


def dora_passes(
    model: Model, m: int, k: int, n: int, quant: str = "nf4", dt: str = "bf16", fused: bool = False
) -> list:
    """[(op, pass, HBM bytes, us)] that DoRA adds to a LoRA linear (fastlora/ops/dora.py: the norm from ‖W‖² (cached),
    2s·B⊙(W·Aᵀ) and s²·B(AAᵀ)Bᵀ, then y = z ⊙ g with g = m / ‖W + s·BA‖ detached). ``fused=False``: as implemented
    (autograd's elementwise passes over [M, N]); ``fused=True``: the floor when g is folded into the dequantised W's
    and B's rows (forward and dx need no [M, N] pass) and dm = Σ_M dy ⊙ z reads z inside the pass that reads dy."""
    e, r = ESIZE[dt], RANK
    four = quant != "dense"
    wb = w4_bytes(n, k) if four else n * k * e
    mn = m * n * e
    t, cfg = model.fused_us("nf4-nested-aligned-fwd" if four else "dense", dt, r, n, k, wb)
    out = [("fwd", f"W·Aᵀ (N, r): the fused kernel at M = r = {r} over the packed W ({cfg})", wb + r * (k + n) * e, t)]
    small = (r * k + 3 * n * r + r * r + 2 * n) * 4
    out.append(("fwd", f"norm and g on (N, r)/(N,) tensors ({DORA_SMALL_OPS} launches)", small,
                DORA_SMALL_OPS * LAUNCH_US + model.copy_us(small)))  # fmt: skip
    if fused:
        out.append(("bwd", "dm = Σ_M dy ⊙ z: z read beside dy in the v/dB pass", mn, model.copy_us(mn)))
        return out
    out.append(("fwd", "y = z ⊙ g", 2 * mn, model.mem_us(2 * mn)))
    out.append(("bwd", "dz = dy ⊙ g", 2 * mn, model.mem_us(2 * mn)))
    out.append(("bwd", "dy ⊙ z (the gradient of g)", 3 * mn, model.mem_us(3 * mn)))
    out.append(("bwd", "Σ_M (dy ⊙ z) -> dm", mn + n * 4, model.mem_us(mn + n * 4)))
    return out


def crossover(model: Model, quant: str, dt: str, k: int, n: int) -> tuple[int, int]:
    """(fwd_max_m, dx_max_m): the largest M of CROSSOVER_MS up to which the fused kernel is at least as fast as
    the better dequant_gemm variant (0: never); the passes common to both (u, the LoRA gradients) cancel."""
    q = "nf4" if quant == "fp4" else quant  # fp4's select tree is shorter than nf4's: nf4's figures are conservative
    result = []
    for op in ("fwd", "dx"):
        best = 0
        for m in CROSSOVER_MS:
            fused = op_us(model, "fused", op, m, k, n, q, dt)
            other = min(op_us(model, p, op, m, k, n, q, dt) for p in ("dequant_gemm", "dequant_gemm_kext"))
            if q == "dense":  # the K-extended kernel over W is the fused kernel itself: compare with cuBLAS + C
                other = op_us(model, "dequant_gemm", op, m, k, n, q, dt)
            if fused > other:
                break
            best = m
        result.append(best)
    return tuple(result)


GEMM_MS = (1024, 4096, 8192)  # the training sizes at which dequant_gemm's two GEMM variants are compared


def gemm_variant(model: Model, quant: str, dt: str, k: int, n: int) -> tuple[str, str]:
    """(forward, dx): the dequant_gemm variant the model finds faster over GEMM_MS: "cublas_c" (cuBLAS with the
    low-rank term as its C operand: one [M, N] write outside the GEMM) or "kext" (the K-extended Triton kernel over
    the dense scratch: none, at the Triton GEMM's efficiency)."""
    q = "nf4" if quant == "fp4" else quant
    out = []
    for op in ("fwd", "dx"):
        cublas = sum(op_us(model, "dequant_gemm", op, m, k, n, q, dt) for m in GEMM_MS)
        kext = sum(op_us(model, "dequant_gemm_kext", op, m, k, n, q, dt) for m in GEMM_MS)
        out.append("kext" if kext < cublas else "cublas_c")
    return tuple(out)


# ----------------------------------------------------------------------------------------------- reports

CEILING_KEYS = ("issue", "fma", "alu", "xu", "smem", "l2", "overlap", "latency", "bound")


def chosen_configs(model: Model) -> list[str]:
    """The fused-kernel configs the model (as the autotuner) picks at the 8B shapes, bf16, every M of LAYER_MS."""
    names = set()
    for k, n in SHAPES_8B:
        for m in LAYER_MS:
            for quant in ("nf4", "dense"):
                for op in ("fwd", "dx"):
                    for label, _, _ in passes(model, "fused", op, m, k, n, quant):
                        names.update(re.findall(r"\((lora_matmul\[[^)]*\])\)", label))
    return sorted(names)


def kernel_table(rows: list[dict], dev: Device, other: dict[str, dict] | None = None) -> list[str]:
    head = ["config", "tile (BMxBNxBK) w/s", "regs", "smem KiB", "CTAs/SM (regs, thr, smem)", "loop", "instr/iter",
            "HGMMA/iter (shape)", "FLOP/iter", "tensor", "fp32", "imad", "int alu", "FSEL/SEL", "F2FP/I2FP", "XU",
            "global", "shared", "barrier", "branch", "uniform", "wait depth", "sync LDG",
            *[f"{c} %" for c in CEILING_KEYS]]  # fmt: skip
    if other:
        head += ["3.6 regs", "3.6 instr/iter", "3.6 bound %"]
    out = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for r in rows:
        if not r.get("ok"):
            out.append(f"| {r['name']} | FAILED: {r.get('error', '')[:200]} |")
            continue
        if not r["flop"] or "BM" not in r["tile"]:
            continue
        t, c, lim = r["tile"], r["counts"], r["cta_limits"]
        ceil_ = ceilings(r, dev)
        cells = [r["name"], f"{t.get('BM')}x{t.get('BN')}x{t.get('BK')} {r['num_warps']}/{r['num_stages']}",
                 r["registers"], f"{r['shared'] / 1024:.0f}",
                 f"{r['ctas_per_sm']} ({lim['registers']}, {lim['threads']}, {lim['shared']})", r["loop"], r["length"],
                 f"{r['hgmma']} ({', '.join(r['wgmma'])})", r["flop"], c["tensor"], c["fp32"], c["imad"],
                 c["int_alu"], c["select"], c["convert"], c["xu"], c["global"], c["shared"], c["barrier"],
                 c["branch"], c["uniform"], r["wait_depth"], "yes" if r["sync_loads"] else "no",
                 *[f"{100 * ceil_[k]:.0f}" for k in CEILING_KEYS]]  # fmt: skip
        if other:
            o = other.get(r["name"])
            cells += [o["registers"], o["length"], f"{100 * ceilings(o, dev)['bound']:.0f}"] if o else ["-"] * 3
        out.append("| " + " | ".join(str(x) for x in cells) + " |")
    return out


def dequant_table(rows: list[dict]) -> list[str]:
    """Streaming ceilings of the dequantisation kernels, uncapped (above 100 %: headroom over HBM)."""
    keys = ("issue", "alu", "l1", "latency")
    head = ["kernel", "regs", "CTAs/SM", "instr/program", "HBM bytes/program"]
    head += [f"{d.name} {k} %" for d in (H100, H200) for k in (*keys, "bound")]
    out = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for r in rows:
        if r.get("ok") and r["name"].startswith("dequant_chunks["):
            cells = [r["name"], r["registers"], r["ctas_per_sm"], r["length"], f"{stream_bytes(r):.0f}"]
            for d in (H100, H200):
                c = stream_ceilings(r, d, cap=False)
                cells += [f"{100 * c[k]:.0f}" for k in keys] + [f"{100 * min(1.0, c['bound']):.0f}"]
            out.append("| " + " | ".join(str(x) for x in cells) + " |")
    return out


def layer_rows(model: Model) -> list[dict]:
    rows = []
    for k, n in SHAPES_8B:
        for m in LAYER_MS:
            row = {"device": model.dev.name, "k": k, "n": n, "m": m}
            for path in PATHS:
                ops = {op: op_us(model, path, op, m, k, n) for op in ("fwd", "dx", "grads")}
                ops["step"] = sum(ops.values())
                row[path] = ops
            row["dense_cublas"] = {op: op_us(model, "dequant_gemm", op, m, k, n, "dense") for op in ("fwd", "dx")}
            rows.append(row)
    return rows


def layer_table(rows: list[dict]) -> list[str]:
    head = ["device", "K x N", "M"] + [f"{p} {op}" for p in PATHS for op in ("fwd", "dx", "grads", "step")]
    head += ["best fastlora step / unsloth", "best / peft"]
    out = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for r in rows:
        best = min(r["fused"]["fwd"], r["dequant_gemm"]["fwd"], r["dequant_gemm_kext"]["fwd"])
        best += min(r["fused"]["dx"], r["dequant_gemm"]["dx"], r["dequant_gemm_kext"]["dx"])
        best += r["dequant_gemm"]["grads"]
        cells = [r["device"], f"{r['k']}x{r['n']}", r["m"]]
        cells += [f"{r[p][op]:.1f}" for p in PATHS for op in ("fwd", "dx", "grads", "step")]
        cells += [f"{best / r['unsloth']['step']:.2f}", f"{best / r['peft']['step']:.2f}"]
        out.append("| " + " | ".join(str(x) for x in cells) + " |")
    return out


def bytes_table(model: Model, m: int = 4096, k: int = 4096, n: int = 4096) -> list[str]:
    out = [f"| path | op | pass | HBM MB (M={m}, K={k}, N={n}) | us (H100) |", "| --- | --- | --- | ---: | ---: |"]
    for path in PATHS:
        for op in ("fwd", "dx", "grads"):
            for label, nbytes, t in passes(model, path, op, m, k, n):
                out.append(f"| {path} | {op} | {label} | {nbytes / 1e6:.1f} | {t:.1f} |")
    return out


def headline(model: Model, rows: list[dict]) -> list[str]:
    """The issue's targets as the model sees them (H100)."""
    out = []
    for op in ("fwd", "dx"):
        best = max(
            ((ceilings(r, model.dev)["bound"], r["name"]) for r in rows
             if r.get("ok") and r["name"].startswith(f"lora_matmul[bfloat16,nf4-nested-aligned-{op},")
             and r["tensor_kind"] == "wgmma"),
            default=(0.0, "-"),
        )  # fmt: skip
        out.append(f"- NF4 fused {op} ceiling at its best tensor-core config: {best[0]:.0%} of tensor peak ({best[1]})")
    k, n = 4096, 14336
    for m in (1, 16):
        t = op_us(model, "fused", "fwd", m, k, n) - passes(model, "fused", "fwd", m, k, n)[0][2]
        gbs = w4_bytes(n, k) / (t * 1e-6) / 1e12
        out.append(f"- decode M={m} ({k}x{n}): fused forward kernel {t:.1f} us, {gbs:.2f} TB/s of W = "
                   f"{gbs / model.dev.hbm_tbs:.0%} of HBM")  # fmt: skip
    frac, src = model.dequant_fraction("bf16")
    out.append(f"- dequantisation (bf16 out): {frac:.0%} of HBM ({src}; {frac / COPY_EFF:.0%} of copy bandwidth)")
    for m in (4096, 8192):
        for k, n in SHAPES_8B:
            step = {p: sum(op_us(model, p, op, m, k, n) for op in ("fwd", "dx", "grads")) for p in PATHS}
            out.append(f"- training step M={m} {k}x{n}: dequant_gemm {step['dequant_gemm']:.0f} us, K-extended "
                       f"{step['dequant_gemm_kext']:.0f}, fused {step['fused']:.0f}, unsloth {step['unsloth']:.0f}, "
                       f"peft {step['peft']:.0f}; unsloth / dequant_gemm "
                       f"{step['unsloth'] / step['dequant_gemm']:.2f}x, peft / dequant_gemm "
                       f"{step['peft'] / step['dequant_gemm']:.2f}x")  # fmt: skip
    return out


def crossover_rows(model: Model) -> list[tuple]:
    rows = []
    for quant in ("nf4", "fp4", "dense"):
        for dt in ("bf16", "fp16", "fp32"):
            for k, n in CROSSOVER_SHAPES:
                rows.append((90, quant, dt, k, n, *crossover(model, quant, dt, k, n),
                             *gemm_variant(model, quant, dt, k, n)))  # fmt: skip
    return rows


def write_crossover(rows: list[tuple], date: str, path: Path = CROSSOVER_FILE) -> None:
    lines = [
        '"""Crossover table of the LoRA size dispatch. Generated by '
        "`python benchmarks/triton_sass.py --write-crossover`",
        f'from the static sm_90 model (benchmarks/results/static-sm90-{date}/); do not edit by hand."""',
        "",
        f'SOURCE = "static sm_90 model, {date}, H100 SXM: 132 SMs, 1.83 GHz, 989 TFLOP/s bf16, 3.35 TB/s"',
        'COLUMNS = ("arch", "quant", "dtype", "k", "n", "fwd_max_m", "dx_max_m", "fwd_gemm", "dx_gemm")',
        "# fused path while M <= fwd_max_m (forward) / dx_max_m (input gradient); the dequant_gemm path above, its",
        '# GEMM "cublas_c" (cuBLAS, the low-rank term as its C operand) or "kext" (the K-extended Triton kernel).',
        "ROWS = (",
        *[f'    ({r[0]}, "{r[1]}", "{r[2]}", {r[3]}, {r[4]}, {r[5]}, {r[6]}, "{r[7]}", "{r[8]}"),' for r in rows],
        ")",
        "",
    ]
    path.write_text("\n".join(lines))


def budgets_of(rows: list[dict], names: list[str]) -> dict:
    """Budgets of ``names``: registers + 8 (one allocation step of a warp's 256) and main-loop instructions + 10 %,
    so that a compiler's register or scheduling jitter passes and a regression (a lost hint, a spilled tile) fails."""
    by = {r["name"]: r for r in rows if r.get("ok")}
    return {
        n: {"registers": min(255, by[n]["registers"] + 8), "main_loop_instructions": math.ceil(by[n]["length"] * 1.1)}
        for n in names
        if n in by
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write kernels/layers/crossover tables here")
    parser.add_argument("--write-crossover", action="store_true", help=f"regenerate {CROSSOVER_FILE.name}")
    parser.add_argument("--write-budgets", action="store_true", help="regenerate budgets.json in --out")
    parser.add_argument("--cache", type=Path, default=None, help="reuse/store the compile results (JSON)")
    parser.add_argument("--no-gpu-triton", action="store_true", help="skip the triton 3.6 compile")
    parser.add_argument("--rev", default=None, help="model the kernels of this git revision (git archive of fastlora/)")
    args = parser.parse_args(argv)
    date = datetime.date.today().isoformat()
    source = None
    if args.rev:
        tmp = tempfile.mkdtemp(prefix="triton_sass_rev_")
        archive = subprocess.run(["git", "archive", args.rev, "fastlora"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        source = Path(tmp)
    if args.cache and args.cache.is_file():
        cached = json.loads(args.cache.read_text())
        rows, rows36 = cached["rows"], cached["rows36"]
    else:
        rows = compile_all(source=source)
        rows36 = []
    model = Model(rows, H100)
    chosen = chosen_configs(model)
    if not rows36 and not args.no_gpu_triton and (GPU_TRITON / "triton").is_dir():
        rows36 = compile_all([*chosen, CALIBRATION], gpu_triton=True, source=source)
    if args.cache:
        args.cache.write_text(json.dumps({"rows": rows, "rows36": rows36}))
    v36 = {r["name"]: r for r in rows36 if r.get("ok")}
    models = {d.name: Model(rows, d) for d in (H100, H200)}
    layers = [row for m in models.values() for row in layer_rows(m)]
    xrows = crossover_rows(model)
    cal = model.rows.get(CALIBRATION)
    overridden = sorted({r["name"] for r in rows if r.get("hints_overridden")})
    what = args.rev or "the working tree"
    md = [f"# Static sm_90 cost model of fastlora's Triton kernels ({date}, kernels of {what})",
          "",
          f"`python benchmarks/triton_sass.py --out <dir> --write-crossover`; triton {triton.__version__} "
          "(primary) and "
          f"{rows36[0]['triton'] if rows36 else 'n/a'} (the GPU machine's; chosen configs, right-hand columns). "
          "**Upper bounds and estimates from compiled code, not measurements.**", "",
          f"Assumptions: {ASSUMPTIONS}. Tensor: wgmma sustains {TENSOR_EFF:.0%} of nominal (calibrated, below).", "",
          f"Run-time hints overridden by this script (the spec declared no `ones`/`div16`): {len(overridden)} specs "
          "(contiguous x/u/out, B or A read as unit-stride L, pointers and multiples of 16 hinted).", ""]  # fmt: skip
    if cal:
        c = ceilings(cal, H100)
        md += [f"## Calibration: {CALIBRATION}", "",
               f"Ceilings: issue {c['issue']:.0%}, shared memory {c['smem']:.0%}, L2 {c['l2']:.0%}, latency "
               f"{c['latency']:.0%}, bound {c['bound']:.0%}; modelled time at 8192³ gives {model.cublas_eff:.0%} of "
               "peak (cuBLAS: 70-80 % on H100). Without the wgmma derating the shared-memory bound alone "
               f"({c['smem']:.0%} of a 100 % tensor ceiling) would put a plain Triton GEMM above cuBLAS: the one "
               f"tuned constant is TENSOR_EFF = {TENSOR_EFF} (sustained clock under tensor load and wgmma issue gaps). "
               f"cuBLAS GEMMs below run at {model.cublas_eff:.1%}.", ""]  # fmt: skip
    md += ["## Headline (H100)", "", *headline(model, rows), ""]
    md += ["## Kernels (H100, main loop per CTA iteration; ceilings in % of tensor peak, fp32: of FFMA peak)", ""]
    md += [*kernel_table(rows, H100, v36), ""]
    frac = {d: models[d].dequant_fraction("bf16") for d in models}
    md += ["## Dequantisation kernel (% of the HBM figure)", "", *dequant_table(rows), ""]
    md += [f"Used in the layer model: {', '.join(f'{d}: {f:.0%} ({src})' for d, (f, src) in frac.items())}.", ""]
    md += ["## Per layer (us), NF4 double-quant bf16 r=16, fwd / dx / LoRA grads / step", ""]
    md += [*layer_table(layers), ""]
    md += ["## Bytes of every pass", "", *bytes_table(model), ""]
    md += ["## Crossover (fused while M <= max_m; H100)", "", "| quant | dtype | K | N | fwd_max_m | dx_max_m |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    md += [f"| {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} |" for r in xrows] + [""]
    md += ["Chosen configs (budgets.json): " + ", ".join(chosen), ""]
    text = "\n".join(md)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "model.md").write_text(text)
        payload = {"date": date, "triton": triton.__version__, "assumptions": ASSUMPTIONS, "tensor_eff": TENSOR_EFF,
                   "cublas_eff": model.cublas_eff, "kernels": rows, "kernels_gpu_triton": rows36, "layers": layers,
                   "crossover": xrows, "chosen": chosen}  # fmt: skip
        (args.out / "model.json").write_text(json.dumps(payload, indent=1))
        if args.write_budgets or not (args.out / "budgets.json").is_file():
            (args.out / "budgets.json").write_text(json.dumps(budgets_of(rows, chosen), indent=1) + "\n")
    if args.write_crossover:
        write_crossover(xrows, date)
    return 0


def _quick_main():
    if sys.argv[1:2] == ["--worker"]:
        _worker(json.loads(sys.argv[2]))
        return True
    if sys.argv[1:2] == ["--worker-list"]:
        json.dump([s.name for s in modelled_specs()], sys.stdout)
        return True
    return False


if __name__ == "__main__":
    sys.exit(0 if _quick_main() else main())
