"""`moe-reroute tune`: the search against a planted optimum and against `evaluate`, the knapsack against
brute force, the policy file through every loader, resuming, and bad input."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from cli_helpers import bad_input
from moe_reroute import RouterSpec, load_policy, make_policy
from moe_reroute.measure.evaluate import EvalConfig, evaluate
from moe_reroute.measure.tune import Forwards, Search, TuneConfig, policy_object, tune, value_grid
from moe_reroute.vllm import config as plugin_config
from tiny_models import tiny_model

IRRELEVANT = 1  # the MoE layer whose experts are zeroed: its routing cannot change the output


@pytest.fixture(scope="module")
def planted():
    """A 3-layer tiny Qwen3-MoE (16 experts, top-4) whose MoE layer 1 outputs zero whatever its routing,
    and 16 random sequences of 12 tokens."""
    model = tiny_model("qwen3_moe", num_hidden_layers=3)
    with torch.no_grad():
        for p in model.model.layers[IRRELEVANT].mlp.experts.parameters():
            p.zero_()
    g = torch.Generator().manual_seed(0)
    return model, torch.randint(2, 64, (16, 12), generator=g)


def test_irrelevant_layer_gets_the_smallest_value_and_the_result_matches_evaluate(planted):
    model, seqs = planted
    config = TuneConfig("oea", budget=1e-9, batch_sizes=(4,), objective="experts", refine=4)
    out = tune(model, seqs, config, progress=False, log=lambda _: None)
    tuned = out["by_batch"][4]["tuned"]
    assert tuned["values"][IRRELEVANT] == 1  # planted: the cheapest k0 costs nothing there
    assert tuned["loss"] <= 1e-9 and tuned["delta_ce"] <= 1e-9
    assert tuned["cost"] <= out["by_batch"][4]["uniform"]["cost"]
    # independent reference: the plain evaluation of the written policy on the same sequences and batches
    policy = make_policy("oea", k0=tuned["values"])
    rows = evaluate(model, seqs.flatten(), {"t": policy}, EvalConfig(batch_sizes=(4,), seq_len=12, num_sequences=16,
                                                                     resamples=10), progress=False)["rows"]
    row = next(r for r in rows if r["policy"] == "t")
    assert row["delta_ce"] == pytest.approx(tuned["delta_ce"], abs=2e-6)  # fp32 rounding: other batch shapes
    assert row["mean_unique"] == pytest.approx(tuned["mean_unique"], abs=1e-9)
    native = next(r for r in rows if r["policy"] == "native")
    assert native["mean_unique"] == pytest.approx(sum(out["by_batch"][4]["native_unique"]) / 3, abs=1e-9)


def test_layers_below_the_first_changed_one_are_not_recomputed(planted):
    """Starting from the cached native outputs gives what the full forward gives, without running the
    layers below (counted)."""
    model, seqs = planted
    fw = Forwards(model, seqs, chunk=5)
    fw.native()
    policy = make_policy("oea", k0=[4, 4, 2])  # layers 0 and 1 native (k0 = K)
    rows = torch.arange(4, 8)
    full, calls = fw.run(rows, policy, 0), []
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    try:
        part = fw.run(rows, policy, 2)
    finally:
        handle.remove()
    assert not calls
    assert part["d_ce"] == pytest.approx(full["d_ce"], abs=2e-6)  # fp32 rounding of other batch shapes
    assert part["agree"] == pytest.approx(full["agree"], abs=1e-12)
    assert part["unique"][2] == full["unique"][2] and part["kept"][2] == full["kept"][2]


def test_allocation_is_the_brute_force_optimum():
    """The knapsack rounds each loss up to its grid (limit / 400): its answer is the brute-force optimum
    over the settings whose rounded-up losses fit, and its true loss fits too."""
    import math

    rng = random.Random(0)
    search = Search.__new__(Search)
    for trial in range(40):
        table = []
        for _ in range(rng.randint(1, 4)):
            opts = [(8, 10.0, 0.0)]
            for v in range(7, 7 - rng.randint(1, 5), -1):
                opts.append((v, opts[-1][1] - rng.uniform(0.1, 2), opts[-1][2] + rng.uniform(-0.002, 0.01)))
            table.append(opts)
        limit = rng.uniform(0.001, 0.03)
        got = search.allocate(table, limit)
        picked = [next(o for o in opts if o[0] == v) for opts, v in zip(table, got)]
        assert sum(max(o[2], 0.0) for o in picked) <= limit * (1 + 1e-9), (trial, got)
        unit = limit / 400
        best = min(sum(o[1] for o in combo) for combo in itertools.product(*table)
                   if sum(math.ceil(max(o[2], 0.0) / unit - 1e-9) for o in combo) <= 400)
        assert sum(o[1] for o in picked) == pytest.approx(best, abs=1e-9), (trial, got)
    table = [[(4, 5.0, 0.0), (2, 3.0, -0.001), (1, 1.0, 0.002)], [(4, 5.0, 0.0), (3, 4.0, 0.0)]]
    assert search.allocate(table, 0.0) == (2, 3)  # no budget: the cheapest options that cost no quality


def test_policy_file_by_batch_round_trips_through_every_loader(tmp_path):
    config = TuneConfig("oea", budget=0.01, batch_sizes=(1, 4, 16))
    tuned = {1: [4, 4, 2], 4: [3, 1, 2], 16: [2, 2, 2]}
    obj = policy_object(config, tuned, "m")
    assert obj["k0"] == {"by_batch": {"3": [4, 4, 2], "15": [3, 1, 2], "max": 2}}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(obj))
    spec = RouterSpec(num_experts=16, top_k=4)
    loaders = {"load_policy": load_policy(path),
               "MOE_REROUTE_POLICY_FILE": plugin_config.from_env({plugin_config.POLICY_FILE_ENV: str(path)}).policy}
    g = torch.Generator().manual_seed(1)
    for T, values in ((1, [4, 4, 2]), (3, [4, 4, 2]), (4, [3, 1, 2]), (15, [3, 1, 2]), (16, [2, 2, 2]), (64, [2, 2, 2])):
        logits = torch.randn(T, 16, generator=g)
        for layer in range(3):
            want = make_policy("oea", k0=values[layer])(logits, spec, layer=layer)
            for name, policy in loaders.items():
                got = policy(logits, spec, layer=layer)
                assert torch.equal(got.ids, want.ids), (name, T, layer)
                assert torch.equal(got.weights, want.weights), (name, T, layer)
    same = policy_object(config, {1: [2, 3, 2], 4: [2, 3, 2], 16: [2, 3, 2]})
    assert same["k0"] == [2, 3, 2] and "about" in same


def test_interrupted_search_resumes_without_repeating_evaluations(planted, tmp_path):
    model, seqs = planted
    state = tmp_path / "state.json"
    config = TuneConfig("cap", budget=0.02, batch_sizes=(2, 8), objective="experts", rounds=2, refine=2)
    built = []

    def build(values):
        built.append(values)
        return make_policy("cap", k=values)

    first = tune(model, seqs, config, state_path=state, progress=False, log=lambda _: None, build=build)
    assert len(built) > 3 and state.exists()
    built.clear()
    lines = []
    again = tune(model, seqs, config, state_path=state, progress=False, log=lines.append, build=build)
    assert len(built) == 1  # the up-front check of the fixed parameters only: every evaluation was saved
    assert again["policy"] == first["policy"] and any("resuming" in line for line in lines)
    other = TuneConfig("cap", budget=0.05, batch_sizes=(2, 8), objective="experts")
    with pytest.raises(ValueError, match="other arguments"):
        tune(model, seqs, other, state_path=state, progress=False, log=lambda _: None)


@pytest.mark.parametrize("family,params", [("budget", {}), ("sere", {"similarity": "SIM"})])
def test_other_families_stay_within_budget(planted, tmp_path, family, params):
    from moe_reroute.hf.calibrate import save_similarity

    model, seqs = planted
    if family == "sere":
        g = torch.Generator().manual_seed(2)
        sim = [torch.rand(16, 16, generator=g) for _ in range(3)]
        sim = [(s + s.T) / 2 for s in sim]
        for s in sim:
            s.fill_diagonal_(1.0)
        params = {"similarity": str(save_similarity(dict(enumerate(sim)), tmp_path / "sim.safetensors", method="cka"))}
    config = TuneConfig(family, budget=0.02, batch_sizes=(4,), objective="experts", params=params, rounds=2, refine=2)
    out = tune(model, seqs, config, progress=False, log=lambda _: None)
    tuned = out["by_batch"][4]["tuned"]
    grid = value_grid(family, RouterSpec.from_config(model.config))
    assert all(v in grid for v in tuned["values"]) and tuned["delta_ce"] <= 0.02
    assert tuned["cost"] <= out["by_batch"][4]["uniform"]["cost"] <= out["by_batch"][4]["native_cost"]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(out["policy"]))
    assert type(load_policy(path)).__name__.lower() == family


def test_value_grids():
    spec = RouterSpec(num_experts=128, top_k=8)
    assert value_grid("oea", spec) == [8, 7, 6, 5, 4, 3, 2, 1]
    grid = value_grid("budget", spec)
    assert grid[0] == 128 and grid == sorted(grid, reverse=True) and min(grid) >= 8


@pytest.mark.parametrize("kwargs,needle", [
    (dict(family="native"), "has no tunable parameter"),
    (dict(family="expert-share"), "not a policy family"),
    (dict(family="lynx"), "no parameter grid for it yet"),
    (dict(family="oea", budget=-0.1), "> 0"),
    (dict(family="oea", budget=0.0), "> 0"),
    (dict(family="oea", budget=float("nan")), "> 0"),
    (dict(family="oea", confidence=1.0), "in [0, 1)"),
    (dict(family="oea", budget=None, agreement=1.5), "in [0, 1]"),
    (dict(family="oea", budget=0.01, agreement=0.9), "not both"),
    (dict(family="oea", params={"k0": 3}), "do not fix it"),
    (dict(family="oea", batch_sizes=(0, 4)), ">= 1"),
    (dict(family="oea", cost_b=0.0, cost_a=0.0), "not both 0"),
    (dict(family="sere", params={"similarity": torch.eye(4)}), "as a file path"),
])
def test_bad_config(kwargs, needle):
    import re

    with pytest.raises(ValueError, match=re.escape(needle)):
        TuneConfig(**kwargs)


def test_too_few_sequences(planted):
    model, seqs = planted
    with pytest.raises(ValueError, match="needs at least 32 calibration sequences"):
        tune(model, seqs, TuneConfig("oea", batch_sizes=(32,)), progress=False, log=lambda _: None)


def test_cli_bad_input(capsys, tmp_path):
    out = tmp_path / "t.json"
    bad_input(capsys, ["tune", "--policy", "native", "--out", out], "has no tunable parameter")
    bad_input(capsys, ["tune", "--policy", "oea", "--budget", "-1", "--out", out], "> 0")
    bad_input(capsys, ["tune", "--policy", "oea", "--budget", "0", "--out", out], "> 0")
    bad_input(capsys, ["tune", "--policy", "oea", "--confidence", "1", "--out", out], "in [0, 1)")
    bad_input(capsys, ["tune", "--policy", "oea", "--batch-sizes", "4", "--sequences", "8", "--seq-len", "16",
                       "--out", out], "needs at least 16 calibration sequences", "batch size 4 uses 8 of 8")
    bad_input(capsys, ["tune", "--policy", "oea", "--budget", "0.01", "--agreement", "0.9", "--out", out], "exclusive")
    bad_input(capsys, ["tune", "--policy", "oea", "--model", tmp_path, "--out", out], "--text CALIB is needed")
    text = tmp_path / "c.txt"
    text.write_text("some text\n")
    bad_input(capsys, ["tune", "--policy", "oea", "--model", tmp_path, "--text", text, "--out", out], "--heldout")
    bad_input(capsys, ["tune", "--policy", "oea", "--cost", "1", "--out", out], "B,A")
    bad_input(capsys, ["tune", "--policy", "oea", "--objective", "experts", "--cost", "1,0", "--out", out], "drop --cost")
    bad_input(capsys, ["tune", "--policy", "oea:k0=3", "--out", out], "do not fix it")
    bad_input(capsys, ["tune", "--policy", "oea", "--out", tmp_path], "is a folder", str(tmp_path / "tuned.json"))
    bad_input(capsys, ["tune", "--policy", "oea", "--heldout", tmp_path / "none.txt", "--out", out],
              f"--heldout {tmp_path / 'none.txt'}: no such file")
    bad_input(capsys, ["tune", "--policy", "oea", "--no-validate", "--heldout", text, "--out", out],
              "--no-validate skips that")
    assert not out.exists()


TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "\n\n") * 30
HELDOUT = ("a lazy dog sleeps while the brown fox runs far away. " * 3 + "\n\n") * 30


@pytest.mark.long
def test_cli_end_to_end_on_a_local_checkpoint(tmp_path, capsys):
    """tune --model: the policy file loads through load_policy and the engines' variable, routes as the
    values the search reports, and the validation file feeds `report`."""
    from moe_reroute.cli import main
    from tiny_models import tiny_tokenizer

    folder = tmp_path / "tiny"
    tiny_model("qwen3_moe").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "calib.txt").write_text(TEXT)
    (tmp_path / "held.txt").write_text(HELDOUT)
    out = tmp_path / "run" / "tuned.json"
    argv = ["tune", "--model", str(folder), "--text", str(tmp_path / "calib.txt"), "--heldout",
            str(tmp_path / "held.txt"), "--policy", "cap", "--budget", "0.05", "--batch-sizes", "1,4",
            "--seq-len", "16", "--sequences", "16", "--resamples", "50", "--cost", "1.0,0.01", "--out", str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result["policy"]
    assert result["conditions"]["cost"] == {"b": 1.0, "a": 0.01}
    values = {B: result["by_batch"][str(B)]["tuned"]["values"] for B in (1, 4)}  # JSON keys are strings
    spec = RouterSpec.from_config(tiny_model("qwen3_moe").config)
    policy = load_policy(out)
    g = torch.Generator().manual_seed(3)
    for T, B in ((1, 1), (3, 1), (4, 4), (9, 4)):
        logits = torch.randn(T, spec.num_experts, generator=g)
        for layer in range(2):
            want = make_policy("cap", k=values[B][layer])(logits, spec, layer=layer)
            assert torch.equal(policy(logits, spec, layer=layer).ids, want.ids)
    engine = plugin_config.from_env({plugin_config.POLICY_FILE_ENV: str(out)})
    assert type(engine.policy) is type(policy)
    validation = json.loads((tmp_path / "run" / "tuned.validation.json").read_text())
    labels = {r["policy"] for r in validation["rows"]}
    assert {"native", "tuned:tuned.json"} <= labels
    assert set(result["validation"]["by_batch"]) == {"1", "4"}
    assert (tmp_path / "run" / "tuned.tune.json").exists() and len(list((tmp_path / "run").glob("tuned.json.*.state"))) == 1
    assert main(["report", str(tmp_path / "run" / "tuned.validation.json"), "--batch-size", "4",
                 "--out", str(tmp_path / "rep")]) == 0
    assert "tuned" in (tmp_path / "rep" / "report.md").read_text()
    # another budget into the same --out is a new search with its own state, not refused
    other = [a if a != "0.05" else "0.5" for a in argv] + ["--no-validate"]
    i = other.index("--heldout")
    del other[i : i + 2]  # --no-validate: no held-out text
    assert main(other) == 0
    capsys.readouterr()
    assert len(list((tmp_path / "run").glob("tuned.json.*.state"))) == 2
    assert main(other) == 0  # the same arguments again: resumed from its state
    assert "resuming from" in capsys.readouterr().err


def test_cli_with_a_fixed_parameter_validates_that_family(tmp_path, capsys):
    """tune --policy oea:p=0.9: the tuned file keeps p, and the validation's best uniform setting is oea with
    that p at the uniform k0 (the tuned parameter is k0 whatever order the policy file's keys take)."""
    from moe_reroute.cli import main
    from tiny_models import tiny_tokenizer

    folder = tmp_path / "tiny"
    tiny_model("qwen3_moe").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "calib.txt").write_text(TEXT)
    (tmp_path / "held.txt").write_text(HELDOUT)
    out = tmp_path / "tuned.json"
    argv = ["tune", "--model", str(folder), "--text", str(tmp_path / "calib.txt"), "--heldout",
            str(tmp_path / "held.txt"), "--policy", "oea:p=0.9", "--budget", "0.05", "--batch-sizes", "4",
            "--seq-len", "16", "--sequences", "8", "--confidence", "0", "--resamples", "50", "--out", str(out),
            "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["policy"]["p"] == 0.9 and "k0" in result["policy"]
    k0 = result["by_batch"]["4"]["uniform"]["values"][0]
    label = f"oea:p=0.9,k0={k0}"
    assert result["validation"]["by_batch"]["4"]["uniform"] == label
    rows = {r["policy"]: r for r in json.loads((tmp_path / "tuned.validation.json").read_text())["rows"]}
    assert {"native", "tuned:tuned.json", label} <= set(rows)


def test_budget_bounds_the_mean_by_its_standard_error_over_sequences(planted):
    """With a confidence, the search's loss is mean + z * SE of the per-sequence delta CE, computed here
    independently: each batch of 4 through the model with the tuned policy (decode-sim), sequence by
    sequence against native."""
    import math
    from statistics import NormalDist

    import torch.nn.functional as F

    from moe_reroute.hf import apply

    model, seqs = planted
    config = TuneConfig("oea", budget=0.02, batch_sizes=(4,), objective="experts", rounds=2, refine=2)
    out = tune(model, seqs, config, progress=False, log=lambda _: None)
    tuned = out["by_batch"][4]["tuned"]

    def per_sequence_ce(batch):
        logp = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float()[:, :-1], -1)
        return -logp.gather(-1, batch[:, 1:, None])[..., 0].double().mean(-1)

    policy = make_policy("oea", k0=tuned["values"])
    d = []
    with torch.no_grad():
        for g in range(0, 16, 4):
            batch = seqs[g : g + 4]
            native = per_sequence_ce(batch)
            with apply(model, policy, phase="decode-sim"):
                d += (per_sequence_ce(batch) - native).tolist()
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    assert tuned["delta_ce"] == pytest.approx(mean, abs=2e-6)
    assert tuned["delta_ce_se"] == pytest.approx(se, rel=1e-3, abs=1e-7)
    assert tuned["loss"] == pytest.approx(mean + NormalDist().inv_cdf(0.95) * se, abs=1e-5)
    assert tuned["loss"] <= 0.02
    mean_only = tune(model, seqs, TuneConfig("oea", budget=0.02, batch_sizes=(4,), objective="experts", rounds=2,
                                             refine=2, confidence=0.0), progress=False, log=lambda _: None)
    assert mean_only["by_batch"][4]["tuned"]["loss"] == mean_only["by_batch"][4]["tuned"]["delta_ce"]
    with pytest.raises(ValueError, match="needs at least 16 calibration sequences"):
        tune(model, seqs[:12], config, progress=False, log=lambda _: None)


@pytest.mark.long
def test_calibration_text_that_is_the_validation_text_is_refused_and_overlap_is_said(tmp_path, capsys):
    from moe_reroute.cli import main
    from tiny_models import tiny_tokenizer

    folder = tmp_path / "tiny"
    tiny_model("qwen3_moe").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    held = tmp_path / "held.txt"
    held.write_text(HELDOUT)
    out = tmp_path / "tuned.json"
    common = ["tune", "--model", str(folder), "--heldout", str(held), "--policy", "cap", "--batch-sizes", "4",
              "--seq-len", "16", "--sequences", "16", "--resamples", "50", "--rounds", "1", "--refine", "0"]
    bad_input(capsys, common + ["--text", held, "--out", out], "100% of its lines are in the text tune validates on",
              "disjoint")
    assert not out.exists() and not list(tmp_path.glob("tuned.json.*"))
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(TEXT + HELDOUT.split("\n\n")[0] + "\n")  # one of the calibration text's 2 distinct lines
    bad_input(capsys, common + ["--text", mixed, "--out", out], "50% of its lines")
    partly = tmp_path / "partly.txt"
    lines = [f"line {i} of calibration text that the validation text does not hold at all" for i in range(60)]
    partly.write_text("\n".join(lines + [HELDOUT.split("\n\n")[0]]) * 3 + "\n")
    assert main(common + ["--text", str(partly), "--out", str(out), "--json"]) == 0
    err = capsys.readouterr().err
    assert "warning: --text" in err and "2% of its lines are also in the text tune validates on" in err
    assert out.exists()


def test_jsonl_text_is_read_as_its_documents(tmp_path, capsys):
    from moe_reroute.cli.measure import read_text

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"domain": "a", "name": "x", "text": "first \"doc\""}) + "\n\n"
                    + json.dumps({"domain": "b", "name": "y", "text": "second"}) + "\n")
    assert read_text(str(docs)) == 'first "doc"\n\nsecond'
    docs.write_text("plain text, not JSON\n")
    with pytest.raises(SystemExit, match="line 1 is not JSON"):
        read_text(str(docs))
    docs.write_text("[" * 100000 + "\n")
    with pytest.raises(SystemExit, match="line 1 is not JSON .nested too deeply"):
        read_text(str(docs))
    docs.write_text(json.dumps({"body": "no text key"}) + "\n")
    with pytest.raises(SystemExit, match='no "text" string'):
        read_text(str(docs))
