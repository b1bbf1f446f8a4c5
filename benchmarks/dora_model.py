"""Static sm_90 model of DoRA's 4-bit training-size path against LoRA's (issue 22), on the cost model of
``benchmarks/triton_sass.py``.

The LoRA passes come from that model (its compiled kernels, read from ``--base``/model.json: the fused GEMM configs,
the dequantisation kernel, the calibration GEMM). This script compiles the DoRA kernels of
``fastlora/kernels/dora_norm.py`` for sm_90 as the launcher's JIT builds them (triton 3.9, and the GPU machine's 3.6
when present): the norm pass (‖W_n‖² and W·Aᵀ from one read of the packed W, tensor-core dot, nothing written)
and the scaled dequantisation (diag(g)·W into the scratch). It reads their main loop (one 64 x 64 tile of W a CTA
an iteration) and turns it into a fraction of HBM as the dequantisation kernel's: issue/pipe/L1 clocks per
iteration against the HBM bytes that iteration moves (64·64 weights x (0.5 packed + the nested absmax, + 2
written for the scaled dequantisation)), latency by Little's law over the CTAs an SM holds. Then, per 8B layer
shape at M = 4096, bf16, r = 16, fwd + dx + LoRA gradients (``fastlora::dora_dequant_gemm``, ops/dora.py):

    LoRA   = the planner's dequant_gemm passes (triton_sass.op_us)
    DoRA   = LoRA + the norm pass (and its K-split partial sums) + SMALL_OPS launches on (N, r) / (N,) tensors
             + the scaled dequantisation instead of the plain one, forward and dx (twice)
             + dm = Σ_M dy ⊙ y / m (one read of dy and y); no [M, N] pass in the forward (g is in W_g's and B's
             rows), none for dz (the backward runs on W_g and g ⊙ B); Llama's projections have no bias
    before = LoRA + triton_sass.dora_passes (the two-pass norm: W·Aᵀ on the fused kernel over the packed W, then
             y = z ⊙ g and autograd's dz = dy ⊙ g, dy ⊙ z, Σ_M)

    python benchmarks/dora_model.py --out benchmarks/results/static-sm90-2026-12-02-dora
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_sass as ts

ROOT = ts.ROOT
BASE = ROOT / "benchmarks" / "results" / "static-sm90-2026-12-02"
NORM_SPEC = "dora_norm[bfloat16,nested=True,norm,rp=16]"
SCALE_SPEC = "dora_norm[bfloat16,nested=True,scale]"
SPECS = (NORM_SPEC, "dora_norm[bfloat16,nested=True,norm,rp=64]", SCALE_SPEC)
M = 4096
SMALL_OPS = 19  # launches of norm_from / the K-split sums / g = m / norm on (N, r), (r, r), (N,) tensors (ops/dora.py)


def _worker(names: list[str]) -> None:
    import fastlora.kernels.dora_norm  # noqa: F401
    from fastlora.kernels import specs

    by_name = {s.name: s for s in specs.registered()}
    ts._SPECS = [by_name[n] for n in names]
    rows = [ts._compile_one(i) for i in range(len(ts._SPECS))]
    for r, s in zip(rows, ts._SPECS, strict=True):
        r["tile"] = {k: s.constexprs[k] for k in ("ROWS", "BC", "RP")}
    json.dump(rows, sys.stdout)


def compile_specs(gpu_triton: bool = False) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if gpu_triton:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ts.GPU_TRITON), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(SPECS)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=1800)  # fmt: skip
    if not proc.stdout:
        raise RuntimeError(proc.stderr[-4000:])
    rows = json.loads(proc.stdout)
    for r in rows:
        if r.get("ok"):
            r["ctas_per_sm"] = ts.blocks_per_sm(r["registers"], 32 * r["num_warps"], r["shared"])
    return rows


def iteration_bytes(a: dict, e: int = 2) -> float:
    """HBM bytes one main-loop iteration of a CTA moves: ROWS x BC weights, packed + nested absmax, + written for
    the scaled dequantisation (the A tile, RP x BC x e, is the same for every CTA: an L2 hit, counted in the L1/L2
    terms, not here)."""
    t = a["tile"]
    return t["ROWS"] * t["BC"] * (0.5 + (e if "scale" in a["name"] else 0) + 1 / 64 + 4 / 64 / 256)


def norm_fraction(a: dict, dev: ts.Device) -> dict[str, float]:
    """Fractions of the HBM figure the kernel's loop allows per resource (uncapped) and "bound"."""
    r = ts.unit_clocks(a, dev, a["ctas_per_sm"], dev.latency_clk)
    r["l1"] = (a["l2_bytes"] + a["smem_bytes"]) / ts.SMEM_B_CLK
    moved = iteration_bytes(a)
    keys = ("issue", "fma", "alu", "xu", "tensor", "l1", "latency")
    out = {k: moved / r[k] / dev.hbm_per_clk if r[k] else math.inf for k in keys}
    out["bound"] = min(out.values())
    return out


def kernel_us(model: ts.Model, a: dict, n: int, k: int) -> float:
    """One of the kernels at (N, K): its HBM bytes at min(copy, modelled) bandwidth, plus the norm's K-split
    partial sums (written and summed: two launches)."""
    rows, rp = a["tile"]["ROWS"], a["tile"]["RP"]
    frac = min(ts.COPY_EFF, norm_fraction(a, model.dev)["bound"])
    if "scale" in a["name"]:
        return (ts.w4_bytes(n, k) + n * k * 2) / (model.dev.hbm_tbs * 1e12 * frac) * 1e6 + ts.LAUNCH_US
    split = max(1, min(max(1, k // 1024), math.ceil(528 / math.ceil(n / rows))))
    partial = model.mem_us(split * n * (1 + rp) * 4 * 2) * 2 if split > 1 else 0
    return ts.w4_bytes(n, k) / (model.dev.hbm_tbs * 1e12 * frac) * 1e6 + ts.LAUNCH_US + partial


def layer(model: ts.Model, kernels: dict, k: int, n: int) -> dict:
    """us of LoRA, DoRA (these kernels) and DoRA before (two-pass norm) at (M, K, N), bf16, NF4, fwd + dx + grads."""
    variant = {"cublas_c": "dequant_gemm", "kext": "dequant_gemm_kext"}
    cross = ts.gemm_variant(model, "nf4", "bf16", k, n)
    paths = {"fwd": variant[cross[0]], "dx": variant[cross[1]], "grads": "dequant_gemm"}
    lora = {op: ts.op_us(model, p, op, M, k, n) for op, p in paths.items()}
    lora_total = sum(lora.values())
    mn = M * n * 2
    scaled = kernel_us(model, kernels[SCALE_SPEC], n, k) - model.dequant_us(n, k, "bf16")
    extra = {
        "norm pass": kernel_us(model, kernels[NORM_SPEC], n, k),
        f"small ops ({SMALL_OPS} launches)": SMALL_OPS * ts.LAUNCH_US,
        "scaled − plain dequantisation (x2)": 2 * scaled,
        "dm = Σ_M dy ⊙ y / m": model.mem_us(2 * mn),
    }
    dense = ts.gemm_variant(model, "dense", "bf16", k, n)  # the op's GEMMs run on the dense scratch (W_g)
    for i, op in enumerate(("fwd", "dx")):
        if dense[i] != cross[i]:
            extra[f"{op} GEMM {dense[i]} instead of {cross[i]}"] = (
                ts.op_us(model, variant[dense[i]], op, M, k, n) - lora[op]
            )
    before = lora_total + sum(t for *_, t in ts.dora_passes(model, M, k, n))
    dora = lora_total + sum(extra.values())
    return {"k": k, "n": n, "m": M, "device": model.dev.name, "lora_us": lora_total, "dora_us": dora,
            "dora_before_us": before, "ratio": dora / lora_total, "ratio_before": before / lora_total,
            "extra": extra}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--base", type=Path, default=BASE, help="the triton_sass results (model.json) the LoRA side uses")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    base = json.loads((args.base / "model.json").read_text())
    rows = compile_specs()
    rows36 = compile_specs(gpu_triton=True) if (ts.GPU_TRITON / "triton").is_dir() else []
    md = [f"# DoRA's 4-bit training path, static sm_90 model — {datetime.date.today()}", "",
          f"Modelled, not measured (the assumptions of `{args.base.relative_to(ROOT)}/README.md`); "
          f"`python benchmarks/dora_model.py --out DIR`. bf16, NF4 nested, r = 16, M = {M}, fwd + dx + LoRA grads.",
          "", "## The DoRA kernels (main loop: one 64x64 W tile a CTA an iteration)", "",
          "| spec | triton | regs | stack | CTAs/SM | instr/iter | HGMMA+HMMA/iter | int alu | convert | select | "
          "fp32 | global | shared | H100 issue % | alu % | L1 % | latency % | bound % of HBM | H200 bound % |",
          "| --- " * 19 + "|"]  # fmt: skip
    for r in [*rows, *rows36]:
        if not r.get("ok"):
            md.append(f"| {r['name']} | FAILED {r.get('error', '')[:200]} |")
            continue
        c, f1, f2 = r["counts"], norm_fraction(r, ts.H100), norm_fraction(r, ts.H200)
        md.append(f"| {r['name']} | {r['triton']} | {r['registers']} | {r['stack']} | {r['ctas_per_sm']} | "
                  f"{r['length']} | {c['tensor']} | {c['int_alu']} | {c['convert']} | {c['select']} | {c['fp32']} | "
                  f"{c['global']} | {c['shared']} | {100 * f1['issue']:.0f} | {100 * f1['alu']:.0f} | "
                  f"{100 * f1['l1']:.0f} | {100 * f1['latency']:.0f} | {100 * f1['bound']:.0f} | "
                  f"{100 * f2['bound']:.0f} |")  # fmt: skip
    kernels = {r["name"]: r for r in rows if r.get("ok")}
    results = []
    md += ["", "## DoRA / LoRA at the 8B shapes (r = 16)", "",
           "| device | K | N | LoRA us | DoRA us | DoRA / LoRA | before (two-pass norm) / LoRA | "
           "DoRA's extra passes (us) |",
           "| --- " * 8 + "|"]  # fmt: skip
    for dev in (ts.H100, ts.H200):
        model = ts.Model(base["kernels"], dev)
        for k, n in ts.SHAPES_8B:
            row = layer(model, kernels, k, n)
            results.append(row)
            extra = "; ".join(f"{name} {t:.1f}" for name, t in row["extra"].items())
            md.append(f"| {dev.name} | {k} | {n} | {row['lora_us']:.0f} | {row['dora_us']:.0f} | {row['ratio']:.3f} | "
                      f"{row['ratio_before']:.3f} | {extra} |")  # fmt: skip
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "model.md").write_text(text)
        (args.out / "model.json").write_text(json.dumps({"kernels": rows, "kernels_gpu_triton": rows36,
                                                          "layers": results}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
