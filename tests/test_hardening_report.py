"""`moe-reroute report` checks every field it reads, naming the file and field, before it makes anything;
it writes into a temporary folder moved into place, and replaces another report only with --force."""


import json

import pytest

from cli_helpers import bad_input
from moe_reroute.cli import main
from test_cli_errors import eval_result


def bench_result() -> dict:
    policies = {name: {"mean_unique": u, "median_ms": 1.0, "iqr_ms": 0.1, "achieved_gbps": 10.0,
                       "ratio_vs_native": r} for name, u, r in (("native", 8.0, 1.0), ("oea:k0=1", 6.0, 0.8))}
    return {"command": "moe-reroute bench --json",
            "shape": {"name": "tiny", "hidden": 8, "intermediate": 4, "num_experts": 16, "top_k": 4,
                      "bytes_per_expert": 1000.0},
            "routing": "uniform", "bandwidth": {"gbps": 20.0, "method": "copy"},
            "results": {"2": {"dtype": "float32", "device": "cpu", "kernel": "loop", "kernel_note": "n",
                              "cache": "cold", "policies": policies}},
            "cost_model": {"b": 0.1, "a": 0.01, "c": 0.5, "r2": 0.9}}


def serve_result() -> dict:
    rows = [{"policy": p, "batch": 2, "tpot_ms": 10.0, "tpot_ms_min": 9.0, "tpot_ms_max": 11.0,
             "decode_tokens_per_s": 100.0, "prefill_ms": 5.0, "tpot_ratio": None if p == "native" else 0.9,
             "tpot_ratio_ci": None if p == "native" else [0.8, 1.0], "unique": 5.0, "unique_native": 6.0}
            for p in ("native", "oea:k0=1")]
    return {"command": "moe-reroute serve-bench", "mode": "offline",
            "conditions": {"model": "m", "model_note": "", "vllm": "0.0", "device": "cpu", "dtype": "float32",
                           "enforce_eager": True, "prompt_len": 16, "output_len": 32, "repeats": 2},
            "labels": {}, "rows": rows}


def _set(obj, path, value):
    *head, last = path
    for k in head:
        obj = obj[k]
    if value is KeyError:
        del obj[last]
    else:
        obj[last] = value


@pytest.mark.parametrize("path,value,needles", [
    (("rows", 0, "batch_size"), 10 ** 30, ["rows[0].batch_size", "must be in 1..1048576"]),
    (("conditions", "num_experts"), 0, ["conditions.num_experts", "must be in 1..65536, got 0"]),
    (("conditions", "num_experts"), -3, ["conditions.num_experts"]),
    (("conditions", "top_k"), 17, ["conditions.top_k", "must be in 1..16, got 17"]),
    (("conditions", "bootstrap_resamples"), "50", ["conditions", "bootstrap_resamples"]),
    (("rows", 1, "mean_unique"), float("nan"), ["rows[1].mean_unique", "finite number"]),
    (("rows", 1, "mean_unique"), 17.0, ["rows[1].mean_unique", "must be in 0..16"]),
    (("rows", 2, "delta_ce_ci"), [0.5, "x"], ["rows[2].delta_ce_ci[1]", "finite number"]),
    (("rows", 2, "delta_ce_ci"), [0.5, 0.1], ["rows[2].delta_ce_ci", "low 0.5 is above high 0.1"]),
    (("rows", 0, "unique_per_layer"), {"x": 1.0}, ["rows[0].unique_per_layer", "not a layer number"]),
    (("rows", 0, "unique_per_layer"), {"0": "many"}, ["rows[0].unique_per_layer['0']", "finite number"]),
    (("rows", 0, "top1_agreement"), 2.0, ["rows[0].top1_agreement"]),
    (("generation",), [{"policy": "oea:k0=1", "batch_size": 2}], ["generation[0].generated_tokens"]),
    (("generation",), [{"policy": "oea:k0=1", "batch_size": 2, "generated_tokens": 4, "differing_tokens": 1,
                        "identical_sequences": 1, "first_divergence_step": ["soon"]}],
     ["generation[0].first_divergence_step[0]"]),
    (("generation",), "all fine", ["generation", "JSON array"]),
    (("command",), 3, ["command", "must be a string"]),
])
def test_bad_eval_fields_are_named_and_nothing_is_made(tmp_path, capsys, path, value, needles):
    data = eval_result()
    _set(data, path, value)
    f = tmp_path / "eval.json"
    f.write_text(json.dumps(data))
    out = tmp_path / "rep"
    bad_input(capsys, ["report", f, "--out", out], str(f), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # no folder, no temporary folder


@pytest.mark.parametrize("path,value,needles", [
    (("results", "2", "policies"), KeyError, ["results['2'].policies", "JSON object"]),
    (("results", "2", "policies", "native", "median_ms"), "fast", ["policies['native'].median_ms"]),
    (("results", "2", "device"), None, ["results['2'].device", "string"]),
    (("results", "1000000000000000000000000000000"), {}, ["must be a batch size"]),
    (("shape", "num_experts"), 0, ["shape.num_experts"]),
    (("shape", "top_k"), 99, ["shape.top_k", "1..16"]),
    (("bandwidth", "gbps"), "lots", ["bandwidth.gbps"]),
    (("cost_model", "b"), "x", ["cost_model.b"]),
])
def test_bad_bench_fields(tmp_path, capsys, path, value, needles):
    (tmp_path / "eval.json").write_text(json.dumps(eval_result()))
    data = bench_result()
    _set(data, path, value)
    f = tmp_path / "bench.json"
    f.write_text(json.dumps(data))
    bad_input(capsys, ["report", tmp_path / "eval.json", "--bench", f, "--out", tmp_path / "rep"],
              f"--bench {f}", *needles)
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("path,value,needles", [
    (("rows", 0, "policy"), KeyError, ["rows[0].policy", "string"]),
    (("conditions",), KeyError, ["conditions", "JSON object"]),
    (("conditions", "repeats"), 0, ["conditions.repeats"]),
    (("rows", 1, "batch"), 10 ** 30, ["rows[1].batch"]),
    (("rows", 1, "tpot_ms"), "slow", ["rows[1].tpot_ms"]),
    (("rows", 1, "tpot_ratio_ci"), [1], ["rows[1].tpot_ratio_ci", "[low, high]"]),
    (("mode",), "online", ["mode"]),
    (("rows",), [], ["rows", "non-empty"]),
])
def test_bad_serve_bench_fields(tmp_path, capsys, path, value, needles):
    (tmp_path / "eval.json").write_text(json.dumps(eval_result()))
    data = serve_result()
    _set(data, path, value)
    f = tmp_path / "serve.json"
    f.write_text(json.dumps(data))
    bad_input(capsys, ["report", tmp_path / "eval.json", "--serve-bench", f, "--out", tmp_path / "rep"],
              f"--serve-bench {f}", *needles)
    assert not (tmp_path / "rep").exists()


def serve_mode_result() -> dict:
    """A `serve-bench --serve --prompts` results.json."""
    rows = [{"policy": p, "concurrency": 4, "repeats": 1, "output_throughput": 50.0, "p50_ttft_ms": 400.0,
             "p99_ttft_ms": 900.0, "p50_tpot_ms": 70.0, "p90_tpot_ms": 80.0, "p99_tpot_ms": 90.0,
             "throughput_ratio": 1.0 if p == "native" else 1.3, "throughput_ratio_ci": None,
             "unique": 5.0 if p != "native" else 6.0, "unique_native": 6.0, "steps_rerouted": 20, "steps_seen": 21,
             "tokens_rerouted": 15, "decode_tokens": 15, "decode_tokens_rerouted": 15} for p in ("native", "oea:k0=1")]
    data = serve_result()
    data["mode"] = "serve"
    data["conditions"].update(num_prompts=3, request_rate="inf", method="ab", prompts={
        "file": "/data/mine.jsonl", "sha256": "ab" * 32, "requests": 3, "prompt_tokens_mean": 9.0,
        "prompt_tokens_max": 12, "output_tokens_mean": 6.0, "output_tokens_max": 8})
    data["rows"] = rows
    return data


@pytest.mark.parametrize("path,value,needles", [
    (("conditions", "prompts"), [], ["conditions.prompts", "JSON object"]),
    (("conditions", "prompts", "requests"), "many", ["conditions.prompts.requests"]),
    (("conditions", "prompts", "sha256"), KeyError, ["conditions.prompts.sha256", "string"]),
    (("conditions", "prompts", "output_tokens_mean"), -1, ["conditions.prompts.output_tokens_mean"]),
])
def test_serve_mode_prompts_fields(tmp_path, capsys, path, value, needles):
    """--serve --prompts results: the report says whose requests ran; a bad `prompts` field is named."""
    pytest.importorskip("matplotlib")
    (tmp_path / "eval.json").write_text(json.dumps(eval_result()))
    f = tmp_path / "serve.json"
    f.write_text(json.dumps(serve_mode_result()))
    assert main(["report", str(tmp_path / "eval.json"), "--serve-bench", str(f), "--batch-size", "2", "--out",
                 str(tmp_path / "good")]) == 0
    assert "3 requests of the user's own from `/data/mine.jsonl` (sha256 abababababab)" in (
        tmp_path / "good" / "report.md").read_text()
    data = serve_mode_result()
    _set(data, path, value)
    f.write_text(json.dumps(data))
    bad_input(capsys, ["report", tmp_path / "eval.json", "--serve-bench", f, "--out", tmp_path / "rep"],
              f"--serve-bench {f}", *needles)
    assert not (tmp_path / "rep").exists()


def test_good_inputs_make_a_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "eval.json").write_text(json.dumps(eval_result()))
    (tmp_path / "bench.json").write_text(json.dumps(bench_result()))
    (tmp_path / "serve.json").write_text(json.dumps(serve_result()))
    assert main(["report", str(tmp_path / "eval.json"), "--bench", str(tmp_path / "bench.json"), "--serve-bench",
                 str(tmp_path / "serve.json"), "--batch-size", "2", "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## MoE-layer latency" in md and "End-to-end engine speed" in md
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_another_report_is_replaced_only_with_force(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    f = tmp_path / "eval.json"
    f.write_text(json.dumps(eval_result()))
    out = tmp_path / "rep"
    assert main(["report", str(f), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    first = (out / "report.md").read_text()
    data = eval_result(model="second")
    f.write_text(json.dumps(data))
    bad_input(capsys, ["report", f, "--out", out], f"--out {out} already holds a report", "--force")
    assert (out / "report.md").read_text() == first
    assert main(["report", str(f), "--out", str(out), "--force"]) == 0
    assert "second" in (out / "report.md").read_text().splitlines()[0]
    assert (out / "notes.txt").read_text() == "mine"  # files that are not the report's stay
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failure_part_way_leaves_out_as_it_was(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from moe_reroute.measure import report

    f = tmp_path / "eval.json"
    f.write_text(json.dumps(eval_result()))
    real = report.plot_u_per_layer

    def broken(*args, **kwargs):
        real(*args, **kwargs)
        raise ValueError("plotting failed")

    monkeypatch.setattr(report, "plot_u_per_layer", broken)
    bad_input(capsys, ["report", f, "--out", tmp_path / "rep"], "plotting failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # no half-written folder
    monkeypatch.setattr(report, "plot_u_per_layer", real)
    assert main(["report", str(f), "--out", str(tmp_path / "rep")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()}
    monkeypatch.setattr(report, "plot_u_per_layer", broken)
    bad_input(capsys, ["report", f, "--out", tmp_path / "rep", "--force"], "plotting failed")
    assert {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

