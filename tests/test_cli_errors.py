"""Bad command lines: exit status 2, one line on stderr, no traceback, nothing written; checked before work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import bad_input, snapshot
from tiny_models import tiny_model, tiny_tokenizer

import moe_reroute
from moe_reroute import hf, make_policy
from moe_reroute.cli import main
from moe_reroute.traces import Trace

ROOT = Path(__file__).resolve().parent.parent
# the reference model folder of the package these tests import (src/ or an installed copy)
SHIPPED = Path(moe_reroute.__file__).resolve().parent / "reference" / "model"


def eval_result(model: str = "tiny") -> dict:
    """A well-formed `eval --out` result: native and oea at batch sizes 1 and 2."""
    rows = []
    for B in (1, 2):
        for policy, u in (("native", 4.0 * B), ("oea:k0=1", 3.0 * B)):
            rows.append({"policy": policy, "batch_size": B, "mean_unique": u, "experts_per_token": 2.0,
                         "cross_entropy": 3.0, "delta_ce": 0.0 if policy == "native" else 0.01,
                         "delta_ce_ci": [0.0, 0.02], "significant_loss": False, "worse_by_se_rule": False,
                         "top1_agreement": 1.0, "kl_native_policy": 0.0, "unique_per_layer": {"0": u, "1": u}})
    return {"command": "moe-reroute eval --out ev", "rows": rows,
            "conditions": {"model": model, "num_experts": 16, "top_k": 4, "bootstrap_resamples": 50}}


@pytest.fixture
def eval_json(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(eval_result()))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("qwen3_moe").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "text.txt").write_text("the quick brown fox jumps over the lazy dog.\n\n" * 40)
    return folder


def _write(path: Path, data) -> Path:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


# --- report ---


@pytest.mark.parametrize("content,needles", [
    (None, ["no such file"]),
    ("{not json", ["not valid JSON", "expected eval.json of `moe-reroute eval --out DIR`, or the results.json of a report"]),
    ("[1, 2]", ["holds a JSON list, not an object"]),
    ('{"conditions": {}}', ['it has no "rows"']),
    ('{"rows": [{"policy": "oea"}], "conditions": {"model": "m", "num_experts": 8, "top_k": 2, '
     '"bootstrap_resamples": 10}}', ["row 0 needs 'batch_size'"]),
    ('{"rows": [1], "conditions": {"model": "m"}}', ["\"conditions\" needs 'num_experts'"]),
    (b"\xff\xfe{}", ["not UTF-8 text"]),
    ("[" * 100_000, ["nested too deeply"]),
])
def test_report_bad_results_file(tmp_path, capsys, content, needles):
    path = tmp_path / "eval.json"
    if content is not None:
        _write(path, content)
    out = tmp_path / "rep"
    line = bad_input(capsys, ["report", path, "--out", out], str(path), *needles)
    assert line.startswith("moe-reroute report: error: results file")
    assert not out.exists()  # --out is made only once its input has been read


def test_report_task_results_are_not_eval_results(tmp_path, capsys):
    task = {"rows": [{"policy": "oea:k0=1", "batch_size": 1, "metric": "acc", "score": 0.5}],
            "conditions": {"model": "m", "num_experts": 8, "top_k": 2, "bootstrap_resamples": 10}}
    path = _write(tmp_path / "task.json", json.dumps(task))
    bad_input(capsys, ["report", path, "--out", tmp_path / "rep"], "row 0 needs 'mean_unique'", "not --task")
    assert not (tmp_path / "rep").exists()


def test_report_bad_bench_file(tmp_path, capsys, eval_json):
    bench = _write(tmp_path / "bench.json", '{"shape": {}}')
    bad_input(capsys, ["report", eval_json, "--bench", bench, "--out", tmp_path / "rep"],
              f"--bench {bench}", "needs 'routing'", "moe-reroute bench --json")
    bad_input(capsys, ["report", eval_json, "--bench", tmp_path / "none.json", "--out", tmp_path / "rep"],
              "--bench", "no such file")
    assert not (tmp_path / "rep").exists()


def test_report_unusable_out(tmp_path, capsys, eval_json):
    taken = _write(tmp_path / "file", "x")
    bad_input(capsys, ["report", eval_json, "--out", taken], f"--out {taken} is an existing file")
    bad_input(capsys, ["report", eval_json, "--out", taken / "sub"], f"{taken} is a file, so no folder can be made")
    assert taken.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_report_out_in_a_read_only_folder(tmp_path, capsys, eval_json):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    bad_input(capsys, ["report", eval_json, "--out", ro / "rep"], "is not writable")


def test_report_batch_size_not_evaluated(tmp_path, capsys, eval_json):
    bad_input(capsys, ["report", eval_json, "--batch-size", "16", "--out", tmp_path / "rep"],
              "--batch-size: batch size 16 was not evaluated; evaluated: [1, 2]")
    assert not (tmp_path / "rep").exists()


def test_report_escapes_text_from_the_results_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    evil = "tiny <img src=x onerror=alert(1)> [link](http://x) |cell|\n# injected heading"
    result = eval_result(model=evil)
    result["rows"][1]["policy"] = result["rows"][3]["policy"] = "oea`| injected"
    result["command"] = "moe-reroute eval\n```\n# out of the code block"
    path = _write(tmp_path / "eval.json", json.dumps(result))
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    title = md.splitlines()[0]
    assert title == ("# moe-reroute report: tiny \\<img src=x onerror=alert(1)\\> \\[link\\](http://x) \\|cell\\| "
                     "\\# injected heading")
    assert "\n# injected" not in md and not re.search(r"(?<!\\)<img", md)
    assert "- model: tiny \\<img" in md
    assert "| ``oea`\\| injected`` |" in md  # a code span longer than the label's backtick run; | escaped
    fence = md.splitlines()[2]
    assert fence == "````" and md.splitlines()[6] == "````"  # the command's ``` cannot close its block


# --- calibrate ---


def test_calibrate_checks_its_arguments_before_loading_anything(tmp_path, capsys, checkpoint, monkeypatch):
    import moe_reroute.cli.measure as measure

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(measure, "load_model", no_model)
    text = checkpoint / "text.txt"
    bad_input(capsys, ["calibrate", "--text", text, "--tokens", "-5", "--out", tmp_path / "s.safetensors"],
              "--tokens must be >= 2, got -5")
    bad_input(capsys, ["calibrate", "--text", text, "--out", tmp_path], f"--out {tmp_path} is a folder")
    blocker = _write(tmp_path / "blocker", "x")
    bad_input(capsys, ["calibrate", "--text", text, "--out", blocker / "s.safetensors"], "is a file, so no folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.parametrize("config,needles", [
    ("{broken", ["--model", "config.json", "not valid JSON"]),
    ('{"hidden_size": 8}', ['config.json has no "model_type"']),
    ('{"model_type": "not_a_model"}', ["transformers cannot load it"]),
])
def test_calibrate_with_a_broken_checkpoint(tmp_path, capsys, checkpoint, config, needles):
    folder = tmp_path / "model"
    folder.mkdir()
    _write(folder / "config.json", config)
    before = snapshot(folder)
    bad_input(capsys, ["calibrate", "--model", folder, "--text", checkpoint / "text.txt",
                       "--out", tmp_path / "s.safetensors"], str(folder), *needles)
    assert snapshot(folder) == before and not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("content,needle", [(None, "no such file"), (b"\xff\xfe\x00bad", "not UTF-8 text"),
                                            ("  \n\n", "is empty")])
def test_calibrate_bad_text(tmp_path, capsys, checkpoint, content, needle):
    text = tmp_path / "calib.txt"
    if content is not None:
        _write(text, content)
    bad_input(capsys, ["calibrate", "--model", checkpoint, "--text", text, "--out", tmp_path / "s.safetensors"],
              f"--text {text}", needle)
    assert not (tmp_path / "s.safetensors").exists()


def test_calibrate_makes_the_folder_of_its_out_file(tmp_path, capsys, checkpoint):
    out = tmp_path / "new" / "s.safetensors"
    assert main(["calibrate", "--model", str(checkpoint), "--text", str(checkpoint / "text.txt"), "--tokens", "16",
                 "--out", str(out)]) == 0
    assert hf.load_similarity(out, num_experts=16).keys() == {0, 1}


def test_calibrate_on_less_text_than_tokens_says_so_and_records_what_it_read(tmp_path, capsys, checkpoint):
    from safetensors import safe_open
    from tiny_models import tiny_tokenizer

    text = _write(tmp_path / "short.txt", "the quick brown fox")
    n = len(tiny_tokenizer()("the quick brown fox").input_ids)
    out = tmp_path / "s.safetensors"
    assert main(["calibrate", "--model", str(checkpoint), "--text", str(text), "--tokens", "100000", "--out", str(out)]) == 0
    assert f"the text gives {n} tokens, fewer than --tokens 100000: calibrating on {n}" in capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["tokens"] == str(n)  # not the 100000 asked for


# --- eval, demo, bench ---


def test_eval_checks_out_and_numbers_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import moe_reroute.cli.measure as measure

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(measure, "load_model", no_model)
    taken = _write(tmp_path / "taken", "x")
    bad_input(capsys, ["eval", "--out", taken], f"--out {taken} is an existing file")
    bad_input(capsys, ["eval", "--seq-len", "0"], "--seq-len must be >= 2, got 0")
    bad_input(capsys, ["eval", "--sequences", "-1"], "--sequences must be >= 2")
    bad_input(capsys, ["eval", "--task", tmp_path / "none.jsonl"], "--task", "no such file")
    bad_input(capsys, ["eval", "--lm-eval", ""], "--lm-eval needs task names")
    for sizes in ("0", "2000000", "4,x", "4,,8", "4,8,"):
        bad_input(capsys, ["eval", "--batch-sizes", sizes], "--batch-sizes must be integers 1..1048576", repr(sizes))


def test_demo_checks_out_and_shape_before_the_run(tmp_path, capsys, monkeypatch):
    import moe_reroute.reference as reference

    def no_model(*args, **kwargs):
        raise AssertionError("the demo started before its arguments were checked")

    monkeypatch.setattr(reference, "load", no_model)
    taken = _write(tmp_path / "taken", "x")
    bad_input(capsys, ["demo", "--out", taken], f"--out {taken} is an existing file")
    bad_input(capsys, ["demo", "--out", tmp_path / "rep", "--shape", "qwen4"], "unknown shape 'qwen4'")
    # 7 held-out domains: 100 sequences give at most 15 of one domain, short of a same-domain batch of 16
    bad_input(capsys, ["demo", "--out", tmp_path / "rep", "--sequences", "100"], "--sequences 100",
              "give at most 15", "give --sequences 112")
    assert not (tmp_path / "rep").exists()


def test_bench_with_an_unreadable_trace(tmp_path, capsys):
    garbage = _write(tmp_path / "t.safetensors", b"\x00" * 64)
    bad_input(capsys, ["bench", "--dims", "32,16,16,4", "--device", "cpu", "--trace", garbage],
              str(garbage), "not a readable safetensors file", "routing trace")


def test_bench_on_a_trace_with_nan_logits(tmp_path, capsys):
    logits = {0: torch.randn(4, 4, 16)}
    logits[0][1, 2, 3] = float("nan")
    from moe_reroute import RouterSpec

    path = Trace(logits, torch.ones(4, 4, dtype=torch.bool), {0: RouterSpec(16, 4)}).save(tmp_path / "t.safetensors")
    bad_input(capsys, ["bench", "--dims", "32,16,16,4", "--device", "cpu", "--batch-sizes", "4", "--trace", path],
              "'logits.0' holds NaN or inf (first at step 1)")


# --- train-reference, reference-card: never into the installed package by default ---


def test_train_reference_writes_to_the_working_directory(tmp_path, capsys, monkeypatch):
    import moe_reroute.reference.train as train

    written = []
    monkeypatch.setattr(train, "train", lambda workdir, out, cfg, stop_after=None: written.append(out) or out)
    monkeypatch.setattr(train, "calibrate_sere", lambda workdir, folder: None)
    monkeypatch.chdir(tmp_path)
    assert main(["train-reference", "--workdir", str(tmp_path / "work"), "--tokens", "1000"]) == 0
    assert written == [Path("moe-reroute-reference")] and written[0].resolve().parent == tmp_path
    assert main(["train-reference", "--workdir", str(tmp_path / "work"), "--refresh-shipped"]) == 0
    assert written[1].resolve() == SHIPPED.resolve()
    taken = _write(tmp_path / "taken", "x")
    bad_input(capsys, ["train-reference", "--out", taken], f"--out {taken} is an existing file")
    bad_input(capsys, ["train-reference", "--out", "elsewhere", "--refresh-shipped"], "not both")
    assert len(written) == 2


def test_reference_card_writes_to_the_working_directory(tmp_path, monkeypatch, capsys):
    import moe_reroute.reference as reference
    from moe_reroute.reference import card

    model = tiny_model("qwen3_moe")  # built now: transformers' one-time notes about its config are not the command's
    monkeypatch.setattr(reference, "load", lambda dtype=None, folder=None: (model, tiny_tokenizer(), "x"))
    monkeypatch.setattr(reference, "heldout_documents", lambda folder=None, part="validation": [])
    monkeypatch.setattr(card, "heldout_ids", lambda tokenizer, text: torch.arange(8))
    monkeypatch.setattr(card, "domain_streams", lambda tokenizer, docs: {"kjv": torch.arange(8)})
    monkeypatch.setattr(card, "cross_entropy", lambda model, ids, max_tokens=None: 1.0)
    monkeypatch.setattr(card, "routing_stats", lambda model, ids: {})
    monkeypatch.setattr(card, "render", lambda result, training: "card\n")
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"kjv": torch.arange(64, dtype=torch.int32) % 8}, work / "train_ids.pt")
    monkeypatch.chdir(tmp_path)
    before = snapshot(SHIPPED)
    bad_input(capsys, ["reference-card", "--workdir", str(tmp_path / "none")], "no training split")
    assert main(["reference-card", "--workdir", str(work)]) == 0
    assert snapshot(SHIPPED) == before
    out = tmp_path / "moe-reroute-reference-card"
    assert json.loads((out / "card.json").read_text())["heldout_ce"] == 1.0
    assert (out / "MODEL_CARD.md").read_text() == "card\n"


# --- the rule itself: one line, status 2, --debug, a real process ---


def test_usage_errors_are_one_line(capsys):
    bad_input(capsys, ["report"], "the following arguments are required: eval_json", "--help")
    bad_input(capsys, ["calibrate", "--text", "t", "--out", "o", "--tokens", "many"], "invalid int value: 'many'")
    # an option the command does not have: said by the command, pointing to its own --help
    line = bad_input(capsys, ["eval", "--bogus", "x"], "unrecognized arguments: --bogus x")
    assert line.startswith("moe-reroute eval: error: ") and line.endswith("(see moe-reroute eval --help)")


def test_help_gives_every_default_and_the_version(capsys):
    from moe_reroute.cli.bench import DEFAULT_POLICIES

    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]  # argparse wraps lines
    for option, default in (("--steps STEPS", "(default 8)"), ("--repeats REPEATS", "(default: 10)"),
                            ("--warmup WARMUP", "(default 2)"), ("--seed SEED", "(default: 0)"),
                            ("--kernel {auto,loop,grouped_mm}", "(auto, the default)")):
        assert option in text and default in text.split(option, 1)[1].split(" --")[0], option
    assert " ".join(DEFAULT_POLICIES) in text and "(default: None)" not in text
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"moe-reroute {moe_reroute.__version__}"


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--debug", "report", str(tmp_path / "none.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" in err and err.strip().splitlines()[-1].endswith("no such file")
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "none.json"), "--debug"])
    assert "Traceback" in capsys.readouterr().err


def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run([sys.executable, "-m", "moe_reroute.cli", "report", str(tmp_path / "none.json"),
                          "--out", str(tmp_path / "rep")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"moe-reroute report: error: results file {tmp_path / 'none.json'}: "
                                               "no such file"]
    assert not (tmp_path / "rep").exists()


# --- hf.apply misuse ---


def test_apply_to_a_module_that_is_not_a_moe_model():
    with pytest.raises(ValueError, match=r"unsupported model Linear \(model_type None\); moe_reroute.hf supports"):
        hf.apply(torch.nn.Linear(2, 2), "native")
    with pytest.raises(TypeError, match="model must be a transformers MoE model"):
        hf.apply("Qwen/Qwen3-30B-A3B", "native")
    with pytest.raises(TypeError, match="layers must be a list of layer indices"):
        hf.apply(tiny_model("qwen3_moe"), "native", layers="01")


def test_apply_never_stacks_policies():
    model = tiny_model("qwen3_moe")
    ids = torch.randint(2, 64, (3, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = model(input_ids=ids).logits
    first = hf.apply(model, "cap", k=1, phase="all")
    hooks = sum(len(r._forward_hooks) for _, r in hf.moe_routers(model))
    with pytest.raises(ValueError, match=r"already routes with Cap\(.*call .remove\(\).*or pass replace=True"):
        hf.apply(model, "oea", k0=1, phase="all")
    assert sum(len(r._forward_hooks) for _, r in hf.moe_routers(model)) == hooks  # nothing added
    second = hf.apply(model, make_policy("native"), phase="all", replace=True)
    assert sum(len(r._forward_hooks) for _, r in hf.moe_routers(model)) == hooks  # replaced, not stacked
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, native)
    first.remove()  # a stale handle does not take the new policy off
    assert sum(len(r._forward_hooks) for _, r in hf.moe_routers(model)) == hooks
    second.remove()
    assert sum(len(r._forward_hooks) for _, r in hf.moe_routers(model)) == 0
    with hf.apply(model, "cap", k=1):  # and it may be applied again
        pass


def test_reference_card_names_a_model_dir_it_cannot_use(tmp_path, capsys):
    bad_input(capsys, ["reference-card", "--model-dir", tmp_path / "none", "--out", tmp_path / "card"],
              f"--model-dir {tmp_path / 'none'} does not exist")
    bad_input(capsys, ["reference-card", "--model-dir", tmp_path, "--out", tmp_path / "card"],
              f"--model-dir {tmp_path} holds no config.json")
