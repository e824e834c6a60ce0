"""`moe-reroute eval`, `report`, `calibrate` and JSONL tasks end to end on a tiny local checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from moe_reroute import make_policy
from moe_reroute.cli import main
from moe_reroute.measure.tasks import evaluate_task, load_jsonl

TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "\n\n") * 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model("qwen3_moe")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "text.txt").write_text(TEXT)
    return folder


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, out


def test_eval_json_and_report(checkpoint, tmp_path, capsys):
    out = tmp_path / "ev"
    code, text = run(capsys, "eval", "--model", str(checkpoint), "--text", str(checkpoint / "text.txt"),
                     "--policy", "oea:k0=1", "--policy", "cap:k=2", "--batch-sizes", "1,2", "--seq-len", "16",
                     "--sequences", "4", "--resamples", "50", "--generate", "3", "--generation-batch", "2",
                     "--out", str(out), "--json")
    assert code == 0
    result = json.loads(text.strip().splitlines()[-1])
    labels = [(r["policy"], r["batch_size"]) for r in result["rows"]]
    assert labels == [(p, b) for b in (1, 2) for p in ("native", "oea:k0=1", "cap:k=2")]
    cap = [r for r in result["rows"] if r["policy"] == "cap:k=2"][0]
    assert cap["experts_per_token"] == 2.0 and cap["mean_unique"] == 2.0  # batch 1: one token, 2 experts
    assert [g["policy"] for g in result["generation"]] == ["oea:k0=1", "cap:k=2"]
    assert (out / "eval.json").exists()

    report_dir = tmp_path / "rep"
    code, text = run(capsys, "report", str(out / "eval.json"), "--batch-size", "2", "--out", str(report_dir))
    assert code == 0 and "report written" in text
    for name in ("report.md", "pareto_u.png", "u_vs_batch.png", "u_per_layer.png", "results.json"):
        assert (report_dir / name).stat().st_size > 0
    md = (report_dir / "report.md").read_text()
    assert "moe-reroute eval --model" in md and "`oea:k0=1`" in md


def test_eval_takes_a_policy_file(checkpoint, tmp_path, capsys):
    """`eval --policy FILE`: a policy file (the JSON `tune --out` writes) is evaluated as the spec it holds,
    its rows named by the path as given."""
    policy_file = tmp_path / "tuned.json"
    policy_file.write_text(json.dumps({"name": "oea", "k0": [1, 2]}))
    base = ["eval", "--model", str(checkpoint), "--text", str(checkpoint / "text.txt"), "--batch-sizes", "2",
            "--seq-len", "16", "--sequences", "4", "--resamples", "50", "--generate", "0", "--json"]
    rows = {}
    for policy in (str(policy_file), "oea:k0=[1,2]"):
        code, text = run(capsys, *base, "--policy", policy)
        assert code == 0
        rows[policy] = [r for r in json.loads(text.strip().splitlines()[-1])["rows"] if r["policy"] == policy][0]
    from_file, from_spec = rows.values()
    for key in ("mean_unique", "experts_per_token", "cross_entropy", "delta_ce", "unique_per_layer"):
        assert from_file[key] == from_spec[key], key
    with pytest.raises(SystemExit):
        main([*base, "--policy", str(tmp_path / "none.json")])
    assert "none.json: no such file" in capsys.readouterr().err


def test_eval_errors(checkpoint, tmp_path, capsys):
    base = ["eval", "--model", str(checkpoint), "--text", str(checkpoint / "text.txt"), "--seq-len", "16",
            "--sequences", "4", "--generate", "0"]
    with pytest.raises(SystemExit, match="unknown policy 'fast'"):
        main(base + ["--policy", "fast:k=2"])
    with pytest.raises(SystemExit, match="more sequences"):
        main(base + ["--policy", "cap:k=2", "--batch-sizes", "8"])
    with pytest.raises(SystemExit, match="--batch-sizes must be integers 1..1048576 separated by commas"):
        main(base + ["--batch-sizes", "4,x"])
    with pytest.raises(SystemExit, match="needs expert similarity"):
        main(base + ["--policy", "sere"])
    with pytest.raises(SystemExit, match="more sequences"):  # the default policies, sere left out
        main(base + ["--batch-sizes", "8"])
    with pytest.raises(SystemExit, match="--text FILE is needed"):
        main(["eval", "--model", str(checkpoint)])
    with pytest.raises(SystemExit, match="--batching needs held-out text with domain labels"):
        main(base + ["--batching", "same-domain"])
    dense = tmp_path / "dense"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    with pytest.raises(SystemExit, match="not a supported MoE model"):
        main(["eval", "--model", str(dense), "--text", str(checkpoint / "text.txt")])


def test_calibrate_then_sere(checkpoint, tmp_path, capsys):
    sim = tmp_path / "sim.safetensors"
    code, text = run(capsys, "calibrate", "--model", str(checkpoint), "--text", str(checkpoint / "text.txt"),
                     "--tokens", "64", "--out", str(sim))
    assert code == 0 and sim.exists()
    code, text = run(capsys, "eval", "--model", str(checkpoint), "--text", str(checkpoint / "text.txt"),
                     "--policy", f"sere:similarity={sim}", "--batch-sizes", "2", "--seq-len", "16",
                     "--sequences", "4", "--resamples", "50", "--generate", "0", "--json")
    rows = json.loads(text.strip().splitlines()[-1])["rows"]
    assert rows[1]["policy"].startswith("sere:") and rows[1]["mean_unique"] <= rows[0]["mean_unique"]


def test_multiple_choice_task_against_hand_scoring(checkpoint, tmp_path):
    model, tok = tiny_model("qwen3_moe"), tiny_tokenizer()
    items = [{"context": f"the {w} ", "choices": ["fox", "dog", "cat"], "answer": i % 3}
             for i, w in enumerate(["quick", "lazy", "brown", "red", "old", "big"])]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in items))
    result = evaluate_task(model, tok, path, {"native": make_policy("native")}, batch_sizes=(2,), resamples=50)
    assert result["kind"] == "multiple_choice"
    # by hand: one sequence at a time, native routing, sum of log-probabilities of the choice tokens
    hits = 0
    with torch.no_grad():
        for item in items:
            ctx = tok(item["context"])["input_ids"]
            best = []
            for choice in item["choices"]:
                cont = tok(choice)["input_ids"]
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                best.append(sum(logp[len(ctx) - 1 + t, c].item() for t, c in enumerate(cont)))
            hits += int(max(range(3), key=lambda j: (best[j], -j)) == item["answer"])
    native, again = result["rows"]
    assert native["score"] == pytest.approx(hits / len(items))
    assert again["delta"] == 0.0 and again["delta_ci"] == [0.0, 0.0]


def test_generation_task_and_bad_files(tmp_path):
    model, tok = tiny_model("qwen3_moe"), tiny_tokenizer()
    path = tmp_path / "gen.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "target": "x"}) for p in ["ab", "abc", "hello", "hi"]))
    result = evaluate_task(model, tok, path, {"oea": make_policy("oea", k0=1)}, batch_sizes=(2,),
                           max_new_tokens=3, resamples=50)
    assert result["kind"] == "generation" and [r["policy"] for r in result["rows"]] == ["native", "oea"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1}\n')
    with pytest.raises(ValueError, match="context/choices/answer"):
        load_jsonl(bad)
    bad.write_text('{"context": "a", "choices": ["b", "c"], "answer": 5}\n')
    with pytest.raises(ValueError, match="index of the right choice"):
        load_jsonl(bad)


def test_report_with_bench(checkpoint, tmp_path, capsys):
    out = tmp_path / "ev"
    run(capsys, "eval", "--model", str(checkpoint), "--text", str(checkpoint / "text.txt"), "--policy", "oea:k0=1",
        "--policy", "cap:k=2", "--batch-sizes", "4", "--seq-len", "16", "--sequences", "4", "--resamples", "50",
        "--generate", "0", "--out", str(out), "--json")
    code, text = run(capsys, "bench", "--dims", "32,16,16,4", "--routing", "uniform", "--policy", "oea:k0=1",
                     "--policy", "cap:k=2", "--batch-sizes", "4", "--repeats", "2", "--warmup", "1", "--steps", "2",
                     "--no-progress", "--json")
    assert code == 0
    bench_json = tmp_path / "bench.json"
    # two repeats are too few to judge noise, so the bench calls them noise; marked measured here, the report
    # must show the bench's own ratios (its noise handling is tested in test_first_run.py)
    result = json.loads(text.strip().splitlines()[-1])
    assert result["results"]["4"]["noisy"]
    result["results"]["4"]["noisy"] = False
    bench_json.write_text(json.dumps(result))
    code, text = run(capsys, "report", str(out / "eval.json"), "--bench", str(bench_json), "--out", str(tmp_path / "r"))
    assert code == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## MoE-layer latency" in md and "moe-reroute bench --dims 32,16,16,4" in md
    assert (tmp_path / "r" / "pareto_latency.png").stat().st_size > 0
    bench = json.loads(bench_json.read_text())
    ratios = {k: v["ratio_vs_native"] for k, v in bench["results"]["4"]["policies"].items()}
    assert ratios["native"] == 1.0
    for name in ("oea:k0=1", "cap:k=2"):  # the report's latency column is the bench's ratio
        assert f"| `{name}` | 4 |" in md and f"{ratios[name]:.2f} |" in md
