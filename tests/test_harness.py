"""lm-evaluation-harness with a local task (JSON files, no downloads) on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an extra: pip install 'moe-reroute[lmeval]'")
pytest.importorskip("accelerate", reason="lm_eval's HFLM needs accelerate: pip install 'moe-reroute[lmeval]'")

import lm_eval  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from moe_reroute import make_policy  # noqa: E402
from moe_reroute.cli import main  # noqa: E402
from moe_reroute.hf import Recorder  # noqa: E402
from moe_reroute.measure.harness import evaluate_harness, task_manager  # noqa: E402
from moe_reroute.measure.tasks import evaluate_task  # noqa: E402

# contexts end without a space and choices start with one: the harness moves a context's trailing space
# into the continuation, which evaluate_task does not, and the scoring rules must match for the reference
WORDS = ["quick", "lazy", "brown", "red", "old", "big", "small", "tired", "happy", "sad", "grey", "wild"]
ITEMS = [{"context": f"the {w}" + " one" * (i % 3), "choices": [" fox", " dog jumps", " cat"], "answer": i % 3}
         for i, w in enumerate(WORDS)]


def tokenizer():
    tok = tiny_tokenizer()
    tok.eos_token = "[PAD]"  # HFLM needs a BOS or EOS id as the prefix of an empty context
    return tok


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(folder of task YAMLs, the JSONL file) of a local multiple-choice task `tiny_mc`."""
    root = tmp_path_factory.mktemp("lm_eval_task")
    data = root / "mc.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in ITEMS) + "\n")
    folder = root / "tasks"
    folder.mkdir()
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {root / 'cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder, data


def stock_accuracy(model, tok, folder) -> float:
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=task_manager(["tiny_mc"], str(folder)),
                                  log_samples=False, bootstrap_iters=0)
    return out["results"]["tiny_mc"]["acc,none"]


def test_native_equals_harness_and_task_reference(task):
    folder, data = task
    model, tok = tiny_model("qwen3_moe"), tokenizer()
    result = evaluate_harness(model, tok, ["tiny_mc"], str(folder),
                              {"native": make_policy("native"), "oea:k0=1": make_policy("oea", k0=1)}, batch_size=4)
    rows = [r for r in result["rows"] if r["metric"] == "acc"]
    assert [r["policy"] for r in rows] == ["native", "native", "oea:k0=1"]
    native, policy_native, oea = rows
    # the stock harness (no re-routing, no padding mask) scores the same
    assert native["value"] == stock_accuracy(model, tok, folder)
    # the independent reference: evaluate_task scores each choice by its summed log-likelihood too
    reference = evaluate_task(model, tok, data, {}, batch_sizes=(4,), resamples=50)["rows"][0]
    assert native["value"] == pytest.approx(reference["score"])
    assert policy_native["value"] == native["value"]
    assert policy_native["delta"] == 0.0 and policy_native["delta_ci"] == [0.0, 0.0]
    assert oea["documents"] == len(ITEMS) and oea["native_value"] == native["value"]
    assert oea["delta_ci"][0] <= oea["delta"] <= oea["delta_ci"][1]
    assert result["conditions"]["lm_eval"] == lm_eval.__version__


def forwards(model):
    """Capture (input_ids, attention_mask) of every forward of the model."""
    seen = []

    def pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append((ids.clone(), kwargs.get("attention_mask")))

    return seen, model.register_forward_pre_hook(pre_hook, with_kwargs=True)


def test_padding_rows_do_not_count(task):
    folder, _ = task
    model, tok = tiny_model("qwen3_moe"), tokenizer()
    # the stock harness gives no mask: its zero padding (the tiny tokenizer's [PAD]) reads as real tokens
    seen, handle = forwards(model)
    with Recorder(model) as rec:
        stock_accuracy(model, tok, folder)
    handle.remove()
    assert all(mask is None for _, mask in seen) and any((ids == 0).any() for ids, _ in seen)
    assert all(layer.valid.all() for step in rec.steps for layer in step.layers.values())

    seen, handle = forwards(model)
    with Recorder(model, keep="routing") as rec:
        evaluate_harness(model, tok, ["tiny_mc"], str(folder), {"cap:k=2": make_policy("cap", k=2)}, batch_size=4)
    handle.remove()
    assert len(seen) == len(rec.steps) and any((ids == 0).any() for ids, _ in seen)
    for (ids, mask), step in zip(seen, rec.steps):
        assert torch.equal(mask.bool(), ids != 0)  # every real token is valid, every padding token is not
        for layer in step.layers.values():
            assert torch.equal(layer.valid, ids != 0)
            # U at each position: the experts of that position's real tokens only
            B, S = ids.shape
            used = layer.ids.view(B, S, -1)
            for s in range(S):
                real = used[ids[:, s] != 0, s].unique()
                assert layer.unique[s].item() == real.numel()


def test_generation_task_reroutes_decode_only(tmp_path):
    data = tmp_path / "gen.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "target": "ab"}) for p in ["the quick", "a", "lazy dog", "hi"]))
    (tmp_path / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {tmp_path / 'cache'}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 3\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    model, tok = tiny_model("qwen3_moe"), tokenizer()
    pad = model.generation_config.pad_token_id
    with Recorder(model) as rec:
        evaluate_harness(model, tok, ["tiny_gen"], str(tmp_path), {}, batch_size=4)
    native_steps = len(rec.steps)  # greedy: the native run below repeats these forwards
    with Recorder(model) as rec:
        result = evaluate_harness(model, tok, ["tiny_gen"], str(tmp_path), {"cap:k=1": make_policy("cap", k=1)},
                                  batch_size=4)
    assert [r["policy"] for r in result["rows"]] == ["native", "cap:k=1"] and result["rows"][1]["documents"] == 4
    assert model.generation_config.pad_token_id == pad  # restored after each generate()
    policy_steps = rec.steps[native_steps:]
    prefill = [s for s in policy_steps if s.new_tokens > 1]
    decode = [s for s in policy_steps if s.new_tokens == 1]
    assert prefill and decode
    for step in prefill:  # the prompt routes natively, as on a server
        assert all(torch.equal(r.unique, r.native_unique) for r in step.layers.values())
    for step in decode:  # one expert per token: at most B experts
        assert all(r.unique.item() <= step.batch for r in step.layers.values())
    assert any(r.unique.item() < r.native_unique.item() for s in decode for r in s.layers.values())


@pytest.mark.long
def test_cli(task, tmp_path, capsys, monkeypatch):
    folder, data = task
    checkpoint = tmp_path / "tiny"
    tiny_model("qwen3_moe").save_pretrained(checkpoint)
    tokenizer().save_pretrained(checkpoint)
    code = main(["eval", "--model", str(checkpoint), "--lm-eval", "tiny_mc", "--lm-eval-include", str(folder),
                 "--policy", "oea:k0=1", "--batch-sizes", "2,4", "--resamples", "50", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [(r["policy"], r["batch_size"]) for r in rows] == [(p, b) for b in (2, 4) for p in ("native", "oea:k0=1")]
    with pytest.raises(SystemExit, match="exclusive"):
        main(["eval", "--model", str(checkpoint), "--task", str(data), "--lm-eval", "tiny_mc"])
    with pytest.raises(SystemExit, match="unknown lm-eval tasks"):
        main(["eval", "--model", str(checkpoint), "--lm-eval", "no_such_task_xyz", "--lm-eval-include", str(folder),
              "--policy", "oea:k0=1", "--batch-sizes", "2"])
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # as if the extra were not installed
    with pytest.raises(SystemExit, match=r"pip install 'moe-reroute\[lmeval\]'"):
        main(["eval", "--model", str(checkpoint), "--lm-eval", "tiny_mc"])
