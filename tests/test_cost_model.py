"""The static sm_90 cost model (benchmarks/triton_sass.py): its SASS parser and arithmetic on a hand-made
snippet (no compiler), the generated crossover table's shape, and (marked ``aot``: compiles) the configs
the model chooses at the Llama-3-8B shapes within their committed instruction and register budgets."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = ROOT / "benchmarks" / "results" / "static-sm90-2026-12-02" / "budgets.json"


@pytest.fixture(scope="module")
def model():
    """benchmarks/triton_sass.py loaded from its file (registered in sys.modules: it defines a dataclass)."""
    spec = importlib.util.spec_from_file_location("triton_sass", ROOT / "benchmarks" / "triton_sass.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["triton_sass"] = module
    spec.loader.exec_module(module)
    return module


# A main loop of two warpgroups (8 warps): 2 wgmma 64x128x16 with A and B in shared memory, a byte load used
# in the same iteration, a wait depth 0, and after it a LoRA loop with one wgmma (less FLOP: not the main loop).
SNIPPET = """
        Function : kernel
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;
        /*0020*/                   LDG.E.U8 R8, desc[UR4][R10.64] ;
        /*0030*/                   LOP3.LUT R9, R8, 0xf, RZ, 0xc0, !PT ;
        /*0040*/                   FSEL R12, R13, R14, P0 ;
        /*0050*/                   FSEL R15, R13, R14, P1 ;
        /*0060*/                   FMUL R16, R12, R17 ;
        /*0070*/                   IMAD.MOV.U32 R18, RZ, RZ, R19 ;
        /*0080*/                   F2FP.BF16.F32.PACK_AB R20, R16, R15 ;
        /*0090*/                   STS.128 [R21], R20 ;
        /*00a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00b0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*00c0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;
        /*00d0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00e0*/                   UIADD3 UR4, UR4, 0x40, URZ ;
        /*00f0*/              @!P2 BRA 0x10 ;
        /*0100*/                   HGMMA.64x128x16.F32.BF16 R88, R40, gdesc[UR8], R88, gsb0 ;
        /*0110*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0120*/              @!P3 BRA 0x100 ;
        /*0130*/                   EXIT ;
        /*0140*/                   BRA 0x140 ;
"""


def test_classify(model):
    c = model.classify
    ops = ("HGMMA.64x128x16.F32.BF16", "FFMA", "IMAD.MOV.U32", "LOP3.LUT", "FSEL", "F2FP.BF16.F32.PACK_AB", "I2F.U32",
           "LDG.E.U8", "LDSM.16.M88.4", "WARPGROUP.ARRIVE", "BRA", "UMOV", "S2R")  # fmt: skip
    classes = ("tensor", "fp32", "imad", "int_alu", "select", "convert", "xu", "global", "shared", "barrier", "branch",
               "uniform", "other")  # fmt: skip
    assert tuple(c(o) for o in ops) == classes
    assert model.shared_bytes("LDS.128") == 512 and model.shared_bytes("LDS") == 128
    assert model.shared_bytes("LDSM.16.M88.4") == 512 and model.shared_bytes("LDGSTS.E.BYPASS.128") == 512
    assert model.global_bytes("LDG.E.U8") == (32, 0) and model.global_bytes("STG.E.128") == (0, 512)
    assert model.hgmma_info("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24") == (
        2 * 64 * 128 * 16,
        16 * 128 * 2 + 64 * 16 * 2,
    )
    assert model.hgmma_info("HGMMA.64x128x16.F32.BF16 R88, R40, gdesc[UR8], R88, gsb0")[1] == 16 * 128 * 2


def test_parser_and_arithmetic_on_a_snippet(model):
    a = model.analyse_sass(SNIPPET.split("Function : kernel", 1)[1], num_warps=8, num_stages=3)
    assert a["loop"] == "mma" and a["length"] == 15  # 0x10 .. 0xf0: the K loop, not the LoRA loop
    c = a["counts"]
    assert (c["tensor"], c["select"], c["int_alu"], c["fp32"], c["imad"], c["convert"]) == (2, 2, 1, 1, 1, 1)
    assert (c["global"], c["shared"], c["barrier"], c["branch"], c["uniform"]) == (2, 1, 2, 1, 1)
    assert a["flop"] == 2 * (2 * 64 * 128 * 16) * 2  # 2 wgmma a warpgroup, 2 warpgroups
    assert a["wait_depth"] == 0 and a["sync_loads"] and a["hgmma"] == 2
    # shared: (LDGSTS 512 + STS.128 512) a warp x 8 + 2 wgmma x (B 4096 + A 2048) x 2 warpgroups
    assert a["smem_bytes"] == 1024 * 8 + 2 * 6144 * 2
    assert a["l2_bytes"] == (512 + 32) * 8
    a.update(num_warps=8, num_stages=3, ctas_per_sm=1)
    r = model.resource_clocks(a, 8)
    assert r["tensor"] == pytest.approx(a["flop"] / (4096 * model.TENSOR_EFF))
    assert r["issue"] == 15 * 8 / 4 and r["alu"] == (1 + 2 + 1) * 8 / 2 and r["fma"] == max((1 + 1) * 8 / 4, 8 / 2)
    assert r["smem"] == a["smem_bytes"] / 128
    u = model.unit_clocks(a, model.H100, 1)
    assert u["overlap"] == pytest.approx(r["tensor"] + max(r["issue"], r["alu"], r["fma"]))  # wait depth 0, 1 CTA
    assert u["latency"] == model.H100.l2_latency_clk  # a byte load used in its own iteration: no pipelining
    ceil_ = model.ceilings(a, model.H100)
    nominal = a["flop"] / 4096
    assert ceil_["issue"] == pytest.approx(min(1, nominal / r["issue"]))
    assert ceil_["bound"] == pytest.approx(nominal / u["bound"]) and ceil_["bound"] <= model.TENSOR_EFF


def test_crossover_table_generated_in_format():
    from fastlora.ops import crossover_table as t

    assert t.COLUMNS == ("arch", "quant", "dtype", "k", "n", "fwd_max_m", "dx_max_m", "fwd_gemm", "dx_gemm")
    keys = {row[:5] for row in t.ROWS}
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096)):
        for quant in ("nf4", "fp4", "dense"):
            for dtype in ("bf16", "fp16", "fp32"):
                assert (90, quant, dtype, k, n) in keys
    assert all(len(row) == 9 and row[5] >= 0 and row[6] >= 0 for row in t.ROWS)
    assert all(row[7] in ("cublas_c", "kext") and row[8] in ("cublas_c", "kext") for row in t.ROWS)


@pytest.mark.aot
def test_chosen_configs_within_budgets(model):
    budgets = json.loads(BUDGETS.read_text())
    rows = {r["name"]: r for r in model.compile_all(sorted(budgets))}
    for name, budget in budgets.items():
        row = rows.get(name)
        if row is None:
            continue  # the config left the registry: budgets.json is regenerated with it (--write-budgets)
        assert row["ok"], row.get("error")
        assert row["registers"] <= budget["registers"], (name, row["registers"], budget)
        assert row["length"] <= budget["main_loop_instructions"], (name, row["length"], budget)
