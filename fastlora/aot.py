"""Ahead-of-time compilation of every Triton kernel for real GPUs, with no GPU present.

Each kernel module registers a :class:`~fastlora.kernels.specs.KernelSpec` per signature and
tuning config its launcher may pick (:mod:`fastlora.kernels.specs`, the registry, imports no
kernel; this driver imports them all, so the dependency runs one way). ``python -m fastlora.aot``
(or ``fastlora aot``) compiles all of them for sm_80 and sm_90 and reports registers, spill stack,
shared memory and tensor-core instruction counts read from the cubin with triton's own
``cuobjdump``. The test suite runs it in a subprocess (without ``TRITON_INTERPRET``), so a kernel
that only the interpreter accepts fails CI.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import fastlora.kernels  # noqa: F401  (each kernel module registers its specs on import)
from fastlora.kernels import specs
from fastlora.kernels.specs import KernelSpec


def registered() -> list[KernelSpec]:
    """All kernel specs: every kernel module registered its own when :mod:`fastlora.kernels` was imported."""
    return specs.registered()


@dataclasses.dataclass
class CompiledInfo:
    name: str
    arch: int
    registers: int
    stack: int  # bytes of stack frame: spills, local arrays or a call frame (e.g. IEEE division slow path)
    spill_stores: int  # STL instructions: register spills or local arrays
    spill_loads: int  # LDL instructions
    shared: int
    hgmma: int
    hmma: int


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec: KernelSpec, arch: int, *, sass: bool | None = None) -> CompiledInfo:
    """Compile ``spec`` for ``sm_<arch>`` and read its resource usage from the cubin.

    ``sass``: also disassemble it (about 1 s a cubin, more than most compiles) to count STL/LDL and HGMMA/HMMA.
    None: only where a count can be non-zero or is checked: a kernel with a stack frame (a spill needs one:
    STL/LDL address local memory, which the frame sizes, so with ``STACK:0`` both counts are 0 exactly) or a
    tensor-core kernel on sm_90 (HGMMA). Counts not read are -1 for HGMMA/HMMA.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.fn
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError(f"{spec.name}: not a JITFunction; unset TRITON_INTERPRET to compile ahead of time")
    signature, constexprs, attrs = spec.runtime_signature()  # the binary the launcher's JIT builds
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True).stdout
        regs = re.search(r"REG:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)
        local = re.search(r"LOCAL:(\d+)", usage)
        frame = int(stack.group(1)) if stack else -1
        if sass is None:
            sass = frame != 0 or (local is not None and local.group(1) != "0") or (spec.tensor_core and arch >= 90)
        text = ""
        if sass:
            text = subprocess.run([_cuobjdump(), "--dump-sass", path], capture_output=True, text=True).stdout
    return CompiledInfo(
        name=spec.name,
        arch=arch,
        registers=int(regs.group(1)) if regs else -1,
        stack=frame,
        spill_stores=len(re.findall(r"\bSTL(?:\.\w+)*\b", text)),
        spill_loads=len(re.findall(r"\bLDL(?:\.\w+)*\b", text)),
        shared=int(compiled.metadata.shared),
        hgmma=text.count("HGMMA") if sass else -1,
        hmma=len(re.findall(r"\bHMMA\b", text)) if sass else -1,
    )


_SPECS: list[KernelSpec] = []


def _compile_job(job: tuple[int, int]) -> dict[str, Any]:
    index, arch = job
    spec = _SPECS[index]
    try:
        info = dataclasses.asdict(compile_spec(spec, arch))
        info["ok"] = True
    except Exception as e:  # report every failure, keep going
        info = {"name": spec.name, "arch": arch, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    import triton

    info["tensor_core"] = spec.tensor_core
    info["triton"] = triton.__version__  # the compiler that produced this row
    return info


def main(argv: list[str] | None = None) -> int:
    """Compile every registered kernel; print a table, or JSON with ``--json``. Exit 1 on any failure."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fastlora.aot: unset TRITON_INTERPRET to compile kernels ahead of time", file=sys.stderr)
        return 2
    global _SPECS
    _SPECS = registered()
    archs = (80, 90)
    if "--arch" in argv:  # e.g. --arch 90: one architecture
        archs = tuple(int(a) for a in argv[argv.index("--arch") + 1].split(","))
    jobs = [(i, arch) for i in range(len(_SPECS)) for arch in archs]
    # Compiling is CPU-bound and independent per spec: one worker per core (forked, so the
    # workers share the registry).
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        results = pool.map(_compile_job, jobs, chunksize=1)
    failed = sum(not r["ok"] for r in results)
    if "--json" in argv:
        json.dump(results, sys.stdout)
    else:
        print(
            f"{'kernel':60s} {'sm':>3s} {'regs':>5s} {'stack':>5s} {'STL':>4s} {'smem':>7s} {'HGMMA':>6s} {'HMMA':>5s}"
        )
        for r in results:
            if r["ok"]:
                print(
                    f"{r['name']:60s} {r['arch']:3d} {r['registers']:5d} {r['stack']:5d} {r['spill_stores']:4d} "
                    f"{r['shared']:7d} {r['hgmma']:6d} {r['hmma']:5d}"
                )
            else:
                print(f"{r['name']:60s} {r['arch']:3d} FAILED {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
