"""``fastlora env``: what this install runs on, for bug reports.

Versions (Python, torch, CUDA, triton, bitsandbytes, peft, transformers ...), the toolchain the native
kernels compile with, the native extension's state and cache directory, and for every op in
:mod:`fastlora.dispatch` which backends can run it on CPU and CUDA tensors here, and why any cannot
(extension not built, no GPU, Triton's interpreter off ...). Nothing is compiled unless ``--build``
asks for it, and no package is imported just to read its version (bitsandbytes prints on import).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

import torch

from fastlora import dispatch
from fastlora import ops as _ops  # noqa: F401  (fills the dispatch tables)
from fastlora.native import jit, loader

PACKAGES = ("torch", "triton", "bitsandbytes", "peft", "transformers", "safetensors", "numpy", "ninja", "fastlora")
ENV_VARS = (
    *("FASTLORA_BACKEND", "FASTLORA_NO_EXT", "FASTLORA_NO_JIT", "FASTLORA_JIT", "FASTLORA_CACHE_DIR"),
    *("FASTLORA_NO_CUDA", "FASTLORA_CUDA_ARCHS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "CUDA_HOME"),
)
# Calls that a condition (``Impl.when``) may turn down, to say which calls an implementation is for.
_PROBE_FACTS = ({"m": 1, "quantized": False}, {"m": 4096, "quantized": True})


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def cuda_unavailable() -> str | None:
    """Why torch sees no GPU here (None when it sees one)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device visible (driver, CUDA_VISIBLE_DEVICES)"
    return None


def _cuda() -> dict[str, Any]:
    reason = cuda_unavailable()
    devices = []
    if reason is None:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append(f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    return {"torch_cuda": torch.version.cuda, "available": reason is None, "reason": reason, "devices": devices}


def _toolchain() -> dict[str, Any]:
    compiler = os.environ.get("CXX", "c++")
    path = shutil.which(compiler)
    cfg = loader._build_config()
    ninja = cfg is not None and cfg.ensure_ninja_on_path()
    from torch.utils import cpp_extension

    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    return {
        "cxx": f"{path} ({_first_line([path, '--version'])})" if path else f"{compiler}: not found",
        "ninja": _first_line(["ninja", "--version"]) if ninja else "not found",
        "nvcc": (_first_line([nvcc, "--version"]) and nvcc) if nvcc and os.path.exists(nvcc) else "not found",
    }


def _availability(impl: dispatch.Impl, device: str) -> str:
    """'default', 'default for some calls (not: ...)', 'on request', or 'no: why' for one backend and device type."""
    if device == "cuda" and (reason := cuda_unavailable()) is not None:
        return f"no: {reason}"
    if impl.backend == "torch":
        return "reference (runs when nothing faster applies)"
    if impl.backend == "triton" and device == "cpu":
        if dispatch.interpreting():
            return "on request: TRITON_INTERPRET=1, Triton's interpreter (slow; for tests)"
        return "no: CUDA tensors only (TRITON_INTERPRET=1 set before import runs it on the CPU, for tests)"
    if device not in impl.devices:
        return f"no: no {impl.backend} kernel for {device} tensors"
    if impl.available is not None and (reason := impl.available(torch.device(device))) is not None:
        return f"no: {reason}"
    if device not in impl.default_on:
        return "on request (backend= or FASTLORA_BACKEND)"
    if impl.when is None:
        return "default"
    limits = []
    for facts in _PROBE_FACTS:
        try:
            reason = impl.when(facts)
        except (KeyError, TypeError):
            continue
        if reason is not None and reason not in limits:
            limits.append(reason)
    return f"default for some calls (not: {'; '.join(limits)})" if limits else "default"


def collect(build: bool = False) -> dict[str, Any]:
    """Everything ``fastlora env`` prints, as plain data.

    Args:
        build: compile the native kernels now when no built or cached module exists (else nothing compiles).
    """
    if build:
        loader.load(jit=True)
    state = loader.status()
    with loader.no_compile():
        ops = {
            op: {
                impl.backend: {d: _availability(impl, d) for d in ("cpu", "cuda")}
                for impl in dispatch.table(op).values()
            }
            for op in sorted(dispatch._TABLES)  # every registered op (the dispatcher's own registry)
        }
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "packages": {p: _version(p) for p in PACKAGES},
        "cuda": _cuda(),
        "toolchain": _toolchain(),
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "native": {
            "state": state.state,
            "origin": state.origin,
            "reason": state.reason,
            "has_cuda": state.has_cuda,
            "sources": state.sources,
            "cache": state.cache,
            "cache_root": str(jit.cache_root()),
        },
        "ops": ops,
    }


def format_report(info: dict[str, Any]) -> str:
    """The plain-text report of :func:`collect`'s data."""
    cuda, nat = info["cuda"], info["native"]
    lines = ["fastlora env (paste all of this into a bug report)", f"python        {info['python']}"]
    lines.append(f"platform      {info['platform']}")
    lines += [f"{name:<13} {version}" for name, version in info["packages"].items()]
    gpus = ", ".join(cuda["devices"]) if cuda["available"] else f"none: {cuda['reason']}"
    lines.append(f"CUDA          torch built with {cuda['torch_cuda'] or 'no CUDA'}; GPUs: {gpus}")
    tools = info["toolchain"]
    lines.append(f"compiler      {tools['cxx']}; ninja {tools['ninja']}; nvcc {tools['nvcc']}")
    env = " ".join(f"{k}={v}" for k, v in info["environment"].items()) or "(none of fastlora's variables set)"
    lines.append(f"environment   {env}")
    lines.append("")
    if nat["state"] == "loaded":
        where = f"loaded from {nat['origin']}" + (" (with its CUDA kernels)" if nat["has_cuda"] else " (CPU kernels)")
    else:  # what it costs: the CPU 4-bit ops run the PyTorch reference instead
        where = (
            f"{nat['state']}: {nat['reason']}\n              (the CPU 4-bit ops run the PyTorch reference, ~15x slower)"
        )
    lines += ["native kernels (csrc/)", f"  state       {where}", f"  sources     {nat['sources'] or 'not installed'}"]
    lines += [f"  build cache {nat['cache']}", ""]
    devices = ("cpu", "cuda") if cuda["available"] else ("cpu",)
    if cuda["available"]:
        lines.append("backends by op (which implementation can run CPU / CUDA tensors)")
    else:
        lines.append(f"backends by op for CPU tensors (no CUDA tensors here: {cuda['reason']})")
    for op, backends in info["ops"].items():
        lines.append(f"  {op}")
        for backend, where in backends.items():
            for i, device in enumerate(devices):
                lines.append(f"    {backend if i == 0 else '':<7} {device + ':':<5} {where[device]}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    """The ``env`` subcommand on ``fastlora``'s subparsers."""
    p = sub.add_parser("env", help="versions, native kernels and available backends per op: paste into bug reports")
    p.add_argument("--json", action="store_true", help="print the report as JSON (default: plain text)")
    p.add_argument("--build", action="store_true", help="compile the native kernels now if not built (once, cached)")


def run(args: argparse.Namespace) -> int:
    """Print the report; exit 0."""
    info = collect(build=args.build)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0
