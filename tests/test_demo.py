"""`moe-reroute demo` end to end on the shipped reference model, with small settings."""

from __future__ import annotations

import json
import re

import pytest
import torch

from moe_reroute.cli import main
from moe_reroute.measure.report import uniform_expectation

PHASES = {"quality", "generation", "U vs batch", "latency"}


@pytest.mark.long
def test_demo_small(tmp_path, capsys):
    out = tmp_path / "report"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code = main(["demo", "--sequences", "112", "--seq-len", "32", "--no-sweep", "--generate", "4", "--replay-steps",
                     "4", "--shape", "reference", "--bench-steps", "4", "--repeats", "1", "--out", str(out), "--json"])
        # the demo runs on one thread by default and gives the caller's setting back
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    policies = ["native", "cap:k=4", "oea:k0=3", "sere", "budget:budget=32", "tuned:tuned-oea.json"]
    by = {b: {r["policy"]: r for r in result["rows"] if r["batching"] == b} for b in ("same-domain", "mixed")}
    for batching, rows in by.items():
        assert list(rows) == policies, batching
        native = rows["native"]
        assert native["batch_size"] == 16 and native["delta_ce"] == 0.0 and native["experts_per_token"] == 8.0
        assert 8 < native["mean_unique"] < uniform_expectation(128, 8, 16)  # trained routing is more concentrated
        assert rows["cap:k=4"]["experts_per_token"] == 4.0
        for name in ("cap:k=4", "oea:k0=3", "sere", "tuned:tuned-oea.json"):
            assert rows[name]["mean_unique"] < native["mean_unique"]
        assert rows["budget:budget=32"]["mean_unique"] <= 32.0 + 1e-9
        assert result["latency_ratio"][batching]["native"] == 1.0 and set(result["latency_ratio"][batching]) == set(rows)
    # batches of one domain touch fewer experts than batches mixing the domains
    assert by["same-domain"]["native"]["mean_unique"] < by["mixed"]["native"]["mean_unique"]
    for name in ("report.md", "pareto_u.png", "u_vs_batch.png", "u_per_layer.png"):
        assert (out / name).stat().st_size > 0
    # latency plot only from timings that are not noise (one repeat cannot tell: noise)
    assert result["latency_noise"]["same-domain"]["noisy"] and not (out / "pareto_latency.png").exists()
    assert set(result["phases"]) == set(result["phases_cpu"]) == PHASES | {"report"}
    assert result["threads"] == 1 and 0 < result["cpu_seconds"]
    # the report holds both batchings, as printed, and rebuilds from its own results.json
    md = (out / "report.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert saved["bench"]["bandwidth"]["method"].endswith("CPU, 1 thread")  # measured while the demo held one thread
    assert "| mixed | oea:k0=3 |" in md and saved["more"]["mixed"]["evaluation"]["rows"]
    assert main(["report", str(out / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == md


@pytest.mark.long
def test_demo_progress_lines_name_their_phase(tmp_path, capsys):
    """In a log (stderr not a terminal) every progress line starts with its phase's tag, every phase ends
    with its elapsed and CPU time, and the summary gives both for the whole run."""
    code = main(["demo", "--sequences", "112", "--seq-len", "8", "--no-sweep", "--generate", "2", "--replay-steps", "2",
                 "--shape", "reference", "--bench-steps", "1", "--repeats", "1", "--out", str(tmp_path / "r")])
    assert code == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if re.search(r": \d+/\d+ .*\(\d+%\), \d+ s$", line)]
    tags = {m.group(1) for line in progress if (m := re.match(r"\[\d/4 ([^]]+)\]", line))}
    assert progress and all(re.match(r"\[\d/4 [^]]+\]", line) for line in progress), progress
    assert tags == PHASES, tags  # each phase reports progress
    for phase in PHASES:
        assert re.search(rf"^\[\d/4 {phase}\] done in \d+ s \(CPU \d+ s\)$", captured.out, re.M), phase
    assert re.search(r"^Elapsed: quality \d+ s, .* s in all \(CPU time \d+ s, 1 thread", captured.out, re.M)


def test_pareto_lines_are_a_family_and_its_fixed_parameters():
    """Each line of the Pareto plot is a family swept by its tuned parameter; other parameters (written in
    any order, lists with commas included) make another line of that family."""
    from moe_reroute.measure.report import line_of, spec_items

    assert spec_items("gain:base=2,budget=[128,32,32]") == [("base", "2"), ("budget", "[128,32,32]")]
    assert spec_items('oea:k0={"by_batch": {"4": 3, "max": 2}},p=0.9') == [
        ("k0", '{"by_batch": {"4": 3, "max": 2}}'), ("p", "0.9")]
    assert line_of("gain:budget=[128,32,32]") == ("gain", "budget=[128,32,32]")
    assert line_of("gain:base=2,budget=[128,32,32]") == ("gain:base=2", "budget=[128,32,32]")
    assert line_of("gain:budget=12,base=2") == ("gain:base=2", "budget=12")
    assert line_of("oea:k0=3,p=0.9") == ("oea:p=0.9", "k0=3")
    assert line_of("native") == ("native", "")
    assert line_of("xshare:budget=32,k0=1") == ("xshare", "budget=32,k0=1")  # no swept parameter: one line
    assert line_of("tuned:tuned-oea.json") == ("tuned", "tuned-oea.json")
