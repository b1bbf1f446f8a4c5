"""Readable at a glance: result tables (rich on the terminal, markdown in files) and PNG plots.

Each table has one ``t/t(ref)`` column per reference implementation of its suite: this row's median time
over the reference's median time in the same case and pass (below 1: faster than the reference). Rows that
were not timed show FAILED or SKIPPED; their reasons are listed under the table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from fastlora.bench import adapter, decode, layer, model, multi
from fastlora.bench.records import OK, Record

# suite -> the implementations every row is compared with (one t/t(ref) column each)
REFERENCES: dict[str, tuple[str, ...]] = {
    "layer": layer.REFERENCES,
    "decode": decode.REFERENCES,
    "dequant": decode.DEQUANT_REFERENCES,
    "model": model.REFERENCES,
    "adapter": adapter.REFERENCES,
    "multi": multi.REFERENCES,
}
SUITE_ORDER = ("layer", "decode", "dequant", "model", "adapter", "multi")


def _f(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _time(r: Record) -> str:
    return _f(r.ms, ".4g") if r.status == OK else r.status


def _spread(r: Record) -> str:
    return f"{r.q20:.4g}-{r.q80:.4g}" if r.status == OK and r.q20 is not None else ""


def _case(r: Record) -> str:
    """ "4096x14336 M=16 r=16 bf16" (model: "llama-1b 4096 tok r=16 bf16")."""
    parts = [r.shape]
    if r.m is not None:
        parts.append(f"{r.m} tok" if r.suite == "model" else f"M={r.m}")
    if r.r is not None:
        parts.append(f"r={r.r}")
    return " ".join([*parts, r.dtype])


Column = tuple[str, Callable[[Record, dict[str, Any]], str]]


def columns(suite: str) -> list[Column]:
    """(header, cell(record, meta)) of a suite's table, ratio columns last."""
    head: list[Column] = [
        ("case", lambda r, m: _case(r)),
        ("pass", lambda r, m: r.pass_),
        ("impl", lambda r, m: r.impl),
        ("ms", lambda r, m: _time(r)),
        ("q20-q80", lambda r, m: _spread(r)),
    ]
    if suite in ("model", "multi"):
        head.append(("tokens/s", lambda r, m: _f(r.tokens_per_s, ",.0f")))
    head.append(("TFLOP/s", lambda r, m: _f(r.tflops, ".3g")))
    if suite != "model":
        head.append(("GB/s", lambda r, m: _f(r.gbs, ".4g")))
    if suite in ("decode", "dequant"):
        head.append(("of copy", lambda r, m: _f(_of_copy(r, m), ".0%")))
    head.append(("peak MiB", lambda r, m: _f(r.peak_mib, ".0f")))
    head.append(("max err", lambda r, m: _f(r.max_rel_err, ".1e")))
    for ref in REFERENCES.get(suite, ()):
        head.append((f"t/t({ref})", lambda r, m, ref=ref: _f(r.ratios.get(ref), ".2f")))
    return head


def _of_copy(r: Record, meta: dict[str, Any]) -> float | None:
    copy = (meta.get("device_peaks") or {}).get("copy_gbs")
    return r.gbs / copy if r.gbs and copy else None


def table_rows(
    suite: str, records: Sequence[Record], meta: dict[str, Any]
) -> tuple[list[str], list[list[str]], list[str]]:
    """(headers, rows, notes) of one suite; a note per distinct (impl, reason) of untimed rows."""
    cols = columns(suite)
    rows, notes = [], {}
    mine = [r for r in records if r.suite == suite]
    case_order = {c: i for i, c in enumerate(dict.fromkeys(r.case for r in mine))}
    pass_order = {p: i for i, p in enumerate(dict.fromkeys(r.pass_ for r in mine))}
    for r in sorted(mine, key=lambda r: (case_order[r.case], pass_order[r.pass_])):  # stable: impl order kept
        rows.append([cell(r, meta) for _, cell in cols])
        if r.status != OK:
            notes.setdefault((r.impl, r.note), None)
    return [h for h, _ in cols], rows, [n if n.startswith(f"{i}:") else f"{i}: {n}" for i, n in notes]


def markdown(records: Sequence[Record], meta: dict[str, Any], suites: Sequence[str]) -> str:
    """The whole run as markdown: a header with device, date, versions and peaks, then one table per suite."""
    peaks = meta.get("device_peaks") or {}
    lines = [
        f"# fastlora bench: {meta.get('device')}",
        "",
        f"- date: {meta.get('date')}; commit: {meta.get('git_commit')}; quick: {meta.get('quick')}",
        f"- torch {meta.get('torch')}, triton {meta.get('triton')}, fastlora {meta.get('fastlora')}, "
        f"peft {meta.get('peft')}, bitsandbytes {meta.get('bitsandbytes')}, transformers {meta.get('transformers')}",
        f"- measured here: matmul {', '.join(f'{k} {v:.3g} TFLOP/s' for k, v in peaks.get('tflops', {}).items())}"
        f" ({peaks.get('matmul_n')}³); copy {_f(peaks.get('copy_gbs'), '.4g')} GB/s (read + write)",
        f"- timer: {meta.get('timer')}; peak memory: {meta.get('peak_memory')}",
        "- t/t(ref): median time / the reference's median time, same case and pass (below 1 = faster)",
        "",
    ]
    if not meta.get("gpu"):
        lines += [f"> {CPU_NOTICE}", ""]
    for suite in suites:
        headers, rows, notes = table_rows(suite, records, meta)
        if not rows:
            continue
        lines += [f"## {suite}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(lines) + "\n"


CPU_NOTICE = (
    "CPU run: these are CPU figures (fastlora's torch path, bitsandbytes' CPU kernels, peft). "
    "GPU figures need a GPU: run the full suite on one (benchmarks/README.md)."
)


def print_tables(records: Sequence[Record], meta: dict[str, Any], suites: Sequence[str], console=None) -> None:
    """Print one rich table per suite (plain text when rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(records, meta, suites))
        return
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: no terminal width to fit, keep every column whole
            console = Console(width=240)
    for suite in suites:
        headers, rows, notes = table_rows(suite, records, meta)
        if not rows:
            continue
        table = Table(title=f"{suite} — {meta.get('device')}", title_justify="left")
        for h in headers:
            table.add_column(h, justify="left" if h in ("case", "pass", "impl") else "right")
        previous = None
        for row in rows:
            group = tuple(row[:2])
            shown = list(row)
            if previous is not None and group != previous:
                table.add_section()
            elif previous is not None:
                shown[0] = shown[1] = ""  # the case and pass head their section only
            previous = group
            style = None if row[3] not in ("FAILED", "SKIPPED") else ("red" if row[3] == "FAILED" else "dim")
            table.add_row(*shown, style=style)
        console.print(table)
        for n in notes:
            console.print(f"  [dim]{n}[/dim]", highlight=False)


# -- plots --------------------------------------------------------------------------------------


def plots(records: Sequence[Record], meta: dict[str, Any], out_dir: str) -> list[str]:
    """Time vs M (layer and decode suites) and rooflines (layer, decode, adapter); returns the PNG paths.

    Needs matplotlib (the ``test`` extra); without it, returns [] and says so.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastlora bench: matplotlib is not installed; no plots (pip install matplotlib)")
        return []
    written = []
    timed = [r for r in records if r.status == OK and r.ms]
    for suite in ("layer", "decode", "adapter"):
        rows = [r for r in timed if r.suite == suite and r.m is not None]
        for dtype, r_ in sorted({(r.dtype, r.r) for r in rows}):
            group = [r for r in rows if r.dtype == dtype and r.r == r_]
            if len({r.m for r in group}) > 1:
                path = os.path.join(out_dir, f"time_vs_M_{suite}_{dtype}_r{r_}.png")
                written.append(_time_vs_m(plt, group, meta, path))
        for dtype in sorted({r.dtype for r in timed if r.suite == suite and r.flops and r.bytes}):
            group = [r for r in timed if r.suite == suite and r.dtype == dtype and r.flops and r.bytes]
            written.append(_roofline(plt, group, meta, dtype, os.path.join(out_dir, f"roofline_{suite}_{dtype}.png")))
    models = [r for r in timed if r.suite == "model"]
    if models:
        written.append(_model_bars(plt, models, meta, os.path.join(out_dir, "model_step.png")))
    return written


def _subtitle(meta: dict[str, Any]) -> str:
    return f"{meta.get('device')} · {str(meta.get('date'))[:10]} · torch {meta.get('torch')}"


def _time_vs_m(plt, records: list[Record], meta: dict[str, Any], path: str) -> str:
    shapes = list(dict.fromkeys(r.shape for r in records))
    passes = list(dict.fromkeys(r.pass_ for r in records))
    impls = list(dict.fromkeys(r.impl for r in records))
    fig, axes = plt.subplots(len(shapes), len(passes), figsize=(4.2 * len(passes), 3.2 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, pass_ in enumerate(passes):
            ax = axes[i][j]
            for impl in impls:
                pts = sorted((r.m, r.ms) for r in records if (r.shape, r.pass_, r.impl) == (shape, pass_, impl))
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{shape} (in x out), {pass_}", fontsize=9)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("ms (median)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    r0 = records[0]
    fig.suptitle(f"{r0.suite}: time vs M, {r0.dtype}, r={r0.r}\n{_subtitle(meta)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _roofline(plt, records: list[Record], meta: dict[str, Any], dtype: str, path: str) -> str:
    peaks = meta.get("device_peaks") or {}
    fig, ax = plt.subplots(figsize=(7, 5))
    for impl in dict.fromkeys(r.impl for r in records):
        pts = [(r.flops / r.bytes, r.tflops) for r in records if r.impl == impl]
        ax.scatter(*zip(*pts, strict=True), label=impl, s=18)
    intensities = [r.flops / r.bytes for r in records]
    lo, hi = min(intensities) / 2, max(intensities) * 2
    compute, bw = peaks.get("tflops", {}).get(dtype), peaks.get("copy_gbs")
    if compute and bw:
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(xs, [min(compute, x * bw / 1e3) for x in xs], "k--", lw=1,
                label=f"measured: {compute:.3g} TFLOP/s, {bw:.4g} GB/s")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / compulsory byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"roofline, {records[0].suite} suite, {dtype}\n{_subtitle(meta)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _model_bars(plt, records: list[Record], meta: dict[str, Any], path: str) -> str:
    cases = list(dict.fromkeys(r.case for r in records))
    impls = list(dict.fromkeys(r.impl for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        tps = [next((r.tokens_per_s for r in records if (r.case, r.impl) == (c, impl)), 0) or 0 for c in cases]
        mem = [next((r.peak_mib for r in records if (r.case, r.impl) == (c, impl)), 0) or 0 for c in cases]
        xs = [i + j * width for i in range(len(cases))]
        axes[0].bar(xs, tps, width, label=impl)
        axes[1].bar(xs, mem, width, label=impl)
    for ax, label in zip(axes, ("tokens / s (training step)", "peak MiB (n/a on CPU)"), strict=True):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, fontsize=7, rotation=10)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"model suite: one LoRA training step\n{_subtitle(meta)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
