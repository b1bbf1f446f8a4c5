"""SASS helpers shared by the static cost models (benchmarks/cuda_sass.py, benchmarks/triton_sass.py).

No GPU needed: the cubin is disassembled with triton's own ``cuobjdump``; these functions parse its text.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")


def cuobjdump() -> str:
    """Path of triton's bundled cuobjdump (else one on PATH)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if path.is_file():
        return str(path)
    found = shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump: neither triton's (backends/nvidia/bin) nor one on PATH")
    return found


def functions(sass_text: str) -> dict[str, str]:
    """Kernel name -> its SASS body, from ``cuobjdump --dump-sass`` output."""
    out = {}
    for body in re.split(r"\n\s*Function : ", sass_text)[1:]:
        header, _, rest = body.partition("\n")
        out[header.strip()] = rest
    return out


def instructions(body: str) -> list[tuple[int, str]]:
    """(address, instruction text without the trailing ';') of every instruction of one function body."""
    return [(int(a, 16), op) for a, op in _INSTRUCTION.findall(body)]


def opcode(op: str) -> str:
    """The opcode with its modifiers, predicate stripped: ``@!P0 LDG.E.U8 R1, ...`` -> ``LDG.E.U8``."""
    rest = _PREDICATE.sub("", op.strip())
    return rest.split()[0] if rest else ""


def innermost_loop(ins: list[tuple[int, str]], contains) -> tuple[int, int] | None:
    """(first, last) address of the shortest backward branch's range that holds an instruction for which
    ``contains(op)`` is true; None when there is none."""
    hits = [a for a, op in ins if contains(op)]
    loop = None
    for a, op in ins:
        target = re.search(r"BRA(?:\.\w+)* (0x[0-9a-f]+)", op)
        if target and int(target.group(1), 16) < a:
            lo = int(target.group(1), 16)
            if any(lo <= h <= a for h in hits) and (loop is None or a - lo < loop[1] - loop[0]):
                loop = (lo, a)
    return loop


def blocks_per_sm(registers: int, threads: int, shared: int = 0) -> int:
    """Blocks an SM holds (sm_80/sm_90): 65536 registers a SM allocated per warp in units of 256, at most
    2048 threads and 32 blocks, and ``shared`` bytes a block of the 227 KiB (sm_90) a block may use
    (plus 1 KiB the driver reserves a block)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = 65536 // (per_warp * (threads // 32))
    by_shared = (228 * 1024) // (shared + 1024) if shared else 32
    return max(0, min(by_regs, 2048 // threads, by_shared, 32))
