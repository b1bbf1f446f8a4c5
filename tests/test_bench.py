"""fastlora.bench: the correctness guard, FLOP/byte accounting, writers, tables, plots and the CLI.

All on small CPU shapes. The guard is exercised with deliberately wrong implementations: each must be
reported FAILED with the reason and never timed (its forward runs exactly once: the guard's run).
"""

import argparse
import csv
import dataclasses
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastlora import native
from fastlora.bench import adapter, cases, decode, guard, layer, model, records, report
from fastlora.bench.cli import add_parser
from fastlora.bench.cli import run as run_cli
from fastlora.bench.records import FAILED, OK, SKIPPED, Record
from fastlora.bench.suites import fastlora_failures, write_outputs
from fastlora.bench.timing import TimerConfig, measure

TINY_TIMER = TimerConfig(warmup=1, min_reps=3, max_reps=3, rep_ms=0.0)
TINY_CASES = [cases.LayerCase(k=40, n=24, m=m, r=4, dtype="bf16") for m in (3, 17)]


def _peers() -> None:
    """The peers the suites compare with (test extras); without them those rows are SKIPPED by design."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")


# -- the guard ------------------------------------------------------------------------------


def test_errors_and_bounds():
    ref = torch.tensor([3.0, -4.0])
    assert guard.errors(ref.clone(), ref) == (0.0, 0.0)
    rel, worst = guard.errors(torch.tensor([3.0, -3.0]), ref)  # diff (0, 1): norm 1 / 5, max 1 / 4
    assert rel == pytest.approx(0.2) and worst == pytest.approx(0.25)
    assert all(math.isnan(e) for e in guard.errors(torch.tensor([3.0, math.nan]), ref))
    assert guard.bounds(torch.bfloat16) == (1e-2, 3e-2)
    assert guard.bounds(torch.float16, baseline=(4e-3, 1e-3)) == (8e-3, 6e-3)  # 2x the baseline where larger
    with pytest.raises(ValueError, match="no tolerance for dtype"):
        guard.bounds(torch.float64)


def test_check_rejects_wrong_missing_misshapen_and_nan():
    ref = {"y": torch.randn(5, 7, dtype=torch.float64)}
    good = {"y": ref["y"].float()}
    assert guard.check("impl", good, ref, torch.float32)["y"][0] < 1e-6
    wrong = {"y": ref["y"].float() * 1.001}  # 1e-3: fine for bf16, wrong for fp32
    guard.check("impl", wrong, ref, torch.bfloat16)
    with pytest.raises(guard.WrongResult, match=r"impl: y differs from the reference: rel 1\.0+e-03"):
        guard.check("impl", wrong, ref, torch.float32)
    one_element = ref["y"].float().clone()
    one_element[3, 4] += 0.1 * ref["y"].abs().max().item()  # a single element off by 10% of the scale
    with pytest.raises(guard.WrongResult, match="worst"):
        guard.check("impl", {"y": one_element.bfloat16()}, ref, torch.bfloat16)
    with pytest.raises(guard.WrongResult, match="was not computed"):
        guard.check("impl", {"y": None}, ref, torch.float32)
    with pytest.raises(guard.WrongResult, match=r"has shape \(7, 5\), expected \(5, 7\)"):
        guard.check("impl", {"y": ref["y"].T.float()}, ref, torch.float32)
    nan = ref["y"].float().clone()
    nan[0, 0] = math.nan
    with pytest.raises(guard.WrongResult, match="rel nan"):
        guard.check("impl", {"y": nan}, ref, torch.bfloat16, baseline={"y": (1.0, 1.0)})


def _wrong_builder(kind: str, calls: list[int]):
    """Builds every layer implementation normally, except "fastlora", which is wrong in one way."""

    def builder(name, wt, dtype):
        impl = layer.build(name, wt, dtype)
        if name != "fastlora":
            return impl
        forward = impl.forward
        if kind == "lora-scale":  # the LoRA term 10% too large: forward and every gradient off
            a, b = impl.params["dA"], impl.params["dB"]

            def wrong(x):
                return forward(x) + 0.1 * wt.scale * (x @ a.T) @ b.T

        elif kind == "no-dA":  # A detached: its gradient is never computed
            a_detached = impl.params["dA"].detach()

            def wrong(x):
                return torch.nn.functional.linear(x, wt.w) + wt.scale * (x @ a_detached.T) @ impl.params["dB"].T

        elif kind == "nan":

            def wrong(x):
                y = forward(x)
                return torch.cat([y[:-1], torch.full_like(y[-1:], math.nan)])

        def counted(x):
            calls.append(1)
            return wrong(x)

        return dataclasses.replace(impl, forward=counted)

    return builder


@pytest.mark.parametrize("kind", ["lora-scale", "no-dA", "nan"])
def test_guard_rejects_a_wrong_implementation_and_never_times_it(kind):
    calls: list[int] = []
    recs = layer.run(TINY_CASES[:1], cuda=False, timer=TINY_TIMER, impls=("torch", "fastlora"),
                     builder=_wrong_builder(kind, calls))  # fmt: skip
    wrong = [r for r in recs if r.impl == "fastlora"]
    assert [r.pass_ for r in wrong] == ["fwd", "bwd", "fwd+bwd"]
    assert all(r.status == FAILED and r.ms is None and r.tflops is None for r in wrong)
    expected = {"lora-scale": "differs from the reference", "no-dA": "dA was not computed", "nan": "rel nan"}[kind]
    assert all(expected in r.note for r in wrong), wrong[0].note
    assert len(calls) == 1  # the guard's forward only: nothing was timed
    assert all(r.status == OK and r.ms > 0 for r in recs if r.impl == "torch")
    assert fastlora_failures(recs) == wrong


def test_guard_reports_a_crash_as_failed():
    def builder(name, wt, dtype):
        impl = layer.build(name, wt, dtype)

        def crash(x):
            raise RuntimeError("kernel launch failed")

        return dataclasses.replace(impl, forward=crash) if name == "fastlora" else impl

    recs = layer.run(TINY_CASES[:1], cuda=False, timer=TINY_TIMER, impls=("fastlora",), builder=builder)
    assert {(r.status, r.note) for r in recs} == {(FAILED, "raised RuntimeError: kernel launch failed")}


def test_layer_suite_all_implementations_pass_their_guard():
    _peers()
    recs = layer.run(TINY_CASES, cuda=False, timer=TINY_TIMER)
    by_status = {(r.impl, r.status) for r in recs}
    for impl in layer.IMPLS:
        assert (impl, OK) in by_status, [r.note for r in recs if r.impl == impl]
    for r in recs:
        assert r.ms > 0 and r.q20 <= r.ms <= r.q80 and r.reps == 3
        assert r.max_rel_err < 1e-2  # bf16 against the fp32 reference
        assert r.peak_mib is None  # CPU: n/a, never an estimate
        assert r.tflops == pytest.approx(r.flops / r.ms / 1e9) and r.gbs == pytest.approx(r.bytes / r.ms / 1e6)


@pytest.mark.parametrize("kind", ["magnitude", "norm-not-detached", "no-dm"])
def test_dora_rows_guard_against_peft_dora_and_reject_a_wrong_dora(kind):
    """The DoRA rows: peft's DoRA (dense and over bnb NF4) and fastlora's pass the guard, which also compares dm;
    a DoRA 5 % off, one whose norm takes part in backward, or one whose m gets no gradient FAILS, untimed."""
    _peers()
    calls: list[int] = []

    def builder(name, wt, dtype):
        impl = layer.build(name, wt, dtype)
        if name != "fastlora-dora":
            return impl
        a, b, m, w = impl.params["dA"], impl.params["dB"], impl.params["dm"], wt.w.to(dtype)
        norm = (w + wt.scale * b @ a).norm(dim=1)  # the §4.3 detach forgotten: dA and dB change
        if kind == "magnitude":
            wrong = lambda x: 1.05 * impl.forward(x)  # noqa: E731
        elif kind == "norm-not-detached":
            wrong = lambda x: (x @ w.T + wt.scale * (x @ a.T) @ b.T) * (m / norm)  # noqa: E731
        else:  # m detached: dm never computed
            wrong = lambda x: (x @ w.T + wt.scale * (x @ a.T) @ b.T) * (m.detach() / norm.detach())  # noqa: E731

        def counted(x):
            calls.append(1)
            return wrong(x)

        return dataclasses.replace(impl, forward=counted)

    names = ("peft-dora", "peft+bnb-dora-nf4", "fastlora-dora", "fastlora-dora-nf4")
    recs = layer.run(TINY_CASES[:1], cuda=False, timer=TINY_TIMER, impls=names, builder=builder)
    assert all(r.status == OK for r in recs if r.impl != "fastlora-dora"), [r.note for r in recs]
    wrong = [r for r in recs if r.impl == "fastlora-dora"]
    assert all(r.status == FAILED and r.ms is None for r in wrong), wrong[0].note
    expected = {"magnitude": "y differs", "norm-not-detached": "differs", "no-dm": "was not computed"}[kind]
    assert expected in wrong[0].note, wrong[0].note
    assert len(calls) == 1


def test_model_guard_passes_the_peers_and_rejects_a_wrong_model(monkeypatch):
    _peers()
    pytest.importorskip("transformers")
    tiny = cases.ModelCase("llama-tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=96,
                           batch=1, seq=16, r=4)  # fmt: skip
    real_build = model.build

    def build(name, base, r):
        built = real_build(name, base, r)
        if name == "fastlora":  # one layer's output 5% too large
            _, lora_layer = next(built.lora_layers())
            lora_layer.register_forward_hook(lambda module, args, out: out * 1.05)
        return built

    monkeypatch.setattr(model, "build", build)
    recs = model.run([tiny], cuda=False, timer=TINY_TIMER)
    status = {r.impl: r for r in recs}
    for name in ("fastlora-nf4", "peft+bnb-nf4", "peft"):
        assert status[name].status == OK, status[name].note
        assert status[name].tokens_per_s == pytest.approx(16 / (status[name].ms / 1e3))
        assert "trainable" in status[name].note
    assert status["fastlora"].status == FAILED and status["fastlora"].ms is None
    assert "differs from the reference" in status["fastlora"].note


def test_decode_and_adapter_suites_guard_every_implementation():
    _peers()
    recs = decode.run(TINY_CASES[:1], cuda=False, timer=TINY_TIMER)
    recs += adapter.run([cases.AdapterCase(d=48, m=5, r=8, dtype="bf16")], cuda=False, timer=TINY_TIMER)
    built = native.is_built()  # an install without the extension (FASTLORA_NO_EXT, no compiler) skips its rows
    for r in recs:
        if r.impl in ("native-nf4", "fastlora-native") and not built:
            assert r.status == SKIPPED and "fastlora.native" in r.note, (r.impl, r.status, r.note)  # says why
        else:
            assert r.status == OK, (r.impl, r.note)
    assert {r.suite for r in recs} == {"decode", "dequant", "adapter"}
    ran = [r for r in recs if r.suite == "dequant" and r.status == OK]
    assert {r.impl for r in ran} >= {"fastlora", "bitsandbytes", "copy"} | ({"fastlora-native"} if built else set())
    assert all(r.max_rel_err == 0.0 for r in ran), [(r.impl, r.max_rel_err) for r in ran]  # bit for bit


# -- case lists ------------------------------------------------------------------------------


def test_full_layer_cases_cover_the_issue_axes():
    full = cases.layer_cases(quick=False)
    assert {c.m for c in full} == {1, 16, 512, 4096, 16384}
    assert {c.r for c in full} == {8, 16, 64} and {c.dtype for c in full} == {"bf16", "fp16"}
    assert {(c.k, c.n) for c in full} == {s for m in cases.LLAMA_SHAPES.values() for s in m.values()}
    assert len(full) == len(set(full)) == 8 * 5 + 2 * 2 + 4 * 2  # grid + rank sweep + fp16 pass
    eight_b = cases.layer_cases(quick=False, shapes=cases.parse_shapes("llama3-8b"))
    seventy_b = cases.layer_cases(quick=False, shapes=cases.parse_shapes("llama3-70b"))
    assert sorted(eight_b + seventy_b, key=lambda c: c.id) == sorted(full, key=lambda c: c.id)  # two calls, one set
    assert cases.parse_shapes("4096x14336, tiny") == [(4096, 14336, ""), *cases.parse_shapes("tiny")]
    crossed = cases.layer_cases(quick=False, shapes=[(64, 32, "")], tokens=[3, 5], ranks=[2], dtypes=["fp32"])
    assert [c.id for c in crossed] == ["64x32-M3-r2-fp32", "64x32-M5-r2-fp32"]
    assert all(c.m <= 16 for c in cases.decode_cases(quick=False, tokens=[1, 16, 4096]))
    with pytest.raises(ValueError, match="unknown model"):
        cases.model_cases(quick=False, names=["llama-7t"])


# -- FLOP and byte accounting ---------------------------------------------------------------


def test_lora_flops_and_bytes_by_hand():
    m, k, n, r = 2, 3, 5, 1
    assert layer.lora_flops(m, k, n, r, "fwd") == 2 * 2 * 3 * 5 + 2 * 2 * 1 * 8 == 92
    assert layer.lora_flops(m, k, n, r, "bwd") == 60 + 4 * 2 * 1 * 8 == 124
    assert layer.lora_flops(m, k, n, r, "fwd+bwd") == 216
    # fwd: x 6 + y 10 + u 2 elements, bf16, + 30-byte weight + A, B (8 elements)
    assert layer.lora_bytes(m, k, n, r, 2, 30, "fwd") == (6 + 10 + 2) * 2 + 30 + 8 * 2
    # bwd: g 10 + x 6 + dx 6 + u 2 elements + weight + A, B read and dA, dB written
    assert layer.lora_bytes(m, k, n, r, 2, 30, "bwd") == (10 + 12 + 2) * 2 + 30 + 2 * 8 * 2


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_flop_counts_match_torch_flop_counter(pass_):
    """The counted FLOPs are what PyTorch's own counter sees the plain implementations execute."""
    case = cases.LayerCase(k=40, n=24, m=7, r=4, dtype="fp32")
    wt = layer.make_weights(case.k, case.n, case.r, torch.float32, "cpu")
    impl = layer.build("torch", wt, torch.float32)
    x, g = layer.inputs(case, "cpu")
    with FlopCounterMode(display=False) as counter:
        y = impl.forward(x)
        if pass_ == "fwd+bwd":
            y.backward(g)
    assert counter.get_total_flops() == layer.lora_flops(case.m, case.k, case.n, case.r, pass_)

    acase = cases.AdapterCase(d=40, m=7, r=4, dtype="fp32")
    weights = adapter.make_weights(acase.d, acase.r, torch.float32, "cpu")
    impl = adapter.build("torch", weights)
    x = torch.randn(acase.m, acase.d, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y = impl.forward(x)
        if pass_ == "fwd+bwd":
            y.backward(torch.randn_like(y))
    assert counter.get_total_flops() == adapter.adapter_flops(acase.m, acase.d, acase.r, pass_)


def test_weight_bytes_count_packed_4bit_and_statistics():
    wt = layer.make_weights(128, 64, 4, torch.bfloat16, "cpu")
    assert wt.weight_bytes("dense") == 128 * 64 * 2
    state = wt.quant["nf4"][1]
    # 4 bits per value, one uint8 absmax per 64 values (double quant), + the nested statistics and code tables
    assert wt.weight_bytes("nf4") == 128 * 64 // 2 + state.nbytes()
    assert 128 * 64 // 2 + 128 * 64 // 64 <= wt.weight_bytes("nf4") < 128 * 64 // 2 + 128 * 64 // 64 + 2048


def test_timer_median_and_quantiles():
    import time

    delays = iter([0.002, 0.001, 0.003, 0.004, 0.005])
    t = measure(lambda: time.sleep(next(delays)), cuda=False, config=TimerConfig(warmup=0, min_reps=5, max_reps=5))
    assert t.reps == 5
    assert t.q20 <= t.ms <= t.q80
    # each call takes at least its sleep, so the median is at least the middle sleep (3 ms); load only adds
    assert 3.0 <= t.ms < 100


# -- records, writers, tables, plots ---------------------------------------------------------


def _records() -> list[Record]:
    recs = []
    for impl, ms in (("torch", 2.0), ("peft", 3.0), ("fastlora", 1.0)):
        for m in (16, 4096):
            rec = Record(suite="layer", case=f"64x96-M{m}-r16-bf16", impl=impl, pass_="fwd", shape="64x96", m=m,
                         r=16, dtype="bf16", ms=ms * m, q20=ms * m * 0.9, q80=ms * m * 1.1, reps=10,
                         flops=layer.lora_flops(m, 64, 96, 16, "fwd"), bytes=1000 * m, max_rel_err=3e-3)  # fmt: skip
            recs.append(rec.finish())
    note = "skipped: bitsandbytes is unavailable"
    recs.append(Record(suite="layer", case="64x96-M16-r16-bf16", impl="peft+bnb-nf4", pass_="fwd", shape="64x96",
                       m=16, r=16, dtype="bf16", status=SKIPPED, note=note))  # fmt: skip
    records.add_ratios(recs, layer.REFERENCES)
    return recs


def _meta() -> dict:
    meta = records.metadata(cuda=False, quick=True, argv=["fastlora", "bench", "--quick"])
    meta["device_peaks"] = {"tflops": {"bf16": 1.0}, "copy_gbs": 10.0, "matmul_n": 512, "copy_mib": 32}
    return meta


def test_ratios_against_each_reference():
    recs = _records()
    fast = next(r for r in recs if r.impl == "fastlora" and r.m == 16)
    assert fast.ratios == {"torch": pytest.approx(0.5), "peft": pytest.approx(1 / 3)}
    assert next(r for r in recs if r.impl == "torch" and r.m == 16).ratios["torch"] == 1.0
    assert next(r for r in recs if r.status == SKIPPED).ratios == {}


def test_metadata_json_and_csv(tmp_path):
    recs, meta = _records(), _meta()
    for key in ("device", "date", "torch", "triton", "fastlora", "peft", "bitsandbytes", "git_commit", "quick"):
        assert key in meta
    assert meta["device"].startswith("cpu") and meta["torch"] == torch.__version__
    paths = write_outputs(str(tmp_path), meta, recs, plots=False)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["results.json", "results.csv", "results.md"]

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["device"] == meta["device"] and data["meta"]["device_peaks"]["copy_gbs"] == 10.0
    assert len(data["results"]) == len(recs)
    assert data["results"][0]["pass"] == "fwd" and data["results"][0]["ratios"] == {"torch": 1.0, "peft": 2 / 3}
    meta_back, recs_back = records.read_json(str(tmp_path / "results.json"))
    assert recs_back == recs and meta_back["date"] == meta["date"]

    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == len(recs)
    assert {"device", "date", "torch", "triton", "fastlora", "git_commit", "t/t(torch)", "t/t(peft)"} <= set(rows[0])
    assert all(row["device"] == meta["device"] and row["torch"] == torch.__version__ for row in rows)
    fast = next(row for row in rows if row["impl"] == "fastlora" and row["m"] == "16")
    assert float(fast["t/t(torch)"]) == pytest.approx(0.5) and float(fast["ms"]) == 16.0
    skipped = next(row for row in rows if row["status"] == SKIPPED)
    assert skipped["ms"] == "" and "bitsandbytes" in skipped["note"]

    md = (tmp_path / "results.md").read_text()
    assert meta["device"] in md and "GPU figures need a GPU" in md and "| t/t(torch) | t/t(peft) |" in md


def test_table_has_a_ratio_column_per_reference():
    headers, rows, notes = report.table_rows("layer", _records(), _meta())
    assert headers[:3] == ["case", "pass", "impl"]
    assert headers[-len(layer.REFERENCES) :] == [f"t/t({ref})" for ref in layer.REFERENCES]
    fast = next(row for row in rows if row[2] == "fastlora" and row[0].startswith("64x96 M=16"))
    assert fast[headers.index("t/t(torch)")] == "0.50" and fast[headers.index("t/t(peft+bnb-nf4)")] == "-"
    assert next(row for row in rows if row[2] == "peft+bnb-nf4")[headers.index("ms")] == SKIPPED
    assert notes == ["peft+bnb-nf4: skipped: bitsandbytes is unavailable"]
    decode_headers, _, _ = report.table_rows("decode", [], _meta())
    assert "of copy" in decode_headers and decode_headers[-3:] == [f"t/t({r})" for r in decode.REFERENCES]


def test_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    recs = _records()
    step = Record(suite="model", case="tiny", impl="fastlora-nf4", pass_="step", shape="tiny", m=256, r=16,
                  dtype="bf16", ms=10.0, q20=9.0, q80=11.0, flops=10**9, tokens_per_s=25600.0)  # fmt: skip
    recs.append(step.finish())
    paths = report.plots(recs, _meta(), str(tmp_path))
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert names == ["model_step.png", "roofline_layer_bf16.png", "time_vs_M_layer_bf16_r16.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -- the CLI ------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastlora")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_quick_end_to_end(tmp_path, capsys):
    _peers()
    out = tmp_path / "bench"
    args = _parse(["bench", "--quick", "--suite", "layer", "--shapes", "40x24", "--tokens", "3,17", "--ranks", "4",
                   "--impls", "torch,fastlora,fastlora-nf4,peft+bnb-nf4", "--out", str(out)])  # fmt: skip
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    assert "GPU figures need a GPU" in printed and "t/t(torch)" in printed
    files = sorted(p.name for p in out.iterdir())
    assert files == ["results.csv", "results.json", "results.md", "roofline_layer_bf16.png",
                     "time_vs_M_layer_bf16_r4.png"]  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["quick"] is True and data["meta"]["gpu"] is False
    assert data["meta"]["device_peaks"]["copy_gbs"] > 0 and data["meta"]["device_peaks"]["tflops"]["bf16"] > 0
    got = {(r["impl"], r["m"], r["pass"]) for r in data["results"] if r["status"] == OK}
    impls = ("torch", "fastlora", "fastlora-nf4", "peft+bnb-nf4")
    assert got == {(i, m, p) for i in impls for m in (3, 17) for p in ("fwd", "bwd", "fwd+bwd")}


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        _parse(["bench", "--shapes", "40by24"])
    with pytest.raises(SystemExit):
        _parse(["bench", "--tokens", "0"])
    assert "fastlora bench: a shape is IN x OUT" in capsys.readouterr().err
    assert run_cli(_parse(["bench", "--quick", "--impls", "cublas"])) == 2
    assert "unknown implementation ['cublas']" in capsys.readouterr().err
