"""The embedded default job for now: quantise a linear layer to NF4 and check it against bitsandbytes.

Prints the quantisation error, the memory saved, and whether fastlora's bytes equal
bitsandbytes' own. Runs on a CPU-only machine in seconds.
"""

from __future__ import annotations

import math
import time

import torch

from fastlora.quant import dequantize_4bit, quantize_4bit


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:8.2f} MiB"


def run_demo(
    in_features: int = 4096,
    out_features: int = 4096,
    quant_type: str = "nf4",
    blocksize: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Quantise an ``nn.Linear(in_features, out_features)`` (bf16) to 4-bit; report and return the figures."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, dtype=torch.bfloat16)
    w = layer.weight.detach()
    x = torch.randn(16, in_features, dtype=torch.bfloat16)
    print(f"fastlora demo: {quant_type.upper()} blocksize {blocksize}, nn.Linear({in_features}, {out_features}), bf16")
    print(f"  device: {w.device}, torch {torch.__version__}")

    report: dict[str, float] = {}
    base_bytes = w.numel() * w.element_size()
    print(f"\n  {'format':26s} {'memory':>12s} {'saved':>7s} {'mean |err|':>11s} {'SQNR':>8s} {'layer out err':>14s}")
    print(f"  {'bf16 (original)':26s} {_mib(base_bytes):>12s} {'-':>7s} {'-':>11s} {'-':>8s} {'-':>14s}")
    y_ref = (x.double() @ w.double().T).float()
    for double_quant in (False, True):
        t0 = time.perf_counter()
        packed, state = quantize_4bit(w, quant_type, blocksize, double_quant)
        t_quant = time.perf_counter() - t0
        t0 = time.perf_counter()
        w_dq = dequantize_4bit(packed, state)
        t_dequant = time.perf_counter() - t0
        nbytes = packed.numel() * packed.element_size() + state.nbytes()
        err = (w_dq.float() - w.float()).abs()
        sqnr = 10 * math.log10(w.float().pow(2).sum().item() / (w_dq.float() - w.float()).pow(2).sum().item())
        y = (x.double() @ w_dq.double().T).float()
        out_err = ((y - y_ref).norm() / y_ref.norm()).item()
        name = f"{quant_type} (double quant)" if double_quant else quant_type
        saved = 1 - nbytes / base_bytes
        print(
            f"  {name:26s} {_mib(nbytes):>12s} {saved:7.1%} {err.mean().item():11.3e} "
            f"{sqnr:6.2f}dB {out_err:14.3e}   quantise {t_quant * 1e3:.0f} ms, dequantise {t_dequant * 1e3:.0f} ms"
        )
        key = "dq" if double_quant else "plain"
        report.update({f"{key}_bytes": nbytes, f"{key}_sqnr_db": sqnr, f"{key}_out_rel_err": out_err})
        report[f"{key}_bnb_identical"] = float(
            _check_against_bitsandbytes(w, packed, state, quant_type, blocksize, double_quant)
        )
    return report


def _check_against_bitsandbytes(w, packed, state, quant_type, blocksize, double_quant) -> bool:
    try:
        import bitsandbytes.functional as F
    except Exception as e:  # optional peer: report, do not fail
        print(f"    bitsandbytes not importable ({type(e).__name__}); skipping the byte-for-byte check")
        return False
    ref_packed, ref_state = F.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    same = torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
    if double_quant:
        same = same and torch.equal(state.nested.absmax, ref_state.state2.absmax)
    print(f"    bitsandbytes {_bnb_version()}: packed bytes and statistics {'IDENTICAL' if same else 'DIFFER'}")
    return same


def _bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__
