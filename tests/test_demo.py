"""`moe-reroute demo` end to end on the shipped reference model, with small settings."""

from __future__ import annotations

import json

from moe_reroute.cli import main
from moe_reroute.measure.report import uniform_expectation


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["demo", "--sequences", "112", "--seq-len", "32", "--no-sweep", "--generate", "4", "--replay-steps", "4",
                 "--shape", "reference", "--bench-steps", "4", "--repeats", "1", "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    policies = ["native", "cap:k=4", "oea:k0=3", "sere", "budget:budget=32"]
    by = {b: {r["policy"]: r for r in result["rows"] if r["batching"] == b} for b in ("same-domain", "mixed")}
    for batching, rows in by.items():
        assert list(rows) == policies, batching
        native = rows["native"]
        assert native["batch_size"] == 16 and native["delta_ce"] == 0.0 and native["experts_per_token"] == 8.0
        assert 8 < native["mean_unique"] < uniform_expectation(128, 8, 16)  # trained routing is more concentrated
        assert rows["cap:k=4"]["experts_per_token"] == 4.0
        for name in ("cap:k=4", "oea:k0=3", "sere"):
            assert rows[name]["mean_unique"] < native["mean_unique"]
        assert rows["budget:budget=32"]["mean_unique"] <= 32.0 + 1e-9
        assert result["latency_ratio"][batching]["native"] == 1.0 and set(result["latency_ratio"][batching]) == set(rows)
    # batches of one domain touch fewer experts than batches mixing the domains
    assert by["same-domain"]["native"]["mean_unique"] < by["mixed"]["native"]["mean_unique"]
    for name in ("report.md", "pareto_u.png", "u_vs_batch.png", "u_per_layer.png"):
        assert (out / name).stat().st_size > 0
    # latency plot only from timings that are not noise (one repeat cannot tell: noise)
    assert result["latency_noise"]["same-domain"]["noisy"] and not (out / "pareto_latency.png").exists()
    assert set(result["phases"]) == {"quality", "generation", "U vs batch", "latency", "report"}
    # the report holds both batchings, as printed, and rebuilds from its own results.json
    md = (out / "report.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert "| mixed | oea:k0=3 |" in md and saved["more"]["mixed"]["evaluation"]["rows"]
    assert main(["report", str(out / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == md
