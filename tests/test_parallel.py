"""`moe-reroute ep-replay` and measure/parallel.py: max-rank and mean-rank U on traces against plain loops,
the EP step cost model by hand, and the command end to end with its errors."""

from __future__ import annotations

import json

import pytest
import torch

import reference as ref
from cli_helpers import bad_input
from conftest import distinct_logits
from moe_reroute import RouterSpec, make_policy, placement
from moe_reroute.cli import main
from moe_reroute.measure import parallel
from moe_reroute.measure.costmodel import EPStepModel
from moe_reroute.replicas import physical_to_logical
from moe_reroute.traces import Trace


def small_trace(E=16, K=2, S=3, B=8, layers=(0, 1), seed=0) -> Trace:
    logits = {layer: torch.stack([distinct_logits(B, E, seed=seed + 100 * layer + s) for s in range(S)])
              for layer in layers}
    valid = torch.ones(S, B, dtype=torch.bool)
    valid[-1, -3:] = False
    return Trace(logits, valid, {layer: RouterSpec(E, K) for layer in layers}, {"model": "random"})


def test_native_load_against_loop():
    t = small_trace()
    load = parallel.native_load(t)
    for i, layer in enumerate(t.layers):
        counts = [0] * 16
        for s in range(t.steps):
            for b in range(t.batch_size):
                if t.valid[s, b]:
                    for e in torch.topk(t.logits[layer][s, b], 2).indices.tolist():
                        counts[e] += 1
        assert load[i].tolist() == counts


@pytest.mark.parametrize("how", ["contiguous", "eplb"])
def test_ep_replay_against_loop(how):
    t = small_trace()
    policies = {"native": make_policy("native"), "oea:k0=1": make_policy("oea", k0=1),
                "budget:budget=4": make_policy("budget", budget=4)}
    by_ranks = parallel.placements(how, t, [2, 4, 16])
    model = EPStepModel(bytes_per_expert=1000, hidden=10)
    rows = parallel.ep_replay(t, policies, [4, 8], by_ranks, model)
    assert len(rows) == 2 * 3 * 3
    for row in rows:
        B, D, label = row["batch"], row["ranks"], row["policy"]
        rb = t.rebatch(B)
        maxes, means, us = [], [], []
        for i, layer in enumerate(rb.layers):
            for s in range(rb.steps):
                v = rb.valid[s].tolist()
                if not any(v):
                    continue
                r = policies[label](rb.logits[layer][s], rb.specs[layer], rb.valid[s], layer=i)
                counts, m, avg = ref.ref_rank_unique(r.ids.tolist(), v, by_ranks[D][i].tolist(), D)
                maxes.append(m)
                means.append(avg)
                us.append(sum(counts))
        assert row["max_rank_unique"] == pytest.approx(sum(maxes) / len(maxes))
        assert row["mean_rank_unique"] == pytest.approx(sum(means) / len(means))
        assert row["unique"] == pytest.approx(sum(us) / len(us))
        assert row["predicted_ms"] == pytest.approx(model.predict_ms(row["max_rank_unique"], B))
    if how == "eplb":
        load = parallel.native_load(t)
        assert by_ranks[4][1].tolist() == ref.ref_balanced_placement(load[1].tolist(), 4)


@pytest.mark.parametrize("dp", [1, 2])
def test_ep_replay_with_redundant_experts_against_loop(dp):
    """Redundant experts (EPLB over E + 8 slots): a rank's count is the distinct slots its rows reach, each
    (row, expert) sent to the replica vLLM's hash picks (tests/reference.py `replica_slots`), rows numbered
    within their data-parallel rank; the placement is vLLM's default rearrangement of the native load."""
    t = small_trace()
    policies = {"native": make_policy("native"), "oea:k0=1": make_policy("oea", k0=1)}
    by_ranks = parallel.placements("eplb", t, [2, 4], redundant=8)
    rows = parallel.ep_replay(t, policies, [4, 8], by_ranks, dp=dp)
    assert {row["slots"] for row in rows} == {24}
    for row in rows:
        B, D, label = row["batch"], row["ranks"], row["policy"]
        rb = t.rebatch(B)
        b = B // dp
        maxes, means = [], []
        for i, layer in enumerate(rb.layers):
            p2l = physical_to_logical(by_ranks[D])[i].tolist()
            slot = ref.replica_slots(p2l)
            for s in range(rb.steps):
                if not rb.valid[s].any():
                    continue
                used = set()
                for g in range(dp):
                    rows_g = slice(g * b, (g + 1) * b)
                    r = policies[label](rb.logits[layer][s, rows_g], rb.specs[layer], rb.valid[s, rows_g], layer=i)
                    used |= {slot(tok, e) for tok, ids in enumerate(r.ids.tolist()) if rb.valid[s, g * b + tok]
                             for e in ids}
                counts = [len({p for p in used if p // (24 // D) == rank}) for rank in range(D)]
                maxes.append(max(counts))
                means.append(sum(counts) / D)
        assert row["max_rank_unique"] == pytest.approx(sum(maxes) / len(maxes))
        assert row["mean_rank_unique"] == pytest.approx(sum(means) / len(means))
    with pytest.raises(ValueError, match="placed by EPLB"):
        parallel.placements("contiguous", t, [2], redundant=8)


def test_step_model_hand_computed():
    m = EPStepModel(bytes_per_expert=2_000_000, hidden=1000, act_bytes=2, hbm_gbps=1000.0, link_gbps=100.0)
    # 3 experts x 2 MB at 1000 GB/s = 6 us; 16 tokens x 1000 x 2 B x 2 at 100 GB/s = 0.64 us
    assert m.expert_ms(3) == pytest.approx(0.006)
    assert m.all_to_all_ms(16) == pytest.approx(0.00064)
    assert m.predict_ms(3, 16) == pytest.approx(0.00664)
    for bad in [dict(hbm_gbps=0.0), dict(link_gbps=-1.0), dict(hidden=0), dict(act_bytes=1.5)]:
        with pytest.raises(ValueError, match="must be"):
            EPStepModel(**{"bytes_per_expert": 1, "hidden": 1, **bad})


def test_cli_end_to_end(tmp_path, capsys):
    trace = tmp_path / "t.safetensors"
    small_trace(E=16, K=2, S=4, B=8).save(trace)
    out = tmp_path / "out"
    code = main(["ep-replay", "--trace", str(trace), "--batch-sizes", "4,8", "--ep", "2,4", "--placement", "eplb",
                 "--policy", "oea:k0=1", "--policy", "budget:budget=4", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "D=2 ranks, eplb placement: max-rank U (mean-rank U)" in text and "predicted MoE-layer time" in text
    result = json.loads((out / "ep.json").read_text())
    assert result["command"].startswith("moe-reroute ep-replay --trace")
    assert "native routing of this same trace" in result["placement"]
    assert [r["policy"] for r in result["rows"][:3]] == ["native", "oea:k0=1", "budget:budget=4"]
    assert (out / "ep.png").stat().st_size > 0
    saved = placement.load_placement(out / "placement-eplb-D4.json", 16, 4, layers=2)
    assert saved.shape == (2, 16)
    # the saved placement, read back as a file, gives the same numbers
    code = main(["ep-replay", "--trace", str(trace), "--batch-sizes", "4,8", "--ep", "4", "--placement",
                 str(out / "placement-eplb-D4.json"), "--policy", "oea:k0=1", "--policy", "budget:budget=4",
                 "--json", "--no-progress"])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = [r for r in result["rows"] if r["ranks"] == 4]
    assert [r["max_rank_unique"] for r in again["rows"]] == [r["max_rank_unique"] for r in want]


def test_cli_redundant_experts(tmp_path, capsys):
    """--redundant N: the placement file it writes holds the replicas, the replicas-aware policies read it,
    and the same file given as --placement gives the same counts; what does not fit is refused."""
    trace = tmp_path / "t.safetensors"
    small_trace(E=16, K=2, S=4, B=8).save(trace)
    out = tmp_path / "out"
    base = ["ep-replay", "--trace", str(trace), "--batch-sizes", "4,8", "--no-progress"]
    assert main([*base, "--ep", "4", "--placement", "eplb", "--redundant", "8", "--policy", "oea:k0=1", "--out",
                 str(out)]) == 0
    text = capsys.readouterr().out
    assert "24 physical slots (8 redundant experts" in text and "eplb (+8 redundant) placement" in text
    f = out / "placement-eplb-D4.json"
    saved = json.loads(f.read_text())
    assert saved["ranks"] == 4 and len(saved["physical_to_logical"]) == 2 and len(saved["physical_to_logical"][0]) == 24
    first = json.loads((out / "ep.json").read_text())["rows"]
    aware = f"oea:k0=1,ep=4,placement={f}"
    assert main([*base, "--ep", "4", "--placement", str(f), "--policy", "oea:k0=1", "--policy", aware, "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["max_rank_unique"] for r in again[:2]] == [r["max_rank_unique"] for r in first[:2]]
    by = {(r["batch"], r["policy"]): r["max_rank_unique"] for r in again}
    assert all(by[(B, aware)] <= by[(B, "oea:k0=1")] for B in (4, 8))
    bad_input(capsys, [*base, "--ep", "2", "--redundant", "2"], "--redundant adds EPLB", "--placement eplb")
    bad_input(capsys, [*base, "--ep", "4", "--placement", "eplb", "--redundant", "2"],
              "18 slots do not split evenly over [4] ranks")
    bad_input(capsys, [*base, "--ep", "2", "--placement", str(f)], "spreads its slots over 4 ranks; give --ep 4")
    bad_input(capsys, [*base, "--ep", "4", "--placement", "eplb", "--redundant", "-1"], "--redundant")


def test_cli_errors(tmp_path, capsys):
    trace = tmp_path / "t.safetensors"
    small_trace(E=16, K=2, S=2, B=4).save(trace)
    base = ["ep-replay", "--trace", str(trace), "--batch-sizes", "4", "--ep", "2"]
    bad_input(capsys, [*base, "--ep", "0"], "--ep must be integers")
    bad_input(capsys, [*base, "--ep", "32"], "--ep 32", "D=32 ranks needs 1 <= D <= E=16")
    bad_input(capsys, [*base, "--batch-sizes", "8"], "need a trace of at least that many sequences")
    bad_input(capsys, [*base, "--placement", str(tmp_path / "none.json")], "--placement", "no such file")
    f = tmp_path / "p.json"
    f.write_text(json.dumps([0] * 15))
    bad_input(capsys, [*base, "--ep", "2", "--placement", str(f)], "places 15 experts but the model has E=16")
    f.write_text(json.dumps([0] * 8 + [3] * 8))
    bad_input(capsys, [*base, "--ep", "2", "--placement", str(f)], "expert 8 is on rank 3, but D=2")
    f.write_text(json.dumps([0] * 8 + [1] * 8))  # made for 2 ranks: under D = 4, ranks 2 and 3 would sit idle
    bad_input(capsys, [*base, "--ep", "4", "--placement", str(f)], "places experts on 2 of D=4 ranks",
              "ranks 2, 3 hold none", "give --ep 2")
    bad_input(capsys, [*base, "--calibration-trace", str(trace)], "--calibration-trace", "--placement eplb")
    bad_input(capsys, [*base, "--policy", "oea:k0=3"], "oea k0=3 > the model's K=2")
    bad_input(capsys, [*base, "--link-gbps", "0"], "link_gbps must be a bandwidth > 0")


def test_cli_reference_trace_default_policies(capsys):
    """Without --trace: the reference model's trace and every default policy, sere with its shipped
    similarity."""
    code = main(["ep-replay", "--batch-sizes", "16", "--positions", "2", "--ep", "8,128", "--json", "--no-progress"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    policies = [r["policy"] for r in out["rows"] if r["ranks"] == 8]
    assert policies == ["native", "cap:k=4", "oea:k0=3", "sere", "budget:budget=32", "xshare:budget=32",
                        "lynx:alpha=3,beta=2"]
    for r in out["rows"]:
        assert r["mean_rank_unique"] == pytest.approx(r["unique"] / r["ranks"])
        assert r["mean_rank_unique"] <= r["max_rank_unique"] <= min(r["unique"], 128 // r["ranks"])
        if r["ranks"] == 128:  # one expert per rank: max-rank U is 1 in every step
            assert r["max_rank_unique"] == 1


def test_data_parallel_ranks_route_their_own_tokens_and_the_union_is_served():
    """--dp R: each step's B tokens come from R ranks of B/R consecutive tokens, each routed alone; the
    experts in use are the union. Against a loop over steps and ranks; dp=1 is the whole batch in one view."""
    t = small_trace(E=16, K=2, S=3, B=8)
    policy = make_policy("oea", k0=1)
    layer = t.layers[1]
    got = parallel.dp_experts(policy, t.logits[layer], t.valid, t.specs[layer], 1, dp=4)
    for s in range(t.steps):
        want = set()
        for g in range(4):
            rows = slice(2 * g, 2 * g + 2)
            r = policy(t.logits[layer][s, rows], t.specs[layer], t.valid[s, rows], layer=1)
            want |= {e for ids, v in zip(r.ids.tolist(), t.valid[s, rows].tolist()) if v for e in ids}
        assert set(torch.nonzero(got[s]).flatten().tolist()) == want, s
    whole = parallel.dp_experts(policy, t.logits[layer], t.valid, t.specs[layer], 1, dp=1)
    for s in range(t.steps):
        r = policy(t.logits[layer][s], t.specs[layer], t.valid[s], layer=1)
        assert set(torch.nonzero(whole[s]).flatten().tolist()) == {
            e for ids, v in zip(r.ids.tolist(), t.valid[s].tolist()) if v for e in ids}
    # each rank alone cannot share its experts with the others' tokens: never fewer experts than one view
    assert bool((got.sum(-1) >= whole.sum(-1)).all())
    with pytest.raises(ValueError, match="multiples of --dp"):
        parallel.dp_experts(policy, t.logits[layer], t.valid, t.specs[layer], 1, dp=3)
    rows = parallel.ep_replay(t, {"oea:k0=1": policy}, [8], parallel.placements("contiguous", t, [4]), dp=4)
    assert rows[0]["dp"] == 4 and rows[0]["unique"] == pytest.approx(
        sum(float(parallel.dp_experts(policy, t.logits[la], t.valid, t.specs[la], i, dp=4).sum(-1).double().mean())
            for i, la in enumerate(t.layers)) / 2)


def test_cli_dp_must_split_every_batch(tmp_path, capsys):
    trace = tmp_path / "t.safetensors"
    small_trace(E=16, K=2, S=2, B=8).save(trace)
    bad_input(capsys, ["ep-replay", "--trace", str(trace), "--batch-sizes", "4,6", "--ep", "2", "--dp", "4"],
              "--dp 4", "[6]")
    bad_input(capsys, ["ep-replay", "--trace", str(trace), "--batch-sizes", "4", "--ep", "2", "--dp", "0"], "--dp")


def test_cli_model_records_its_own_trace(tmp_path, capsys):
    """--model DIR (here a tiny synth-model checkpoint, DeepSeek-V3's router): the trace is recorded from the
    checkpoint on --text, and replays to the same numbers as that trace recorded by hand and given as --trace;
    what cannot work is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_reroute.hf import Recorder
    from moe_reroute.measure import synth
    from moe_reroute.measure.shapes import custom_shape
    from moe_reroute.reference.train import document_ids

    folder = synth.write(synth.plan("deepseek-v3", 2, dims=custom_shape("64,32,16,4")), tmp_path / "m", progress=False)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog" for i in range(40)))
    args = ["ep-replay", "--batch-sizes", "4,8", "--ep", "2,4", "--positions", "6", "--policy", "oea:k0=2",
            "--json", "--no-progress"]
    assert main([*args, "--model", str(folder), "--text", str(text)]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert f"trace of {folder} on --text {text} (8 sequences x 6 positions" in got["trace"]
    assert got["conditions"]["shape"] == "deepseek-v3"  # the model the synth-model folder stands for
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(document_ids(tok, text.read_text()))[:48].view(8, 6)
    with torch.no_grad(), Recorder(model, keep="logits") as rec:
        model(input_ids=ids)
    path = tmp_path / "t.safetensors"
    rec.to_trace().save(path)
    assert main([*args, "--trace", str(path)]) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    key = ("batch", "ranks", "policy", "max_rank_unique", "mean_rank_unique", "unique")
    assert [[r[k] for k in key] for r in got["rows"]] == [[r[k] for k in key] for r in want["rows"]]
    bad_input(capsys, [*args, "--model", str(folder), "--trace", str(path)], "--trace and --model")
    bad_input(capsys, [*args, "--text", str(text)], "--text is the text --model's trace is recorded on")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(SystemExit) as e:  # found once the tokenizer has read it (after the model's notes)
        main([*args, "--model", str(folder), "--text", str(short)])
    assert e.value.code == 2 and "holds 6 tokens, fewer than the 8 x 6" in capsys.readouterr().err.splitlines()[-1]
