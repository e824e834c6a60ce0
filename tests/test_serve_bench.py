"""serve-bench and synth-model without an engine: the run plan, the statistics against hand computation,
synthetic checkpoints against transformers' own reading of them, the input errors, and progress output
in logs. The engine end to end is in test_serve_bench_vllm.py (the vLLM environment)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import socket

import pytest
import torch
from cli_helpers import bad_input

from moe_reroute.measure import serve_bench as sb
from moe_reroute.measure import synth
from moe_reroute.measure.shapes import ARCHITECTURES, SHAPES, custom_shape


def test_t_interval_by_hand():
    lo, hi = sb.t_interval([0.0, 1.0, 2.0])  # mean 1, sd 1, n 3: t(2) = 4.303
    assert lo == pytest.approx(1 - 4.303 / math.sqrt(3)) and hi == pytest.approx(1 + 4.303 / math.sqrt(3))
    assert sb.t_interval([5.0]) is None


def test_offline_plan_interleaves_repeats_and_counts_once():
    cfg = sb.Config(model="m", policies=[], batch_sizes=[1, 4], repeats=2, enforce_eager=True)
    plan = sb.offline_plan(cfg, ["native", "a", "b"])
    assert [(r["batch"], r["repeat"], r["policy"]) for r in plan] == [
        (B, r, p) for B in (1, 4) for r in (0, 1) for p in ("native", "a", "b")]
    assert [r["count"] for r in plan if r["repeat"] == 0] == ["after"] * 6
    assert {r["count"] for r in plan if r["repeat"] == 1} == {"none"}
    graphs = sb.offline_plan(sb.Config(model="m", policies=[], batch_sizes=[2], repeats=1, enforce_eager=False),
                             ["native", "a"])
    # with CUDA graphs the timed runs do not count; one eager run per policy counts
    assert [(r["policy"], r["count"]) for r in graphs] == [("native", "none"), ("a", "none"), ("native", "only"),
                                                            ("a", "only")]


def test_serve_plan_rounds_hold_every_policy_in_a_drawn_order():
    """A/B serving: each round runs every policy once, in an order drawn per round from the seed (the same
    seed, the same plan); --isolate: native first in every repeat."""
    policies = ["native", "a", "b", "c"]
    ab = sb.Config(model="m", policies=[], batch_sizes=[2], repeats=6, serve=True, device="cpu").resolved()
    plan = sb.serve_plan(ab, policies)
    rounds = [[r["policy"] for r in plan if r["repeat"] == k] for k in range(6)]
    assert [r["repeat"] for r in plan] == [k for k in range(6) for _ in policies]
    assert all(sorted(order) == sorted(policies) for order in rounds)
    assert len({tuple(order) for order in rounds}) > 1  # drawn, not fixed (6 rounds of 24 orders)
    assert sb.serve_plan(ab, policies) == plan
    assert "A/B in one server" in sb.method_note(ab)
    iso = sb.Config(model="m", policies=[], batch_sizes=[2], repeats=2, serve=True, device="cpu", isolate=True)
    assert [(r["repeat"], r["policy"]) for r in sb.serve_plan(iso.resolved(), policies)] == [
        (k, p) for k in range(2) for p in policies]
    graphs = sb.Config(model="m", policies=[], batch_sizes=[2], serve=True, device="cuda", enforce_eager=False)
    assert graphs.resolved().isolate and "its own server" in sb.method_note(graphs.resolved())
    # servers replaying CUDA graphs do not count (counting would replay in every step, native's included);
    # eager servers and the offline engines do
    from moe_reroute.serving.config import COUNTERS_ENV

    assert sb.engine_env(graphs.resolved(), "native", in_process=False)[COUNTERS_ENV] == "0"
    assert "U not counted" in sb.method_note(graphs.resolved())
    for counted in (ab, iso.resolved(), dataclasses.replace(graphs, serve=False).resolved(),
                    dataclasses.replace(graphs, enforce_eager=True).resolved()):
        assert sb.engine_env(counted, "native", in_process=False)[COUNTERS_ENV] == "1"


def _run(policy, B, r, tpot, prefill=0.01, counters=None):
    out = {"policy": policy, "batch": B, "repeat": r, "tpot_s": tpot, "prefill_s": prefill,
           "decode_tokens_per_s": B / tpot}
    if counters:
        out["counters"] = counters
    return out


def _counters(u, un):
    return {str(i): {"steps": 7, "unique": a, "unique_native": b, "tokens": 4.0, "steps_seen": 8,
                     "tokens_rerouted": 28, "tokens_seen": 44, "decode_tokens_total": 30,
                     "decode_tokens_rerouted_total": 27} for i, (a, b) in enumerate(zip(u, un))}


def test_summarize_offline_by_hand():
    results = [_run("native", 4, 0, 0.100, counters=_counters([10, 12], [10, 12])), _run("p", 4, 0, 0.050,
               counters=_counters([4, 6], [10, 11])), _run("native", 4, 1, 0.200), _run("p", 4, 1, 0.080),
               _run("native", 4, 2, 0.150), _run("p", 4, 2, 0.090)]
    rows = {r["policy"]: r for r in sb.summarize_offline(results, ["native", "p"], [4])}
    p = rows["p"]
    assert p["tpot_ms"] == pytest.approx(80.0) and p["tpot_ms_min"] == pytest.approx(50.0)
    assert p["tpot_ms_max"] == pytest.approx(90.0) and p["repeats"] == 3
    logs = [math.log(0.5), math.log(0.4), math.log(0.6)]  # paired by repeat
    assert p["tpot_ratio"] == pytest.approx(math.exp(sum(logs) / 3))
    m, sd = sum(logs) / 3, (sum((x - sum(logs) / 3) ** 2 for x in logs) / 2) ** 0.5
    assert p["tpot_ratio_ci"] == pytest.approx([math.exp(m - 4.303 * sd / 3**0.5), math.exp(m + 4.303 * sd / 3**0.5)])
    assert p["unique"] == 5.0 and p["unique_native"] == 10.5 and p["unique_per_layer"] == {"0": 4, "1": 6}
    assert p["decode_tokens_per_s"] == pytest.approx(4 / 0.080)
    assert rows["native"]["tpot_ratio"] == pytest.approx(1.0) and rows["native"]["unique"] == 11.0


def test_summarize_serving_by_hand():
    def res(policy, r, tput):
        bench = {"output_throughput": tput, "p50_ttft_ms": 10.0, "p99_ttft_ms": 20.0, "p50_tpot_ms": 1000 / tput,
                 "p90_tpot_ms": 1.0, "p99_tpot_ms": 2.0}
        return {"policy": policy, "repeat": r, "batch": 8, "bench": bench, "counters": _counters([3], [9])}

    rows = sb.summarize_serving([res("native", 0, 100.0), res("p", 0, 150.0), res("native", 1, 110.0),
                                 res("p", 1, 121.0)], ["native", "p"], [8])
    p = rows[1]
    assert p["output_throughput"] == pytest.approx(135.5) and p["concurrency"] == 8
    assert p["throughput_ratio"] == pytest.approx(math.sqrt(1.5 * 1.1))
    assert (p["steps_rerouted"], p["steps_seen"], p["tokens_rerouted"], p["tokens_seen"]) == (7, 8, 28, 44)
    assert (p["decode_tokens_rerouted"], p["decode_tokens"]) == (27, 30)
    assert "| 27/30 (90%) |" in sb.table({"mode": "serve", "rows": rows})


def test_default_policies_scale_with_k(tmp_path):
    assert sb.default_policies(8) == ["cap:k=4", "oea:k0=3", "budget:budget=32"]
    assert sb.default_policies(2, tmp_path) == ["cap:k=1", "oea:k0=1", "budget:budget=8"]
    (tmp_path / "sere").mkdir()
    (tmp_path / "sere" / "similarity.safetensors").write_bytes(b"")
    assert sb.default_policies(8, tmp_path) == ["cap:k=4", "oea:k0=3", "sere", "budget:budget=32"]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_synth_plan_has_the_real_dimensions(name):
    """transformers' own reading of the config gives the table's E and K, and the model's expert tensors
    hold the table's H and I (meta device: nothing allocated)."""
    from transformers import AutoModelForCausalLM

    from moe_reroute.contract import RouterSpec

    s = SHAPES[name]
    p = synth.plan(name, 2)
    spec = RouterSpec.from_config(p.config)
    assert (spec.num_experts, spec.top_k, p.config.hidden_size) == (s.num_experts, s.top_k, s.hidden)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(p.config)
    down = [t for n, t in model.named_parameters() if "experts" in n and "down" in n]
    assert down and all(s.intermediate in t.shape and s.hidden in t.shape for t in down)
    assert p.layers == 2 and p.dense_layers == min(ARCHITECTURES[name]["dense_layers"], 1)
    assert p.params == sum(t.numel() for t in model.parameters())


def test_synth_write_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = synth.plan("deepseek-v3", 2, dims=custom_shape("64,32,16,4"))
    out = synth.write(p, tmp_path / "m", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert sum(t.numel() for t in model.parameters()) == p.params
    assert model.config.first_k_dense_replace == 1 and model.config.n_routed_experts == 16
    ids = AutoTokenizer.from_pretrained(out)("hello world", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    marker = synth.read_marker(out)
    assert marker["random_weights"] and marker["layers"] == 2 and "uniform" in marker["note"]
    assert "random weights" in sb.model_note(out)


def test_synth_dims_that_the_router_cannot_take_are_refused_before_writing(tmp_path, capsys):
    """DeepSeek-V3's router splits E into n_group=8 groups: E=15 would write a checkpoint no command loads."""
    with pytest.raises(ValueError, match="n_group=8 must divide num_experts E=15"):
        synth.plan("deepseek-v3", 2, dims=custom_shape("64,32,15,4"))
    bad_input(capsys, ["synth-model", "--shape", "deepseek-v3", "--layers", "2", "--dims", "64,32,15,4", "--out",
                       tmp_path / "m"], "--dims H=64, I=32, E=15, K=4 does not fit deepseek-v3's router")
    assert not (tmp_path / "m").exists()


def test_commands_that_load_a_synthetic_model_say_its_weights_are_random(tmp_path, capsys):
    from moe_reroute.cli.measure import load_model

    out = synth.write(synth.plan("qwen3-30b-a3b", 1, dims=custom_shape("64,32,16,4")), tmp_path / "m", progress=False)
    load_model(str(out), None, need_text=False)  # as eval, tune and calibrate load --model
    err = capsys.readouterr().err
    assert "synthetic checkpoint" in err and "random weights" in err and "quality numbers say nothing" in err
    synth_free = tmp_path / "plain"
    synth_free.mkdir()
    for f in out.iterdir():
        if f.name != synth.MARKER:
            (synth_free / f.name).symlink_to(f)
    load_model(str(synth_free), None, need_text=False)
    assert "synthetic" not in capsys.readouterr().err


def test_synth_refuses_what_does_not_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synth, "available_memory", lambda: 1024**3)
    bad_input(capsys, ["synth-model", "--shape", "qwen3-30b-a3b", "--layers", "2", "--out", tmp_path / "x"],
              "GiB of memory", "1.0 GiB is available", "fewer --layers")
    assert not (tmp_path / "x").exists()
    monkeypatch.setattr(synth, "available_memory", lambda: None)
    Usage = type("Usage", (), {"free": 10 * 1024**2})
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda path: Usage())
    bad_input(capsys, ["synth-model", "--shape", "qwen3-30b-a3b", "--layers", "2", "--out", tmp_path / "x"],
              "GiB on disk", "free")
    bad_input(capsys, ["synth-model", "--shape", "mixtral-8x7b", "--layers", "40", "--out", tmp_path / "y"],
              "has 32 decoder layers")
    bad_input(capsys, ["synth-model", "--shape", "olmoe-1b-7b", "--layers", "1", "--vocab", "100", "--out",
                       tmp_path / "y"], "--vocab", "8192")


def test_serve_bench_input_errors(tmp_path, capsys):
    bad_input(capsys, ["serve-bench", "--model", tmp_path], "no config.json", "synth-model")
    bad_input(capsys, ["serve-bench", "--policy", "oea:k0=9"], "oea:k0=9", "K=8")
    bad_input(capsys, ["serve-bench", "--batch-sizes", "0,4"], "--batch-sizes")
    tiny = synth.write(synth.plan("qwen3-30b-a3b", 1, dims=custom_shape("64,32,16,4")), tmp_path / "tiny",
                       progress=False)
    bad_input(capsys, ["serve-bench", "--model", tiny, "--policy", "sere"], "sere needs expert similarity",
              "moe-reroute calibrate")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        bad_input(capsys, ["serve-bench", "--serve", "--port", port, "--out", tmp_path / "o"], f"port {port}",
                  "--port")


def test_prompts_file_read_counted_and_recorded(tmp_path, capsys):
    """--prompts: vLLM's custom-dataset JSONL, read line by line (blank lines skipped), each request's
    output_tokens its own or --output-len, its prompt counted by the model's tokenizer; results.json records
    the file's hash and the lengths (checked by hand), and the report says so. Every bad line is named."""
    import hashlib

    from transformers import AutoTokenizer

    tiny = synth.write(synth.plan("qwen3-30b-a3b", 1, dims=custom_shape("64,32,16,4")), tmp_path / "tiny",
                       progress=False)
    tok = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    f = tmp_path / "mine.jsonl"
    texts = ["The quick brown fox", "jumps over the lazy dog near the river bank", "Hello"]
    f.write_text(json.dumps({"prompt": texts[0], "output_tokens": 10}) + "\n\n"
                 + json.dumps({"prompt": texts[1]}) + "\n" + json.dumps({"prompt": texts[2], "output_tokens": 2,
                                                                          "extra": 1}) + "\n")
    got = sb.read_prompts(str(f), 64, tok)
    counts = [len(tok(t).input_ids) for t in texts]
    assert got == [{"prompt": t, "output_tokens": o, "prompt_tokens": n} for t, o, n in zip(texts, (10, 64, 2), counts)]
    note = sb.prompts_note(got, str(f))
    assert note == {"file": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "requests": 3,
                    "prompt_tokens_mean": round(sum(counts) / 3, 1), "prompt_tokens_max": max(counts),
                    "output_tokens_mean": 25.3, "output_tokens_max": 64}
    words = sb.prompts_words({"prompts": note})
    assert f"3 requests of the user's own from `{f}`" in words and "25.3 output tokens on average (at most 64)" in words
    assert sb.prompts_words({"prompt_len": 16, "output_len": 8}) == "16 tokens of held-out text, 8 output tokens"
    cfg = sb.Config(model=str(tiny), policies=[], batch_sizes=[2], serve=True, prompts=str(f), num_prompts=3)
    assert sb.serving_requests(cfg) == got
    assert sb.requests_line(cfg, got).startswith("3 requests from mine.jsonl (")
    # without a file: held-out windows of --prompt-len tokens, --num-prompts of them (32 by default)
    held = sb.serving_requests(sb.Config(model=str(tiny), policies=[], batch_sizes=[2], serve=True, prompt_len=5))
    assert len(held) == sb.DEFAULT_NUM_PROMPTS and {(r["output_tokens"], r["prompt_tokens"]) for r in held} == {(64, 5)}
    assert all(len(tok(r["prompt"], add_special_tokens=False).input_ids) >= 4 for r in held)

    bad = {"": "holds no request",
           "not json\n": "line 1: not JSON",
           '{"prompt": "a"}\n' + "[" * 100_000 + "\n": "line 2: not JSON (nested too deeply to read)",
           '{"prompt": "a"}\n[1, 2]\n': "line 2: each line is an object",
           '{"text": "a"}\n': 'line 1: each line is an object with a non-empty "prompt"',
           '{"prompt": "   "}\n': 'non-empty "prompt"',
           '{"prompt": "a", "output_tokens": "ten"}\n': '"output_tokens" must be an integer >= 2',
           '{"prompt": "a", "output_tokens": 1}\n': "got 1",
           '{"prompt": "a", "output_tokens": true}\n': "got true",
           '{"prompt": "a", "output_tokens": 3.0}\n': "got 3.0"}
    for text, needle in bad.items():
        f.write_text(text)
        with pytest.raises(sb.BenchError, match=re.escape(needle)):
            sb.read_prompts(str(f), 64, tok)
    with pytest.raises(sb.BenchError, match="no such file"):
        sb.read_prompts(str(tmp_path / "none.jsonl"), 64, tok)
    f.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(sb.BenchError, match="not UTF-8 text"):
        sb.read_prompts(str(f), 64, tok)
    with pytest.raises(sb.BenchError, match="is a folder"):  # read from regular files only (docs/errors.md)
        sb.read_prompts(str(tmp_path), 64, tok)
    # on the command line, before any engine: serving mode only, and not with --prompt-len
    bad_input(capsys, ["serve-bench", "--model", tiny, "--prompts", f, "--out", tmp_path / "o"], "add --serve")
    bad_input(capsys, ["serve-bench", "--model", tiny, "--engine", "sglang", "--serve", "--prompts", f, "--out",
                       tmp_path / "o"], "runs vLLM only")
    bad_input(capsys, ["serve-bench", "--model", tiny, "--serve", "--prompts", f, "--prompt-len", "8"],
              "drop --prompt-len")
    bad_input(capsys, ["serve-bench", "--model", tiny, "--serve", "--num-prompts", "0"], "--num-prompts must be >= 1")
    assert not (tmp_path / "o").exists()


def test_serve_bench_without_vllm_says_how_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    bad_input(capsys, ["serve-bench", "--out", tmp_path / "o"], "not installed", "pip install 'moe-reroute[vllm]'")
    assert not (tmp_path / "o" / "results.json").exists()


def test_progress_in_a_log_prints_quarters(monkeypatch):
    from moe_reroute import progress

    err = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", err)
    bar = progress.progress(100, desc="work", unit="step")
    for _ in range(100):
        bar.update()
    bar.close()
    lines = err.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["work: 25/100 step (25%)", "work: 50/100 step (50%)",
                                                  "work: 75/100 step (75%)", "work: 100/100 step (100%)"]
    assert "\r" not in err.getvalue()


def test_results_roundtrip_and_table(tmp_path):
    data = _offline_results()
    (tmp_path / "results.json").write_text(json.dumps(data))
    back = sb.read_results(tmp_path / "results.json")
    text = sb.table(back)
    assert "| 2 | `p` | 10.00 |" in text and "0.500" in text and "3.0 (6.0)" in text
    data["labels"] = {"p": "sere"}  # shown as the user wrote it
    assert "| 2 | `sere` | 10.00 |" in sb.table(data)
    with pytest.raises(ValueError, match="serve-bench"):
        (tmp_path / "bad.json").write_text("{}")
        sb.read_results(tmp_path / "bad.json")


def _offline_results():
    return {"command": "moe-reroute serve-bench --batch-sizes 2", "mode": "offline", "policies": ["native", "p"],
            "conditions": {"model": "m", "model_note": "synthetic checkpoint (random weights)", "vllm": "0.32.0",
                           "device": "cpu", "dtype": "float32", "enforce_eager": True, "prompt_len": 16,
                           "output_len": 8, "repeats": 1},
            "rows": sb.summarize_offline([_run("native", 2, 0, 0.02, counters=_counters([6], [6])),
                                          _run("p", 2, 0, 0.01, counters=_counters([3], [6]))], ["native", "p"], [2])}


def test_report_has_an_engine_section(tmp_path, capsys):
    from test_cli_errors import eval_result

    from moe_reroute.cli import main

    (tmp_path / "eval.json").write_text(json.dumps(eval_result()))
    (tmp_path / "serve.json").write_text(json.dumps(_offline_results()))
    assert main(["report", str(tmp_path / "eval.json"), "--serve-bench", str(tmp_path / "serve.json"), "--out",
                 str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## End-to-end engine speed (vLLM, offline batches)" in md and "moe-reroute serve-bench --batch-sizes 2" in md
    assert "| 2 | `p` | 10.00 |" in md and "synthetic checkpoint (random weights)" in md
    assert (tmp_path / "r" / "engine_tpot.png").stat().st_size > 0
    (tmp_path / "bad.json").write_text('{"rows": []}')
    bad_input(capsys, ["report", tmp_path / "eval.json", "--serve-bench", tmp_path / "bad.json", "--out", tmp_path / "r2"],
              "--serve-bench", "serve-bench")


def test_failure_reason_finds_the_root_cause(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("\n".join([
        "(APIServer pid=1) WARNING 12-02 07:07:11 [x.py:1] failed with error OSError: [Errno 24] Too many open files",
        "(Worker pid=2) ERROR 12-02 07:07:42 [y.py:9] Traceback (most recent call last):",
        "(Worker pid=2) ERROR 12-02 07:07:42 [y.py:9] TypeError: bad argument 'fixed'",
        "(EngineCore pid=3) ERROR 12-02 07:07:42 [core.py:1] RuntimeError: Worker failed with error 'bad argument'",
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.", "done"]))
    assert sb.failure_reason(log) == "TypeError: bad argument 'fixed'"
    log.write_text("starting\nlast words\n")
    assert sb.failure_reason(log) == "last words"
    assert sb.failure_reason(tmp_path / "missing.log") == "no log"


def test_block_ratio_by_hand():
    """Two rounds: policy p's block medians 6 and 12 ms against native's 10 and 10 (the odd step of each
    block is an outlier the median ignores): ratios 0.6 and 1.2, estimate their geometric mean
    sqrt(0.72). A bootstrap of 2 rounds draws both ratios once (mean of logs: the estimate) with
    probability 1/2, and one of them twice with 1/4 each: the 2.5% and 97.5% points are 0.6 and 1.2."""
    rounds = [{"native": [0.010, 0.009, 0.050], "p": [0.006, 0.005, 0.007]},
              {"p": [0.012, 0.011, 0.100], "native": [0.010, 0.011, 0.009]}]
    est, ci, ratios = sb.block_ratio(rounds, "p", draws=4000, seed=1)
    assert ratios == pytest.approx([0.6, 1.2])
    assert est == pytest.approx(math.sqrt(0.6 * 1.2))
    assert ci == pytest.approx([0.6, 1.2])
    assert ci[0] <= est <= ci[1]
    same = [{"native": [0.01], "p": [0.008]}] * 5  # every round agrees: the interval is the point
    est, ci, _ = sb.block_ratio(same, "p")
    assert est == pytest.approx(0.8) and ci == pytest.approx([0.8, 0.8])
    assert sb.block_ratio([{"native": [0.01]}], "p") is None


def test_ab_schedule_rounds_hold_every_policy_in_blocks():
    import random

    from moe_reroute.measure.engine_run import ab_schedule

    plan = ab_schedule(["native", "a", "b"], 20, 2, random.Random(0))  # 3 rounds of 6 steps; 2 steps left over
    assert len(plan) == 18
    orders = []
    for r in range(3):
        steps = [p for rr, p in plan if rr == r]
        blocks = [steps[i : i + 2] for i in range(0, 6, 2)]
        assert all(b[0] == b[1] for b in blocks)  # blocks of 2 steps of one policy
        orders.append(tuple(b[0] for b in blocks))
        assert sorted(orders[-1]) == ["a", "b", "native"]
    assert len(set(ab_schedule(["native", "a", "b"], 600, 1, random.Random(0))[i][1] for i in range(0, 600, 3))) == 3


def test_summarize_ab_by_hand():
    """Per-step p50 / p90 over every step of a policy, block medians' range, the block ratio, prefill."""
    steps = []
    for rnd, (native, p) in enumerate([([10, 12, 11], [5, 6, 7]), ([20, 22, 21], [10, 40, 11])]):
        for pol, times in (("native", native), ("p", p)):
            steps += [{"generation": 0, "round": rnd, "step": 0, "policy": pol, "s": t / 1e3} for t in times]
    res = {"mode": "ab", "batch": 4, "policies": ["native", "p"], "block_steps": 3, "generations": 1,
           "prefill_s": [0.1, 0.3], "steps": steps,
           "counters": {"native": _counters([6], [6]), "p": _counters([3], [6])}}
    native, p = sb.summarize_ab([res], ["native", "p"])
    assert p["step_ms_p50"] == pytest.approx(8.5) and p["tpot_ms"] == p["step_ms_p50"]  # of 5 6 7 10 11 40
    assert p["step_ms_p90"] == pytest.approx(25.5)  # between 11 and 40
    assert (p["tpot_ms_min"], p["tpot_ms_max"]) == pytest.approx((6.0, 11.0))
    assert p["tpot_ratio"] == pytest.approx(math.sqrt(6 / 11 * 11 / 21))
    assert p["tpot_ratio_ci"][0] <= p["tpot_ratio"] <= p["tpot_ratio_ci"][1]
    assert native["tpot_ratio"] == pytest.approx(1.0) and native["prefill_ms"] == pytest.approx(200.0)
    assert p["decode_tokens_per_s"] == pytest.approx(4 / 0.0085) and p["unique"] == 3


def test_isolate_is_forced_only_with_cuda_graphs():
    assert sb.Config(model="m", policies=[], batch_sizes=[1], device="cpu").resolved().isolate is False
    compiled = sb.Config(model="m", policies=[], batch_sizes=[1], device="cpu", enforce_eager=False).resolved()
    assert compiled.isolate is False  # compiled on CPU: the policy still runs, and switches, every step
    graphs = sb.Config(model="m", policies=[], batch_sizes=[1], device="cuda", enforce_eager=False).resolved()
    assert graphs.isolate is True and "cannot switch policy" in sb.method_note(graphs)
    eager = sb.Config(model="m", policies=[], batch_sizes=[1], device="cuda", enforce_eager=True).resolved()
    assert eager.isolate is False
    assert sb.Config(model="m", policies=[], batch_sizes=[1], device="cpu", isolate=True).resolved().isolate
    cfg = sb.Config(model="m", policies=[], batch_sizes=[1], output_len=8, device="cpu")
    assert sb.ab_block_steps(cfg, 3) == 1  # 7 decode steps // (4 x 3), at least 1
    with pytest.raises(sb.BenchError, match="raise --output-len"):
        sb.ab_block_steps(sb.Config(model="m", policies=[], batch_sizes=[1], output_len=4, block_steps=2), 3)


def test_threads_reach_the_engine_and_the_load_hint(monkeypatch):
    cfg = sb.Config(model="m", policies=[], batch_sizes=[1], device="cpu", threads=1).resolved()
    assert sb.engine_env(cfg, "native", in_process=True)["OMP_NUM_THREADS"] == "1"
    assert sb.threads_note(cfg) == "1 (--threads)"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    default = sb.Config(model="m", policies=[], batch_sizes=[1], device="cpu").resolved()
    assert "OMP_NUM_THREADS" not in sb.engine_env(default, "native", in_process=True)
    monkeypatch.setattr(sb.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert sb.threads_note(default) == "the engine's default (all 2 cores on CPU)"
    bound = dataclasses.replace(default, extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert sb.threads_note(bound) == "the engine's default (all 2 cores on CPU); VLLM_CPU_OMP_THREADS_BIND=0|1"
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1")
    assert sb.threads_note(dataclasses.replace(default, engine="sglang")).endswith("; SGLANG_CPU_OMP_THREADS_BIND=0|1")
    # 2 cores: one busy with other work, the engine's default 2 threads would share it; 1 thread would not.
    assert "--threads 1" in sb.load_hint(default, 1.0) and "load average 1.0 on 2 cores" in sb.load_hint(default, 1.0)
    assert sb.load_hint(cfg, 1.0) is None
    overloaded = sb.load_hint(cfg, 3.8)  # more work than cores: no --threads helps, and none is suggested
    assert "load average 3.8 on 2 cores" in overloaded and "1 thread will share" in overloaded
    assert "--threads" not in overloaded
    assert sb.load_hint(default, 0.1) is None  # a quiet machine: no hint
    cuda = sb.Config(model="m", policies=[], batch_sizes=[1], device="cuda").resolved()
    assert sb.load_hint(cuda, 5.0) is None
    assert sb.load_hint(default, None) is None  # no load average on this platform


def test_policy_files_are_read_and_checked(tmp_path, capsys):
    from moe_reroute.reference import path as reference_path
    from moe_reroute.serving import config as plugin_config

    model = str(reference_path())
    spec = sb.router_of(sb.read_model_config(model))
    good = tmp_path / "tuned.json"
    good.write_text(json.dumps({"name": "oea", "k0": 2, "phase": "decode"}, indent=2))
    labels: dict = {}
    run = sb.resolve_policies([str(good), "oea:k0=3"], model, spec, labels)
    assert run[0] == sb.NATIVE and run[2] == "oea:k0=3"
    assert json.loads(run[1]) == {"name": "oea", "k0": 2, "phase": "decode"} and labels[run[1]] == "tuned.json"
    assert plugin_config.parse(run[1]).policy.config.k0 == 2  # the text the engine's plugin reads back
    assert sb._slug(run[1]).startswith("file-") and sb._slug(run[1]) != sb._slug('{"name":"oea","k0":1}')
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(sb.BenchError, match="bad.json: not valid JSON"):
        sb.resolve_policies([str(tmp_path / "bad.json")], model, spec)
    (tmp_path / "twice.json").write_text('{"name": "oea", "k0": 2, "k0": 3}')
    with pytest.raises(sb.BenchError, match="twice.json: key 'k0' is given twice in one object"):
        sb.resolve_policies([str(tmp_path / "twice.json")], model, spec)
    with pytest.raises(sb.BenchError, match=r"^policy spec 'bogus': unknown policy 'bogus'"):
        sb.resolve_policies(["bogus"], model, spec)
    with pytest.raises(sb.BenchError, match="does not exist"):
        sb.resolve_policies([str(tmp_path / "missing.json")], model, spec)
    (tmp_path / "k9.json").write_text(json.dumps({"name": "oea", "k0": 9}))
    with pytest.raises(sb.BenchError, match="k0"):
        sb.resolve_policies([str(tmp_path / "k9.json")], model, spec)


def test_policy_file_that_is_a_fifo_is_refused_not_read(tmp_path):
    import os

    fifo = tmp_path / "tuned.json"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(sb.BenchError, match="not a regular file"):
        sb._policy_file_text(str(fifo))


def test_sglang_engine_is_checked_before_anything_runs(tmp_path, capsys, monkeypatch):
    from moe_reroute.sglang import plugin

    monkeypatch.setattr(plugin, "sglang_version", lambda: None)
    bad_input(capsys, ["serve-bench", "--engine", "sglang", "--out", tmp_path / "o"], "SGLang, which is not installed",
              ".ci/sglang")
    monkeypatch.setattr(plugin, "sglang_version", lambda: "0.4.9")
    bad_input(capsys, ["serve-bench", "--engine", "sglang", "--out", tmp_path / "o"], "SGLang 0.4.9 is installed",
              "0.5")
    bad_input(capsys, ["serve-bench", "--engine", "sglang", "--serve", "--out", tmp_path / "o"], "offline A/B bench only",
              "drop --serve")
    bad_input(capsys, ["serve-bench", "--engine", "sglang", "--isolate", "--out", tmp_path / "o"], "drop --isolate")
    bad_input(capsys, ["serve-bench", "--engine", "sglang", "--cuda-graphs", "--out", tmp_path / "o"], "runs eager")
    assert not (tmp_path / "o").exists()


def test_sglang_runs_take_one_decode_step_less_and_their_own_environment(monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    # 9 output tokens: 8 decode steps in vLLM; SGLang's last step has no next start to time it by, so 7
    vllm = sb.Config(model="m", policies=[], batch_sizes=[1], output_len=9, block_steps=2, device="cpu")
    sglang = sb.Config(model="m", policies=[], batch_sizes=[1], output_len=9, block_steps=2, device="cpu",
                       engine="sglang")
    assert sb.ab_block_steps(vllm, 4) == 2
    with pytest.raises(sb.BenchError, match="gives 7"):
        sb.ab_block_steps(sglang, 4)
    env = sb.engine_env(sglang, "native", in_process=True)
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["MOE_REROUTE_POLICY"] == "native"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env and "VLLM_CPU_KVCACHE_SPACE" not in env
    assert "SGLang" in sb.method_note(sglang.resolved())
    assert sb.engine_label({"engine": "sglang", "engine_version": "0.5.23"}) == "SGLang 0.5.23"
    assert sb.engine_label({"vllm": "0.32.0"}) == "vLLM 0.32.0"  # a results.json from before --engine


def test_sglang_serves_an_untied_copy_of_a_tied_checkpoint(tmp_path):
    from moe_reroute.reference import path as reference_path

    said = []
    served = sb.sglang_model(str(reference_path()), tmp_path, lambda line, **kw: said.append(line))
    assert served == str(tmp_path / "sglang-model") and "untied copy" in said[0]
    assert json.loads((tmp_path / "sglang-model" / "config.json").read_text())["tie_word_embeddings"] is False
    untied = tmp_path / "sglang-model"
    assert sb.sglang_model(str(untied), tmp_path / "x") == str(untied)  # nothing to untie


def test_sglang_cpu_memory_share_holds_the_weights_at_the_engines_dtype(tmp_path):
    from moe_reroute.measure.engine_run import cpu_memory_fraction

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(3 * 2**30)  # 3 GiB in bfloat16 (a sparse file): 6 GiB in float32
    gib = 2**30
    assert cpu_memory_fraction(str(tmp_path), "float32", total=32 * gib) == pytest.approx((6 + 2) / 32)
    assert cpu_memory_fraction(str(tmp_path), "bfloat16", total=32 * gib) == pytest.approx((3 + 2) / 32)
    assert cpu_memory_fraction(str(tmp_path), "float32", total=8 * gib) == 0.9  # at most 0.9: SGLang then says
    assert cpu_memory_fraction(str(tmp_path), "float32", total=1024 * gib) == 0.05


def test_table_names_the_experts_the_engine_computes_where_it_computes_more():
    counters = {"0": {"unique": 4.0, "unique_native": 8.0, "unique_engine": 8.0, "steps": 3},
                "1": {"unique": 2.0, "unique_native": 8.0, "unique_engine": 8.0, "steps": 3}}
    fields = sb._u_fields(counters)
    assert fields["unique"] == 3.0 and fields["unique_engine"] == 8.0
    row = {"batch": 1, "policy": "cap:k=4", "tpot_ms": 1.0, "tpot_ms_min": 1.0, "tpot_ms_max": 1.0, "tpot_ratio": 1.0,
           "tpot_ratio_ci": [1.0, 1.0], "decode_tokens_per_s": 1.0, "prefill_ms": 1.0, **fields}
    assert "| 3.0 (8.0), engine 8.0 |" in sb.table({"mode": "offline", "rows": [row]})
    same = {k: dict(v, unique_engine=v["unique"]) for k, v in counters.items()}
    assert "engine" not in sb.table({"mode": "offline", "rows": [{**row, **sb._u_fields(same)}]})
    old = {k: {x: y for x, y in v.items() if x != "unique_engine"} for k, v in counters.items()}
    assert sb._u_fields(old)["unique_engine"] == 3.0  # counters from before the field: the policy's U


def test_serve_bench_ep_layout_is_checked_before_any_engine(tmp_path, capsys):
    """--ep / --placement: refused before an engine starts, one line saying what to change."""
    tiny = synth.write(synth.plan("qwen3-30b-a3b", 2, dims=custom_shape("64,32,16,4")), tmp_path / "tiny",
                       progress=False)
    out = ["--model", tiny, "--out", tmp_path / "o"]
    bad_input(capsys, ["serve-bench", *out, "--placement", "eplb"], "--placement eplb", "give --ep D")
    bad_input(capsys, ["serve-bench", *out, "--ep", "0"], "--ep")
    bad_input(capsys, ["serve-bench", *out, "--ep", "32"], "D=32", "use at most 16 ranks")
    (tmp_path / "short.json").write_text(json.dumps([0, 1, 0]))
    bad_input(capsys, ["serve-bench", *out, "--ep", "2", "--placement", tmp_path / "short.json"],
              "places 3 experts but the model has E=16", "give a rank for every expert")
    (tmp_path / "layers.json").write_text(json.dumps([[0] * 8 + [1] * 8] * 3))
    bad_input(capsys, ["serve-bench", *out, "--ep", "2", "--placement", tmp_path / "layers.json"],
              "gives 3 per-layer placements but the model has 2 MoE layers")
    bad_input(capsys, ["serve-bench", *out, "--ep", "2", "--placement", "eplb", "--isolate"],
              "--placement eplb is computed in the offline A/B engine", "give a placement file")
    bad_input(capsys, ["serve-bench", *out, "--ep", "2", "--engine", "sglang"], "drop --ep with --engine sglang")
    # --block-steps is the A/B mode's: refused where CUDA graphs (the CUDA default) force one engine per policy
    bad_input(capsys, ["serve-bench", *out, "--device", "cuda", "--block-steps", "2"], "--block-steps",
              "add --enforce-eager")
    # on a GPU with CUDA graphs (the default there) --isolate is forced, so eplb is refused there too
    from moe_reroute.contract import RouterSpec as _Spec

    gpu = sb.Config(model=str(tiny), policies=[], batch_sizes=[1], ep=2, placement="eplb", device="cuda")
    with pytest.raises(sb.BenchError, match="computed in the offline A/B engine"):
        sb.check_layout(gpu.resolved(), sb.read_model_config(tiny), _Spec(16, 4))
    sb.check_layout(dataclasses.replace(gpu, enforce_eager=True).resolved(), sb.read_model_config(tiny),
                    _Spec(16, 4))  # A/B: fine
    replicas = {"ranks": 4, "physical_to_logical": [list(range(16)) + [0, 1, 2, 3]] * 2}
    (tmp_path / "replicas.json").write_text(json.dumps(replicas))
    bad_input(capsys, ["serve-bench", *out, "--ep", "2", "--placement", tmp_path / "replicas.json"],
              "spreads its slots over 4 ranks, not 2")
    (tmp_path / "replicas3.json").write_text(json.dumps({**replicas, "physical_to_logical": replicas["physical_to_logical"] * 2}))
    bad_input(capsys, ["serve-bench", *out, "--ep", "4", "--placement", tmp_path / "replicas3.json"],
              "gives 4 per-layer maps but the model has 2 MoE layers")
    assert not (tmp_path / "o" / "results.json").exists()
    cfg = sb.Config(model=str(tiny), policies=[], batch_sizes=[1], ep=4, placement=str(tmp_path / "replicas.json"))
    from moe_reroute.contract import RouterSpec

    sb.check_layout(cfg, json.loads((tiny / "config.json").read_text()), RouterSpec(16, 4))  # a fitting file passes


def test_serve_bench_ep_layout_reaches_the_engine(monkeypatch, tmp_path):
    """--ep D with contiguous or a file goes to the engine as MOE_REROUTE_COUNT_EP (a file by its absolute
    path); eplb does not (the A/B engine computes it); without --ep the variable is cleared."""
    from moe_reroute.serving.config import COUNT_EP_ENV, parse_count_layout

    monkeypatch.setenv(COUNT_EP_ENV, "3")
    monkeypatch.chdir(tmp_path)
    cfg = sb.Config(model="m", policies=[], batch_sizes=[1], device="cpu")
    assert COUNT_EP_ENV not in sb.engine_env(cfg, "native", True)
    cfg.ep = 4
    assert sb.engine_env(cfg, "native", True)[COUNT_EP_ENV] == "4:contiguous"
    cfg.placement = "p.json"
    value = sb.engine_env(cfg, "native", True)[COUNT_EP_ENV]
    assert value == f"4:{tmp_path / 'p.json'}" and parse_count_layout(value).placement == str(tmp_path / "p.json")
    cfg.placement = "eplb"
    assert COUNT_EP_ENV not in sb.engine_env(cfg, "native", True)


def test_table_has_max_rank_u_under_a_layout():
    """Counters per rank become the rows' max-rank and mean-rank U (means over layers) and a table column."""
    def counters(mx, mx_native, per):
        c = _counters([4, 6], [10, 11])
        for i, layer in enumerate(c.values()):
            layer.update(ranks=2, placement="contiguous", max_rank_unique=mx[i], mean_rank_unique=sum(per[i]) / 2,
                         max_rank_unique_native=mx_native[i], mean_rank_unique_native=5.0, unique_per_rank=per[i],
                         unique_per_rank_native=[5.0, 5.0])
        return c

    rows = sb.summarize_offline([_run("native", 4, 0, 0.1, counters=counters([6, 7], [6, 7], [[5, 5], [6, 5]])),
                                 _run("p", 4, 0, 0.05, counters=counters([3, 4], [6, 7], [[2, 2], [3, 3]]))],
                                ["native", "p"], [4])
    p = rows[1]
    assert (p["ranks"], p["placement"], p["max_rank_unique"], p["mean_rank_unique"]) == (2, "contiguous", 3.5, 2.5)
    assert p["max_rank_unique_native"] == 6.5 and p["max_rank_unique_per_layer"] == {"0": 3, "1": 4}
    assert p["unique_per_rank_per_layer"] == {"0": [2, 2], "1": [3, 3]}
    text = sb.table({"mode": "offline", "rows": rows})
    assert "max-rank U (native), D ranks |" in text and "| 3.50 (6.50), 2 |" in text
    plain = sb.summarize_offline([_run("native", 4, 0, 0.1, counters=_counters([6], [6]))], ["native"], [4])
    assert "max_rank_unique" not in plain[0] and "max-rank" not in sb.table({"mode": "offline", "rows": plain})


def test_mla_models_get_the_reference_cpu_mla_backend(tmp_path):
    """An MLA model (DeepSeek-V3's config has kv_lora_rank) on CPU outside bfloat16 is built with vLLM's
    reference CPU MLA backend, in both the offline runs and the server (on a CPU with AMX vLLM would
    pick AMX MLA, which takes bfloat16 weights only); other models, bfloat16, CUDA and SGLang are left to
    the engine's own choice."""
    for name, arch in (("ds", "deepseek-v3"), ("qw", "qwen3-30b-a3b")):
        synth.write(synth.plan(arch, 2, dims=custom_shape("64,32,16,4")), tmp_path / name, progress=False)

    def args(name, **kw):
        return sb.vllm_engine_args(sb.Config(model=str(tmp_path / name), policies=[], batch_sizes=[1], **kw).resolved())

    mla = {"attention_config": {"backend": "CPU_MLA"}}
    assert args("ds", device="cpu") == mla and args("ds", device="cpu", dtype="float16") == mla
    assert args("qw", device="cpu") == {}
    assert args("ds", device="cpu", dtype="bfloat16") == {} and args("ds", device="cuda") == {}
    assert args("ds", device="cpu", engine="sglang") == {}
    cmd = sb.server_command(sb.Config(model=str(tmp_path / "ds"), policies=[], batch_sizes=[1], device="cpu").resolved(), 4)
    assert cmd[cmd.index("--attention-config") + 1] == '{"backend": "CPU_MLA"}'
    assert "--attention-config" not in sb.server_command(
        sb.Config(model=str(tmp_path / "qw"), policies=[], batch_sizes=[1], device="cpu").resolved(), 4)


def test_engine_args_parse_as_json_or_text():
    assert sb.parse_engine_arg("tensor_parallel_size=2") == ("tensor_parallel_size", 2)
    assert sb.parse_engine_arg("--enable-expert-parallel=true") == ("enable_expert_parallel", True)
    assert sb.parse_engine_arg('compilation_config={"mode": 0}') == ("compilation_config", {"mode": 0})
    assert sb.parse_engine_arg("distributed_executor_backend=mp") == ("distributed_executor_backend", "mp")
    assert sb.parse_engine_arg("quantization=") == ("quantization", "")
    for bad in ("tensor_parallel_size", "=2", "2x=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            sb.parse_engine_arg(bad)


def test_engine_args_as_server_options_by_hand():
    fields = {"tensor_parallel_size": 1, "enable_expert_parallel": False, "enable_chunked_prefill": None,
              "compilation_config": None, "cuda_graph_sizes": None}
    args = {"tensor_parallel_size": 2, "enable_expert_parallel": True, "enable_chunked_prefill": False,
            "compilation_config": {"mode": 0}, "cuda_graph_sizes": [1, 2]}
    assert sb.server_flags(args, fields) == ["--tensor-parallel-size", "2", "--enable-expert-parallel",
                                             "--no-enable-chunked-prefill", "--compilation-config", '{"mode": 0}',
                                             "--cuda-graph-sizes", "1", "2"]
    assert sb.server_flags({"enable_expert_parallel": False}, fields) == []  # the default: nothing to say


def test_an_engine_s_temporary_files_go_to_its_own_folder(tmp_path, monkeypatch):
    """vLLM's server and SGLang's engine leave sockets in the temporary folder: each engine process gets a
    folder of its own (`VLLM_RPC_BASE_PATH`, TMPDIR), with TorchInductor's cache left at its default under the
    user's temporary folder; what the user set is kept, and a folder too long for a socket path is not used."""
    import getpass
    import os
    import tempfile

    user_tmp = tmp_path / "tmp"
    user_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(user_tmp))
    folder = "/tmp/moe-reroute-abcd1234"
    env = sb.temp_env({"PATH": "/bin"}, folder)
    assert env == {"PATH": "/bin", "VLLM_RPC_BASE_PATH": folder, "TMPDIR": folder,
                   "TORCHINDUCTOR_CACHE_DIR": os.path.join(str(user_tmp), "torchinductor_" + getpass.getuser())}
    mine = {"VLLM_RPC_BASE_PATH": "/run/vllm", "TORCHINDUCTOR_CACHE_DIR": "/cache/inductor"}
    assert sb.temp_env(mine, folder) == {**mine, "TMPDIR": folder}
    # SGLang points TorchInductor's cache under its own SGLANG_CACHE_DIR at import, unless it is set
    assert sb.temp_env({"PATH": "/bin"}, folder, "sglang") == {"PATH": "/bin", "VLLM_RPC_BASE_PATH": folder,
                                                               "TMPDIR": folder}
    # a socket path is at most 107 bytes: the folder, "/" and a 36-character uuid
    assert sb.temp_env({}, "/" + "x" * 69)["TMPDIR"] == "/" + "x" * 69
    assert sb.temp_env({"PATH": "/bin"}, "/" + "x" * 70) == {"PATH": "/bin"}


def test_run_process_removes_the_temporary_folder_it_gave_the_process(tmp_path, monkeypatch, short_tmp):
    """What an engine process leaves in its temporary folder (here a file, as SGLang's IPC names are) goes
    with the folder once the process group has ended; the user's temporary folder is left as it was."""
    import sys
    import tempfile

    user_tmp = short_tmp
    monkeypatch.setattr(tempfile, "tempdir", str(user_tmp))
    seen = tmp_path / "seen.txt"
    child = ("import os, sys, tempfile; f = tempfile.NamedTemporaryFile(delete=False); "
             "open(sys.argv[1], 'w').write(os.environ['TMPDIR'] + '\\n' + f.name)")
    assert sb.run_process([sys.executable, "-c", child, str(seen)], {"PATH": os.environ["PATH"]},
                          tmp_path / "run.log", 60) == 0
    folder, left = seen.read_text().splitlines()
    assert os.path.dirname(folder) == str(user_tmp) and os.path.dirname(left) == folder
    assert not os.path.exists(folder) and not list(user_tmp.iterdir())


def test_engine_args_checked_before_any_engine():
    """Each engine argument must be the engine's own (a near name suggested), not one serve-bench sets, and a
    counted --ep layout cannot meet an engine that runs expert parallelism itself."""
    fields = {"tensor_parallel_size": 1, "enable_expert_parallel": False, "gpu_memory_utilization": 0.9}

    def check(engine_args, **kw):
        cfg = sb.Config(model="m", policies=[], batch_sizes=[1], engine_args=engine_args, **kw)
        sb.check_engine_args(cfg, fields)

    check({"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8})
    with pytest.raises(sb.BenchError, match="not an argument of vLLM's engine; did you mean tensor_parallel_size"):
        check({"tensor_paralel_size": 2})
    with pytest.raises(sb.BenchError, match="serve-bench sets max_num_seqs itself; give --batch-sizes"):
        check({"max_num_seqs": 8})
    with pytest.raises(sb.BenchError, match="serve-bench sets enable_prefix_caching itself; serve-bench fixes it"):
        check({"enable_prefix_caching": True})
    with pytest.raises(sb.BenchError, match="serve-bench sets max_running_requests itself"):
        check({"max_running_requests": 8}, engine="sglang")
    with pytest.raises(sb.BenchError, match="runs expert parallelism itself.*drop --ep"):
        check({"enable_expert_parallel": True}, ep=4)
    check({"enable_expert_parallel": True})
    fields["data_parallel_size"] = 1
    with pytest.raises(sb.BenchError, match="data_parallel_size=2: vLLM's offline engine .* add --serve"):
        check({"data_parallel_size": 2})
    check({"data_parallel_size": 2}, serve=True)


def test_engine_args_reach_the_runs_and_the_report(tmp_path):
    cfg = sb.Config(model="m", policies=[], batch_sizes=[1], engine_args={"tensor_parallel_size": 2})
    assert sb.engine_args(cfg) == {"tensor_parallel_size": 2}
    data = _offline_results()
    data["conditions"]["engine_args"] = {"tensor_parallel_size": 2, "enable_expert_parallel": True}
    assert "- engine arguments: `tensor_parallel_size=2`, `enable_expert_parallel=true`" in sb.conditions(data)
    served = {**data, "mode": "serve", "conditions": {**data["conditions"], "num_prompts": 4, "request_rate": "inf",
                                                      "engine_args": {"data_parallel_size": 2}}}
    assert "U: the mean over every data-parallel rank's steps" in sb.conditions(served)
    served["conditions"]["engine_args"] = {"tensor_parallel_size": 2}
    assert "data-parallel" not in sb.conditions(served)
    # counts in words: one round, several
    served["conditions"].update(method="ab", repeats=1)
    assert "- prompts: 16 tokens of held-out text, 8 output tokens, 1 round in one server" in sb.conditions(served)
    served["conditions"]["repeats"] = 3
    assert ", 3 rounds in one server" in sb.conditions(served)


def test_serve_bench_engine_arg_input_errors(capsys):
    bad_input(capsys, ["serve-bench", "--engine-arg", "tensor_parallel_size"], "KEY=VALUE")
    bad_input(capsys, ["serve-bench", "-tp", "0"], "--tensor-parallel-size")
    bad_input(capsys, ["serve-bench", "-tp", "2", "--engine-arg", "tensor_parallel_size=2"], "say the same thing")
    bad_input(capsys, ["serve-bench", "--engine", "sglang", "-tp", "2", "--engine-arg", "tp_size=2"],
              "--engine-arg tp_size")


def test_failure_reason_says_how_to_bind_cpu_ranks(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("(EngineCore pid=3) ERROR 12-02 07:07:42 [core.py:1] AssertionError: Not enough allowed NUMA nodes "
                   "to bind threads of 2 local CPUWorkers. Allowed NUMA nodes are [0].\n")
    assert sb.failure_reason(log).endswith("VLLM_CPU_OMP_THREADS_BIND='0-7|8-15' for 2 ranks on 16 cores]")
    log.write_text("AssertionError: SGLANG_CPU_OMP_THREADS_BIND is not set, in this case, the total number of ranks "
                   "(dp_size * tp_size * pp_size = 2) should be smaller than or equal to number of numa node\n")
    assert sb.failure_reason(log).endswith("SGLANG_CPU_OMP_THREADS_BIND='0-7|8-15' for 2 ranks on 16 cores]")


def test_dp_counters_merge_by_hand():
    """Two DP ranks: rank 0 re-routed 3 steps at U 4 (native 6), rank 1 1 step at U 8 (native 10): U is the mean
    over the 4 steps, (3 x 4 + 8) / 4 = 5 (native 7); totals add up; per-EP-rank lists are weighted alike; a
    worker's own EP rank is dropped."""
    def rank(steps, u, un, dec, per, ep_rank):
        return {"0": {"steps": steps, "unique": u, "unique_native": un, "tokens": 2.0, "steps_seen": steps + 1,
                      "tokens_rerouted": 2 * steps, "tokens_seen": 9, "decode_tokens_total": dec,
                      "decode_tokens_rerouted_total": dec, "steps_by_kind": {"decode": steps, "prefill": 1},
                      "ranks": 2, "placement": "engine", "unique_per_rank": per, "max_rank_unique": max(per),
                      "mean_rank_unique": sum(per) / 2, "unique_per_rank_native": [un / 2] * 2,
                      "max_rank_unique_native": un / 2, "mean_rank_unique_native": un / 2,
                      "ep_rank": ep_rank, "local_unique": per[ep_rank]}}

    merged = sb.merge_dp_counters([rank(3, 4.0, 6.0, 6, [1.0, 3.0], 0), rank(1, 8.0, 10.0, 2, [5.0, 3.0], 1)])["0"]
    assert merged["steps"] == 4 and merged["unique"] == pytest.approx(5.0) and merged["unique_native"] == pytest.approx(7.0)
    assert (merged["decode_tokens_total"], merged["tokens_seen"], merged["steps_seen"]) == (8, 18, 6)
    assert merged["unique_per_rank"] == pytest.approx([2.0, 3.0]) and merged["max_rank_unique"] == pytest.approx((3 * 3 + 5) / 4)
    assert merged["steps_by_kind"] == {"decode": 4, "prefill": 2} and (merged["ranks"], merged["placement"]) == (2, "engine")
    assert "ep_rank" not in merged and "local_unique" not in merged
    assert merged["unique_per_rank_native"] == pytest.approx([3.5, 3.5])
    fields = sb._u_fields(sb.merge_dp_counters([rank(3, 4.0, 6.0, 6, [1.0, 3.0], 0)]))
    assert fields["unique"] == 4.0 and fields["decode_tokens"] == 6 and fields["max_rank_unique"] == 3.0


def test_one_engine_s_counters_from_its_workers():
    """Tensor-parallel workers count alike: each layer once, the first worker's; pipeline stages hold their own layers."""
    tp = [{"1": {"unique": 3}, "0": {"unique": 2}}, {"0": {"unique": 2, "ep_rank": 1}, "1": {"unique": 3}}]
    assert sb.union_counters(tp) == {"0": {"unique": 2}, "1": {"unique": 3}}
    assert list(sb.union_counters([{"10": {}}, {"2": {}}])) == ["2", "10"]
