"""The fused QLoRA GEMM's 4-bit decoding on the GPU path (inline PTX, which the interpreter cannot run) and the
shape of its sm_90 main loop.

- The byte-permute code table (``quant4._prmt_lut_asm``) is executed instruction by instruction by a small PTX
  emulator over every byte value: its 8 outputs are the bits of the code table (NF4 and FP4), so the GPU path is
  bit-equal to the reference without a GPU.
- The sm_90 binary the launcher's JIT builds (the AOT spec with the run-time specialisation) has no select tree
  (FSEL) in its K loop, loads the packed bytes with cp.async (LDGSTS) rather than byte loads (LDG.E.U8, 8 a step
  before), and keeps within an instruction budget per K step (issue 20, bf16 NF4 128 x 128 x 32: 390 / 382
  instructions a step before, forward / input gradient; 255 / 237 after).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fastlora.kernels import quant4
from fastlora.quant.codes import get_code


def _prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte i of the result is byte (c's nibble i & 7) of {b, a}, or its
    sign replicated when the nibble's bit 3 is set."""
    pool, out = a | (b << 32), 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (pool >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    return sum(((lut >> (((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1))) & 1) << i for i in range(32))


def _run_ptx(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """Execute the straight-line subset of PTX the table uses (and, shr, prmt, lop3 on .b32/.u32)."""
    env = dict(regs)

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else env[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [t.strip() for t in rest.split(",")]
        s = [val(t) for t in src]
        if op == "and.b32":
            env[dst] = s[0] & s[1]
        elif op == "shr.u32":
            env[dst] = s[0] >> s[1]
        elif op == "prmt.b32":
            env[dst] = _prmt(*s)
        elif op == "lop3.b32":
            env[dst] = _lop3(*s)
        else:
            raise AssertionError(f"unexpected instruction {line!r}")
    return env


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_byte_permute_code_table_is_bit_equal(quant_type):
    asm = quant4._prmt_lut_asm(quant_type)
    code = [c & 0xFFFFFFFF for c in get_code(quant_type).view(torch.int32).tolist()]
    # the 8 register words, as the kernel passes them (pack 4: argument j fills $(9 + 4j) .. $(12 + 4j))
    words = [getattr(quant4, f"_{quant_type.upper()}_R{j}").value & 0xFFFFFFFF for j in range(8)]
    assert words == quant4._lut_words(quant_type)[0::2]
    regs = {f"${9 + 4 * j + i}": w for j, w in enumerate(words) for i in range(4)}
    for base in range(0, 256, 4):  # every byte value, in every position of the packed word
        for rot in range(4):
            bytes_ = [(base + (i + rot) % 4 * 61) % 256 for i in range(4)]
            regs["$8"] = sum(b << (8 * i) for i, b in enumerate(bytes_))
            out = _run_ptx(asm, regs)
            assert [out[f"${i}"] for i in range(4)] == [code[b >> 4] for b in bytes_]
            assert [out[f"${4 + i}"] for i in range(4)] == [code[b & 0xF] for b in bytes_]


_SASS_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastlora.kernels
from fastlora.aot import _cuobjdump, registered
spec = next(s for s in registered() if s.name == sys.argv[1])
signature, constexprs, attrs = spec.runtime_signature()
src = ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs)
options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "k.cubin")
    open(p, "wb").write(c.asm["cubin"])
    sass = subprocess.run([_cuobjdump(), "--dump-sass", p], capture_output=True, text=True).stdout
json.dump({"sass": sass}, sys.stdout)
"""


def _main_loop(sass: str) -> list[str]:
    """The opcodes of the loop whose body holds the HGMMA: from a backward branch's target to the branch."""
    line = r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)"
    ins = [(int(a, 16), op) for a, op in re.findall(line, sass)]
    loops = []
    for addr, op in ins:
        target = re.search(rf"/\*{addr:04x}\*/[^;]*BRA[^;]*0x([0-9a-f]+)", sass)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            loops.append([o for a, o in ins if int(target.group(1), 16) <= a <= addr])
    return max(loops, key=lambda body: (sum(o.startswith("HGMMA") for o in body), len(body)))


@pytest.mark.parametrize(
    "name, budget",
    [(f"lora_matmul[bfloat16,nf4-nested-aligned-{d},cfg0]", 270) for d in ("fwd", "dx")],
)
def test_sm90_main_loop_shape(name, budget):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _SASS_SCRIPT, name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loop = _main_loop(json.loads(proc.stdout)["sass"])
    ops = [op.split(".")[0] for op in loop]
    assert ops.count("HGMMA") >= 1
    assert "FSEL" not in ops, "the 4-bit codes are decoded by a select tree"
    # one byte load remains: the double-quantised absmax of the thread's block (8 before, one per byte pair)
    assert sum(op.startswith("LDG.E.U8") for op in loop) <= 1, "the packed bytes arrive as byte loads"
    assert any(op.startswith("LDGSTS") for op in loop)
    assert len(loop) <= budget, f"{len(loop)} instructions a K step"
