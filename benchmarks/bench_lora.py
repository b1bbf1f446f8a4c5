"""LoRA / QLoRA linear layer: FastLoRALinear vs plain PyTorch (cuBLAS) and peft over bitsandbytes 4-bit.

Implementations, all on the same weights (W (N, K), A (r, K), B (N, r), s = alpha / r, no bias):
  (a) torch bf16     y = x @ W.T + s * (x @ A.T) @ B.T with autograd: the cuBLAS limit for a dense base
  (b) peft+bnb nf4   peft's LoRA on a bnb.nn.Linear4bit (same NF4 bytes, LoRA weights in the input dtype)
  fastlora bf16      FastLoRALinear, dense base
  fastlora nf4       FastLoRALinear, NF4 base (blocksize 64, double quantisation: the QLoRA recipe)

FLOPs (counted, not measured; dequantisation and elementwise work are free):
  fwd     = 2MKN + 2Mr(K+N)            base GEMM + the two skinny LoRA GEMMs
  fwd+bwd = 4MKN + 6Mr(K+N)            + dx of the frozen base (2MKN) + LoRA backward (dA, dB, dx: 4Mr(K+N))
Both passes run as in training: x requires grad, the base is frozen, A and B require grad; fwd+bwd
backpropagates a fixed random upstream gradient; grads are set to None outside the timed region.
Peak memory: max_memory_allocated over one pass, minus what was allocated before it (MiB).
Before timing, every implementation's y, dx, dA and dB are checked against an fp32 reference on
the same weights (NF4: x @ dequantize_4bit(W).T + LoRA); a mismatch raises, it is never reported.

    python benchmarks/bench_lora.py           # GPU: Llama-3-8B shapes, writes results/lora_<date>_<device>.md/.json
    python benchmarks/bench_lora.py --quick   # GPU: 4096x4096, M in {16, 4096}; CPU: tiny smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time

import torch
from _harness import time_ms, write_results

import fastlora
from fastlora import FastLoRALinear, dequantize_4bit, quantize_4bit

ALPHA = 32.0  # s = alpha / r = 2 at r = 16: the LoRA term is as large as the base term, so a wrong one shows
TOL_REL, TOL_MAX = 1e-2, 3e-2  # ||got - ref|| / ||ref||, max|got - ref| / max|ref| (bf16 rounding: ~2e-3)
IMPLS = ("(a) torch", "(b) peft+bnb nf4", "fastlora bf16", "fastlora nf4")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class WrongResult(AssertionError):
    pass


def flops(m: int, k: int, n: int, r: int, backward: bool) -> int:
    return 4 * m * k * n + 6 * m * r * (k + n) if backward else 2 * m * k * n + 2 * m * r * (k + n)


def peak_mib(fn, reset: list[torch.Tensor], cuda: bool) -> float:
    if not cuda:
        return math.nan
    for t in reset:
        t.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for t in reset:
        t.grad = None
    return peak / 2**20


def reference(x, w, a, b, s, g) -> dict[str, torch.Tensor]:
    """fp32 y, dx, dA, dB of y = x Wᵀ + s (x Aᵀ) Bᵀ."""
    xf, af, bf = (t.detach().float().requires_grad_() for t in (x, a, b))
    y = xf @ w.float().T + s * (xf @ af.T) @ bf.T
    y.backward(g.float())
    return {"y": y.detach(), "dx": xf.grad, "dA": af.grad, "dB": bf.grad}


def check(name: str, forward, params, x, g, ref) -> None:
    x.grad = None
    for p in params:
        p.grad = None
    y = forward(x)
    y.backward(g)
    got = {"y": y.detach(), "dx": x.grad, "dA": params[0].grad, "dB": params[1].grad}
    for key, r in ref.items():
        t = got[key]
        if t is None or t.shape != r.shape:
            raise WrongResult(f"{name}: {key} is {None if t is None else tuple(t.shape)}, expected {tuple(r.shape)}")
        diff = t.float() - r
        rel = (diff.norm() / r.norm()).item()
        worst = (diff.abs().max() / r.abs().max()).item()
        if not (rel <= TOL_REL and worst <= TOL_MAX):  # also catches NaN
            raise WrongResult(f"{name}: {key} differs from the fp32 reference: rel {rel:.2e}, max {worst:.2e}")
    x.grad = None
    for p in params:
        p.grad = None


def build(k: int, n: int, r: int, dtype: torch.dtype, device: str) -> tuple[dict, dict]:
    """Weights and the four implementations: name -> (forward, [A, B] trainable, reference weight)."""
    gen = torch.Generator(device).manual_seed(0)
    w = (torch.randn(n, k, device=device, generator=gen) / math.sqrt(k)).to(dtype)
    a = ((torch.rand(r, k, device=device, generator=gen) * 2 - 1) / math.sqrt(k)).to(dtype)
    b = ((torch.rand(n, r, device=device, generator=gen) * 2 - 1) / math.sqrt(r)).to(dtype)
    s = ALPHA / r
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
    w_nf4 = dequantize_4bit(packed, state)
    weights = {"s": s, "a": a, "b": b, "dense": w, "nf4": w_nf4}
    impls: dict = {}

    A, B = a.clone().requires_grad_(), b.clone().requires_grad_()
    impls["(a) torch"] = (lambda x: x @ w.T + s * (x @ A.T) @ B.T, [A, B], "dense")
    for name, weight, qs in (("fastlora bf16", w, None), ("fastlora nf4", packed, state)):
        layer = FastLoRALinear(weight, None, r, ALPHA, quant_state=qs, init="none")
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        impls[name] = (layer, [layer.lora_A, layer.lora_B], "dense" if qs is None else "nf4")
    try:
        impls["(b) peft+bnb nf4"] = (*_peft_bnb(k, n, r, a, b, packed, state, dtype, device), "nf4")
    except Exception as e:  # not installed, or bitsandbytes has no kernels for this device: no (b) rows
        print(f"skipping (b) peft+bnb nf4: {type(e).__name__}: {e}")
    return weights, impls


def _peft_bnb(k, n, r, a, b, packed, state, dtype, device):
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    holder = torch.nn.Module()
    holder.proj = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
    stats = {key.removeprefix("weight."): v for key, v in state.state_dict("weight.").items()}
    holder.proj.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, device=device, module=holder.proj)
    holder.proj.compute_dtype = dtype
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"]), holder)
    layer = holder.proj
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_a.data, lora_b.data = a.clone(), b.clone()
    assert not layer.base_layer.weight.requires_grad and lora_a.requires_grad and lora_b.requires_grad
    return layer, [lora_a, lora_b]


def run_shape(k, n, tokens, r, dtype, device) -> list[dict]:
    cuda = device == "cuda"
    weights, impls = build(k, n, r, dtype, device)
    rows = []
    for m in tokens:
        gen = torch.Generator(device).manual_seed(m)
        x = torch.randn(m, k, device=device, dtype=dtype, generator=gen).requires_grad_()
        g = torch.randn(m, n, device=device, dtype=dtype, generator=gen)
        a, b, s = weights["a"], weights["b"], weights["s"]
        refs = {kind: reference(x, weights[kind], a, b, s, g) for kind in ("dense", "nf4")}
        for name in IMPLS:
            if name not in impls:
                continue
            forward, params, kind = impls[name]
            try:
                check(name, forward, params, x, g, refs[kind])
            except WrongResult:
                raise
            except Exception as e:
                if not name.startswith("(b)"):
                    raise
                print(f"skipping (b) peft+bnb nf4 (it failed to run): {type(e).__name__}: {e}")
                del impls[name]
                continue
            reset = [x, *params]
            passes = {"fwd": lambda f=forward, x=x: f(x), "fwd+bwd": lambda f=forward, x=x, g=g: f(x).backward(g)}
            for pas, fn in passes.items():
                med, q20, q80 = time_ms(fn, cuda, reset)
                tflops = flops(m, k, n, r, pas == "fwd+bwd") / med / 1e9
                rows.append(
                    {
                        "shape": f"{k}x{n}",
                        "K": k,
                        "N": n,
                        "M": m,
                        "impl": name,
                        "pass": pas,
                        "ms": med,
                        "ms_q20": q20,
                        "ms_q80": q80,
                        "tflops": tflops,
                        "peak_mib": peak_mib(fn, reset, cuda),
                    }
                )
        del x, g, refs
        if cuda:
            torch.cuda.empty_cache()
    del weights, impls
    if cuda:
        torch.cuda.empty_cache()
    for row in rows:  # time ratios against (a) and (b) in the same shape, M and pass
        same = {o["impl"]: o["ms"] for o in rows if (o["M"], o["pass"]) == (row["M"], row["pass"])}
        row["vs_a"] = row["ms"] / same["(a) torch"]
        row["b_speedup"] = same["(b) peft+bnb nf4"] / row["ms"] if "(b) peft+bnb nf4" in same else None
    return rows


def render(rows: list[dict], meta: dict) -> str:
    lines = [f"# LoRA linear, r={meta['rank']}, {meta['dtype']}", "", json.dumps(meta), ""]
    lines += [
        "FLOPs: fwd = 2MKN + 2Mr(K+N); fwd+bwd = 4MKN + 6Mr(K+N) (frozen base: dx only). K = in, N = out.",
        "Training passes (x requires grad). ms: median (q20-q80). t/t(a): time / time of (a), lower is better. "
        "t(b)/t: time of (b) / time, the speedup over peft+bnb. Peak: MiB above what was allocated before the pass.",
        "",
    ]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for pas in ("fwd", "fwd+bwd"):
            lines += [f"## {shape.replace('x', ' -> ')} ({pas})", ""]
            lines += ["| M | impl | ms | q20-q80 | TFLOP/s | peak MiB | t/t(a) | t(b)/t |", "|---" * 8 + "|"]
            for r in rows:
                if r["shape"] == shape and r["pass"] == pas:
                    b = f"{r['b_speedup']:.2f}" if r["b_speedup"] is not None else "-"
                    peak = f"{r['peak_mib']:.0f}" if not math.isnan(r["peak_mib"]) else "-"
                    lines.append(
                        f"| {r['M']} | {r['impl']} | {r['ms']:.4f} | {r['ms_q20']:.4f}-{r['ms_q80']:.4f} | "
                        f"{r['tflops']:.4g} | {peak} | {r['vs_a']:.2f} | {b} |"
                    )
            lines.append("")
    lines += ["## Targets: fastlora nf4 fwd+bwd at M >= 4096: t/t(a) <= 1.15 and t(b)/t >= 2", ""]
    targets = [r for r in rows if r["impl"] == "fastlora nf4" and r["pass"] == "fwd+bwd" and r["M"] >= 4096]
    for r in targets:
        ok_a = "PASS" if r["vs_a"] <= 1.15 else "FAIL"
        ok_b = "n/a" if r["b_speedup"] is None else "PASS" if r["b_speedup"] >= 2 else "FAIL"
        b = f"{r['b_speedup']:.2f}" if r["b_speedup"] is not None else "-"
        lines.append(f"- {r['shape']} M={r['M']}: t/t(a) = {r['vs_a']:.2f} {ok_a}; t(b)/t = {b} {ok_b}")
    if not targets:
        lines.append("- not evaluated: no M >= 4096 in this run")
    return "\n".join(lines) + "\n"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:
        return f"unavailable ({type(e).__name__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="in x out, comma separated")
    parser.add_argument("--tokens", default="1,16,4096,16384", help="M values, comma separated")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--quick", action="store_true", help="4096x4096, M in {16, 4096} (CPU: always a tiny run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.quick:
        args.shapes, args.tokens = "4096x4096", "16,4096"
    if not cuda:
        print("No CUDA device: GPU figures need a GPU. CPU smoke configuration only (256x256, M=16, torch backend).")
        args.shapes, args.tokens = "256x256", "16"
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    meta = {
        "device": device_name,
        "date": datetime.date.today().isoformat(),
        **{m: _version(m) for m in ("torch", "triton", "fastlora", "bitsandbytes", "peft")},
        "dtype": args.dtype,
        "rank": args.rank,
        "lora_alpha": ALPHA,
        "quant": "nf4, blocksize 64, double quant",
        "shapes_in_x_out": [f"{k}x{n}" for k, n in shapes],
        "tokens": tokens,
    }
    assert fastlora.__version__ == meta["fastlora"]
    t0 = time.perf_counter()
    rows = []
    for k, n in shapes:
        rows += run_shape(k, n, tokens, args.rank, DTYPES[args.dtype], "cuda" if cuda else "cpu")
        print(f"done {k}x{n} ({time.perf_counter() - t0:.0f} s)", flush=True)
    text = render(rows, meta)
    print(text)
    if cuda:
        stem = f"lora_{meta['date']}_{device_name.replace(' ', '_')}" + ("_quick" if args.quick else "")
        write_results(args.out, stem, text, meta, rows)


if __name__ == "__main__":
    main()
