"""What a new user meets first: the latency noise check, the report (both batchings, plots named for what
they show, rebuilt from its own results.json), commands naming the extra they need, logs without
carriage-return bars, progress lines that say what they count."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from moe_reroute.measure import bench, costmodel, report
from moe_reroute.progress import _Milestones


def test_timing_spread_hand_computed():
    """IQR / median of each call's repeats (torch.quantile, linear), the median over calls."""
    steady = {"native": [[10.0, 10.0, 10.0, 10.0], [20.0, 20.0, 20.0, 20.0]], "cap": [[5.0, 5.0, 5.0, 5.0]]}
    assert bench.timing_spread(steady) == 0.0
    # [10, 20, 30, 40]: q25 17.5, median 25, q75 32.5 -> 0.6; the other two calls 0 -> median 0
    assert bench.timing_spread({"a": [[10.0, 20.0, 30.0, 40.0]]}) == pytest.approx(0.6)
    assert bench.timing_spread({"a": [[10.0, 20.0, 30.0, 40.0], [1.0] * 4, [2.0] * 4]}) == 0.0
    assert math.isnan(bench.timing_spread({"a": [[1.0, 2.0]]}))  # two repeats cannot tell


def test_bench_result_says_noise_when_it_cannot_tell():
    """One repeat gives no spread: the run is marked noisy, not reported as measured ratios."""
    from moe_reroute import make_policy
    from moe_reroute.measure.shapes import get_shape

    shape = get_shape("reference")
    routings = bench.uniform_routings({"native": make_policy("native")}, shape, 4, 2)
    res = bench.bench_policies(shape, routings, "cpu", repeats=1, warmup=0, progress=False, flush=False)
    assert math.isnan(res.spread) and res.noisy
    assert res.to_dict()["noisy"] is True


def test_cost_model_with_a_negative_coefficient_is_called_unphysical():
    # exact data: 2 ms per expert, 0.1 ms per slot, 1 ms fixed: physical
    good = costmodel.fit_cost_model([(u, s, 2 * u + 0.1 * s + 1) for u in (4, 8, 16) for s in (8, 32)])
    assert costmodel.physical_warnings(good) == []
    # latency falling with more slots: a negative per-slot cost
    bad = costmodel.fit_cost_model([(u, s, 2 * u - 0.1 * s + 10) for u in (4, 8, 16) for s in (8, 32)])
    assert bad.a < 0
    (line,) = costmodel.physical_warnings(bad)
    assert "not physical" in line and "per token-expert slot (a)" in line


def _rows(batching: str) -> list[dict]:
    rows = []
    for policy, u in (("native", 60.0), ("cap:k=4", 40.0), ("cap:k=2", 25.0), ("oea:k0=3", 30.0)):
        rows.append({"policy": policy, "batch_size": 16, "mean_unique": u + (20 if batching == "mixed" else 0),
                     "experts_per_token": 8.0, "cross_entropy": 3.0, "delta_ce": 0.0 if policy == "native" else 0.02,
                     "delta_ce_ci": [0.0, 0.0] if policy == "native" else [0.01, 0.03],
                     "significant_loss": policy != "native", "worse_by_se_rule": False, "top1_agreement": 0.9,
                     "kl_native_policy": 0.01, "unique_per_layer": {"0": u, "1": u - 1, "2": u - 2},
                     "batching": batching})
    return rows


def _evaluation(batching: str) -> dict:
    return {"rows": _rows(batching), "conditions": {"model": "m", "num_experts": 128, "top_k": 8,
                                                     "bootstrap_resamples": 100, "batching": batching}}


def _bench(noisy: bool) -> dict:
    """Latency of native and the defaults only (the sweep rows have none), as the demo measures it."""
    ratios = {"native": 1.0, "cap:k=4": 0.7, "oea:k0=3": 0.62}
    policies = {p: {"mean_unique": 50.0, "median_ms": 10 * r, "iqr_ms": 1.0, "achieved_gbps": 10.0,
                    "ratio_vs_native": r} for p, r in ratios.items()}
    return {"command": "c", "shape": {"name": "s", "hidden": 8, "intermediate": 4, "num_experts": 128, "top_k": 8,
                                      "bytes_per_expert": 1e6},
            "routing": "r", "bandwidth": {"gbps": 10.0, "method": "m"},
            "results": {"16": {"dtype": "float32", "device": "cpu", "kernel": "loop", "kernel_note": "n", "cache": "c",
                               "policies": policies, "spread": 0.4 if noisy else 0.02, "noisy": noisy}}}


@pytest.mark.parametrize("noisy", [False, True])
def test_report_latency_plot_only_from_measured_latency(tmp_path, noisy):
    """pareto_latency.png exists only for latency that was measured and is not noise, and then it differs
    from pareto_u.png; noisy timings read 'noise' in the tables instead of ratios."""
    path = report.write(tmp_path, _evaluation("same-domain"), "cmd", bench=_bench(noisy), batch=16)
    md = path.read_text()
    latency_png = tmp_path / "pareto_latency.png"
    assert latency_png.exists() != noisy
    if noisy:
        assert "| noise |" in md and "0.70" not in md and "the ratios are noise" in md
    else:
        assert "| 0.70 |" in md and "| noise |" not in md
        assert latency_png.read_bytes() != (tmp_path / "pareto_u.png").read_bytes()


def test_report_without_latency_has_no_latency_plot(tmp_path):
    report.write(tmp_path, _evaluation("same-domain"), "cmd", batch=16)
    assert not (tmp_path / "pareto_latency.png").exists() and (tmp_path / "pareto_u.png").exists()


def test_report_holds_both_batchings_and_rebuilds_from_its_results(tmp_path, capsys):
    """The demo's report: the printed summary, the mixed rows with their latency; `moe-reroute report
    results.json` writes the same report.md again."""
    from moe_reroute.cli import main

    first = tmp_path / "first"
    summary = "| batches | policy |\n| --- | --- |\n| mixed | native |"
    report.write(first, _evaluation("same-domain"), "moe-reroute demo", bench=_bench(False), batch=16,
                 u_by_batch={"native": {1: 8.0, 16: 60.0}}, more={"mixed": {"evaluation": _evaluation("mixed"),
                                                                           "bench": _bench(True)}},
                 summary=summary, phases={"quality": 12.0})
    md = (first / "report.md").read_text()
    assert summary in md and "## Quality and cost: mixed" in md and "quality 12 s" in md
    mixed_section = md.split("## Quality and cost: mixed")[1]
    assert "| 80.0 |" in mixed_section and "| noise |" in mixed_section  # mixed U (60 + 20), its latency noise
    again = tmp_path / "again"
    assert main(["report", str(first / "results.json"), "--out", str(again)]) == 0
    assert (again / "report.md").read_text() == md
    assert json.loads((again / "results.json").read_text()) == json.loads((first / "results.json").read_text())


def test_plot_styles_distinct_per_family():
    families = ["native", "cap:k=4", "oea:k0=3", "sere", "budget:budget=32", "tuned:x.json"]
    styles = [report.style(f) for f in families]
    assert len({c for c, _ in styles}) == len(families) and len({m for _, m in styles}) == len(families)
    assert report.style("cap:k=2") == report.style("cap:k=6")  # a family keeps its colour


def test_command_needing_an_extra_says_which_before_anything_else(monkeypatch, capsys):
    import importlib.util

    from moe_reroute.cli import CommandError, main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    for argv in (["demo"], ["eval"], ["tune", "--policy", "oea"], ["synth-model", "--shape", "qwen3-30b-a3b", "--layers", "2", "--out", "x"]):
        with pytest.raises(CommandError) as e:
            main(argv)
        out = capsys.readouterr()
        assert out.out == "" and "pip install 'moe-reroute[hf" in out.err and "transformers" in out.err, argv
        assert e.value.code == 2


@pytest.mark.long
def test_reference_load_prints_no_carriage_return_bar_into_a_log():
    code = "from moe_reroute.reference import load; load()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "Loading weights" not in done.stderr


def test_progress_lines_name_what_they_count_and_come_while_slow(capsys):
    bar = _Milestones(1000, "[4/4 latency] mixed batches", "calls", every=0.0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4  # three slow updates and the end, though no quarter was reached
    assert all(line.startswith("[4/4 latency] mixed batches: ") and " calls" in line for line in lines)


def test_triton_hint_names_the_extra(monkeypatch):
    from moe_reroute import kernels

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    kernels._triton_status.cache_clear()
    try:
        ok, why = kernels._triton_status()
    finally:
        kernels._triton_status.cache_clear()
    assert not ok and "moe-reroute[kernels]" in why
