"""Bad specs, JSON, environment, trace and similarity files: one clear error naming the field or file."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_reroute import RouterSpec, make_policy, traces
from moe_reroute.hf import load_similarity, save_similarity
from moe_reroute.policies.spec import parse_policy_spec, policy_from_spec
from moe_reroute.sglang import plugin as sglang_plugin
from moe_reroute.traces import Trace
from moe_reroute.serving import config
from moe_reroute.vllm import plugin as vllm_plugin

SPEC = RouterSpec(8, 2)
DEEPSEEK = RouterSpec(8, 2, "sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.5,
                      weights_in_logits_dtype=False, arch="deepseek_v3")
DEEP = 5000  # brackets: far past Python's recursion limit


# --- 1. the SGLang plugin never serves without its policy ---


@pytest.fixture
def sim_file(tmp_path):
    return save_similarity({0: torch.eye(8)}, tmp_path / "sim.safetensors")


@pytest.mark.parametrize("value,needle", [
    ("oea:k0=[2,]", "has an empty item"),
    ("sere:similarity=/etc/passwd", "/etc/passwd is not a readable safetensors file"),
    ("sere:similarity=/tmp", "/tmp is a directory"),
    ("oea:k0=" + "[" * DEEP + "]" * DEEP, "nested lists are not supported"),
])
def test_sglang_register_stops_the_server_on_any_unreadable_configuration(monkeypatch, value, needle):
    guards = []
    monkeypatch.setattr(sglang_plugin, "_fail_on_first_forward", guards.append)
    monkeypatch.setattr(sglang_plugin, "STATE", sglang_plugin.State())
    monkeypatch.delenv("MOE_REROUTE_POLICY_FILE", raising=False)
    monkeypatch.setenv("MOE_REROUTE_POLICY", value)
    with pytest.raises(ValueError, match="MOE_REROUTE_POLICY") as e:
        sglang_plugin.register()
    assert needle in str(e.value)
    assert guards == [str(e.value)]  # the fail-on-first-forward guard carries the same message
    assert sglang_plugin.STATE.hook is None


def test_sglang_register_guards_even_an_unexpected_exception(monkeypatch):
    guards = []
    monkeypatch.setattr(sglang_plugin, "_fail_on_first_forward", guards.append)

    def broken(environ=None):
        raise KeyError("boom")

    monkeypatch.setattr(sglang_plugin._config, "from_env", broken)
    with pytest.raises(KeyError):
        sglang_plugin.register()
    assert len(guards) == 1 and "MOE_REROUTE_POLICY" in guards[0] and "boom" in guards[0]


def test_config_wraps_any_failure_to_build_the_policy_with_the_variable(monkeypatch):
    import moe_reroute.serving.config as cfg

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cfg, "parse", explode)
    with pytest.raises(ValueError, match=r"MOE_REROUTE_POLICY: cannot use 'oea:k0=3' \(RuntimeError: disk on fire\)"):
        cfg.from_env({"MOE_REROUTE_POLICY": "oea:k0=3"})


def test_sglang_register_stops_the_server_when_registering_the_hook_fails(monkeypatch):
    guards = []
    monkeypatch.setattr(sglang_plugin, "_fail_on_first_forward", guards.append)
    monkeypatch.setattr(sglang_plugin, "STATE", sglang_plugin.State())
    monkeypatch.setattr(sglang_plugin, "check_version", lambda version=None: None)
    monkeypatch.delenv("MOE_REROUTE_POLICY_FILE", raising=False)
    monkeypatch.setenv("MOE_REROUTE_POLICY", "oea:k0=1")

    def broken_install(cfg):
        raise AttributeError("HookRegistry has no register")

    monkeypatch.setattr(sglang_plugin, "install", broken_install)
    with pytest.raises(AttributeError):
        sglang_plugin.register()
    assert len(guards) == 1 and "HookRegistry has no register" in guards[0] and "MOE_REROUTE_POLICY" in guards[0]


@pytest.mark.parametrize("var", ["MOE_REROUTE_POLICY", "MOE_REROUTE_POLICY_FILE"])
@pytest.mark.parametrize("value", [" ", "\t\n", "   "])
def test_white_space_only_policy_variables_are_errors_not_unset(var, value):
    with pytest.raises(ValueError, match=f"{var} is set to white space only.*unset {var}"):
        config.from_env({var: value})
    assert config.from_env({var: ""}) is None  # set but empty: unset


def test_vllm_plugin_reads_the_policy_file_once_per_process(monkeypatch, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text('{"name": "cap", "k": 2}')
    monkeypatch.setattr(config, "_READ", {})
    monkeypatch.setattr(vllm_plugin, "STATE", vllm_plugin.State())
    monkeypatch.delenv("MOE_REROUTE_POLICY", raising=False)
    monkeypatch.delenv("MOE_REROUTE_COUNTERS", raising=False)
    monkeypatch.setenv("MOE_REROUTE_POLICY_FILE", str(path))
    first = vllm_plugin.STATE.current()  # the first router built
    path.write_text('{"name": "cap", "k": 3}')  # edited while the engine builds its layers
    later = vllm_plugin.STATE.current()  # every later router
    assert first is later and later.policy.config.k == 2


# --- 2. the spec parser ---


@pytest.mark.parametrize("text", ["oea:k0=[2,]", "oea:k0=[2,,3]", "oea:k0=[,2]", "cap:schedule=(2,4,,3),num_layers=4"])
def test_empty_list_items_are_named(text):
    with pytest.raises(ValueError, match="has an empty item; write one value between each pair of commas"):
        parse_policy_spec(text)


def test_deep_nesting_in_a_spec_is_refused_without_recursion():
    text = "oea:k0=" + "[" * DEEP + "2" + "]" * DEEP
    with pytest.raises(ValueError, match="nested lists are not supported") as e:
        parse_policy_spec(text)
    assert len(str(e.value)) < 300  # the spec is shortened in the message
    with pytest.raises(ValueError, match="unclosed bracket"):
        parse_policy_spec("oea:k0=" + "[" * DEEP)


@pytest.mark.parametrize("text,needle", [
    ("[" * DEEP + "]" * DEEP, "JSON that is not an object"),  # not a JSON object: refused as such
    ('{"name": "oea", "k0": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
])
def test_deep_nesting_in_engine_json_is_refused(text, needle):
    with pytest.raises(ValueError, match=re.escape(needle)) as e:
        config.parse(text, origin="MOE_REROUTE_POLICY")
    assert len(str(e.value)) < 300


def test_json_layer_keys_name_one_layer_each():
    with pytest.raises(ValueError, match=r"MOE_REROUTE_POLICY: k0: layer key '00' is not written plainly.*'0'"):
        config.parse('{"name": "oea", "k0": {"0": 2, "00": 3}}', origin="MOE_REROUTE_POLICY")
    with pytest.raises(ValueError, match="layer key '01'"):
        config.parse('{"name": "oea", "k0": {"01": 2}}', origin="MOE_REROUTE_POLICY")
    cfg = config.parse('{"name": "oea", "k0": {"0": 2, "10": 3}}')
    assert cfg.policy.config.k0 == {0: 2, 10: 3}


def test_json_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="MOE_REROUTE_POLICY_FILE: key 'k0' is given twice"):
        config.parse('{"name": "oea", "k0": 2, "k0": 3}', origin="MOE_REROUTE_POLICY_FILE")
    with pytest.raises(ValueError, match="key '1' is given twice"):
        config.parse('{"name": "oea", "k0": {"1": 2, "1": 3}}')


def test_cap_schedule_as_a_json_object_says_what_a_schedule_is():
    with pytest.raises(ValueError, match=r"schedule must be 4 ints \(b, h, e, p\): \[2, 4, 8, 3\] in JSON"):
        config.parse('{"name": "cap", "schedule": {"b": 2, "h": 4, "e": 8, "p": 3}, "num_layers": 4}')
    assert config.parse('{"name": "cap", "schedule": [2, 4, 8, 3], "num_layers": 4}').policy.config.k == [2, 3, 4, 8]


def test_cap_num_layers_is_bounded():
    with pytest.raises(ValueError, match="cap num_layers=100000000 is more than 4096"):
        policy_from_spec("cap:schedule=(2,4,8,3),num_layers=100000000")


@pytest.mark.parametrize("text,needle", [
    ("lynx:alpha=2,variant=quant_flatten_remove", "needs beta (the bottom bucket it removes"),
    ("lynx:alpha=1,variant=advanced_parametrized", "needs beta (the scale of the confidence"),
    ("lynx:alpha=2,beta=2,variant=advanced", "lynx variant must be one of quant, quant_flatten_remove, "
                                             "advanced_parametrized, got 'advanced'"),
    ("lynx:alpha=2,beta=0.5", "a whole number of buckets (1, 2, 3, ...), got 0.5"),
    ('{"name": "lynx", "alpha": 1, "beta": -1, "variant": "advanced_parametrized"}', "must be a number >= 0, got -1"),
    ('{"name": "lynx", "alpha": 2, "beta": {"by_batch": {"8": 2, "max": null}}, "variant": "quant_flatten_remove"}',
     "needs beta"),
])
def test_lynx_options_that_conflict_are_refused_from_specs_and_files(text, needle):
    with pytest.raises(ValueError) as e:
        config.parse(text)
    assert needle in str(e.value)


@pytest.mark.parametrize("value", ["nan", "NaN"])
def test_sere_threshold_nan_is_refused(sim_file, value):
    with pytest.raises(ValueError, match="sere threshold must be a number, got nan"):
        policy_from_spec(f"sere:similarity={sim_file},threshold={value}")
    with pytest.raises(ValueError, match="sere threshold must be a number"):
        make_policy("sere", similarity=torch.eye(8), threshold=[0.1, float("nan")])


# --- 3. unreadable similarity and trace files name the file ---


def _bad_files(tmp_path):
    good = save_similarity({0: torch.eye(8)}, tmp_path / "good.safetensors").read_bytes()
    files = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "text": b"these are not tensors\n" * 8,
        "garbage": bytes(range(256)) * 8,
    }
    out = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    (tmp_path / "folder").mkdir()
    out["folder"] = tmp_path / "folder"
    return out


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "garbage", "folder"])
@pytest.mark.parametrize("loader,expected", [(traces.load, "moe-reroute routing trace"),
                                             (load_similarity, "similarity file written by `moe-reroute calibrate`")])
def test_unreadable_files_are_named_with_what_was_expected(tmp_path, kind, loader, expected):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(ValueError) as e:
        loader(path)
    assert str(path) in str(e.value) and expected in str(e.value)
    assert "directory" in str(e.value) if kind == "folder" else "not a readable safetensors file" in str(e.value)


def test_missing_files_say_so(tmp_path):
    for loader in (traces.load, load_similarity):
        with pytest.raises(FileNotFoundError, match=f"no file at {tmp_path / 'nope'}"):
            loader(tmp_path / "nope")


@pytest.mark.parametrize("tensors,needle", [
    ({"weights": torch.eye(8)}, "is not a moe-reroute similarity file"),
    ({"layer.x": torch.eye(8)}, "is not a moe-reroute similarity file"),
    ({"layer.0": torch.eye(8), "layer.00": torch.eye(8)}, "is not a moe-reroute similarity file"),
    ({"layer.0": torch.eye(8).long()}, "layer 0 similarity must be finite floating point"),
    ({"layer.0": torch.full((8, 8), float("nan"))}, "layer 0 similarity must be finite floating point"),
])
def test_similarity_contents_are_checked(tmp_path, tensors, needle):
    save_file(tensors, str(tmp_path / "s.safetensors"))
    with pytest.raises(ValueError, match=needle):
        load_similarity(tmp_path / "s.safetensors")


# --- 4. trace headers and tensors are validated on load ---


def _trace(spec=SPEC, S=3, B=2) -> Trace:
    g = torch.Generator().manual_seed(0)
    logits = {0: torch.randn(S, B, spec.num_experts, generator=g), 1: torch.randn(S, B, spec.num_experts, generator=g)}
    valid = torch.ones(S, B, dtype=torch.bool)
    if spec.scoring == "sigmoid":
        specs = {k: spec.with_bias(torch.zeros(spec.num_experts)) for k in logits}
    else:
        specs = {k: spec for k in logits}
    return Trace(logits, valid, specs, {"model": "tiny"})


def _tampered(tmp_path, header=None, tensors=None, spec=SPEC):
    """A saved trace whose header and tensors were changed by the given functions."""
    path = _trace(spec).save(tmp_path / "t.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        head = json.loads(f.metadata()["moe_reroute"])
    data = load_file(str(path))
    if header:
        header(head)
    if tensors:
        tensors(data)
    out = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in data.items()}, str(out), metadata={"moe_reroute": json.dumps(head)})
    return out


def _set(d, key, value):
    d[key] = value


def _spec0(h):
    return h["specs"]["0"]


HEADER_CASES = {
    "no specs": (lambda h: h.pop("specs"), "header field 'specs' must be a mapping"),
    "specs a list": (lambda h: _set(h, "specs", [h["specs"]["0"]]), "header field 'specs' must be a mapping"),
    "layer key not a number": (lambda h: _set(h, "specs", {"a": _spec0(h), "1": h["specs"]["1"]}),
                               "spec layer key 'a' is not a layer number"),
    "layer key 00": (lambda h: _set(h, "specs", {"00": _spec0(h), "1": h["specs"]["1"]}),
                     "spec layer key '00' is not a layer number"),
    "spec not a mapping": (lambda h: _set(h["specs"], "0", 8), "spec of layer 0 must be a mapping"),
    "meta not a mapping": (lambda h: _set(h, "meta", ["model"]), "header field 'meta' must be a mapping"),
    "renormalize a string": (lambda h: _set(_spec0(h), "renormalize", "no"), "renormalize must be true/false, got 'no'"),
    "scaling NaN": (lambda h: _set(_spec0(h), "routed_scaling_factor", float("nan")),
                    "routed_scaling_factor must be finite"),
    "top_k a float": (lambda h: _set(_spec0(h), "top_k", 2.0), "top_k must be int, got 2.0"),
    "unknown field": (lambda h: _set(_spec0(h), "temperature", 1.0), "unknown fields ['temperature']"),
    "missing num_experts": (lambda h: _spec0(h).pop("num_experts"), "missing num_experts"),
    "bad spec": (lambda h: _set(_spec0(h), "top_k", 9), "spec of layer 0: RouterSpec: top_k K=9 > num_experts E=8"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_trace_header_is_validated(tmp_path, case):
    change, needle = HEADER_CASES[case]
    path = _tampered(tmp_path, header=change)
    with pytest.raises(ValueError) as e:
        traces.load(path)
    assert needle in str(e.value) and str(path) in str(e.value)


TENSOR_CASES = {
    "no valid": (lambda t: t.pop("valid"), "no 'valid' tensor"),
    "valid of floats": (lambda t: _set(t, "valid", t["valid"].float()), "'valid' must be a [S, B] bool tensor"),
    "valid of ints": (lambda t: _set(t, "valid", t["valid"].long()), "'valid' must be a [S, B] bool tensor"),
    "int32 logits": (lambda t: _set(t, "logits.0", t["logits.0"].int()), "'logits.0' must be floating point"),
    "NaN logits": (lambda t: t["logits.1"].__setitem__((2, 1, 3), float("nan")),
                   "'logits.1' holds NaN or inf (first at step 2)"),
    "no logits of a layer": (lambda t: t.pop("logits.1"), "no 'logits.1' tensor for spec layer 1"),
    "logits without a spec": (lambda t: _set(t, "logits.7", t["logits.0"].clone()), "tensors ['logits.7'] have no spec"),
    "0 steps": (lambda t: t.update({k: v[:0] for k, v in t.items()}), "the trace holds no tokens"),
    "logits shape": (lambda t: _set(t, "logits.0", t["logits.0"][:, :, :4]), "do not match valid"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_trace_tensors_are_validated(tmp_path, case):
    change, needle = TENSOR_CASES[case]
    path = _tampered(tmp_path, tensors=change)
    with pytest.raises(ValueError) as e:
        traces.load(path)
    assert needle in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("change,needle", [
    (lambda t: t.pop("bias.0"), "layer 0 routes as deepseek_v3 (with e_score_correction_bias) but 'bias.0' is missing"),
    (lambda t: _set(t, "bias.1", t["bias.1"].long()), "'bias.1' must be finite floating point, got torch.int64"),
    (lambda t: t["bias.0"].__setitem__(3, float("nan")), "'bias.0' must be finite floating point"),
    (lambda t: _set(t, "bias.0", t["bias.0"][:4]), "e_score_correction_bias must be a tensor of shape [E]=[8]"),
])
def test_deepseek_trace_bias_is_validated(tmp_path, change, needle):
    assert traces.load(_tampered(tmp_path, spec=DEEPSEEK)).specs[0].e_score_correction_bias is not None
    path = _tampered(tmp_path, tensors=change, spec=DEEPSEEK)
    with pytest.raises(ValueError) as e:
        traces.load(path)
    assert needle in str(e.value)


def test_a_saved_trace_loads_unchanged(tmp_path):
    trace = _trace(DEEPSEEK)
    back = traces.load(trace.save(tmp_path / "t.safetensors"))
    assert back.specs == trace.specs and back.meta == trace.meta
    assert all(torch.equal(back.logits[k], trace.logits[k]) for k in trace.layers)


def test_replay_of_a_layer_the_trace_lacks_says_which_it_has():
    with pytest.raises(ValueError, match=r"layers \[5\] are not in this trace; it holds layers \[0, 1\]"):
        _trace().replay(make_policy("native"), layers=[5])


# --- 5. measurement paths check the logits ---


def test_policies_from_specs_check_logits_unless_an_engine_turns_it_off():
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        policy_from_spec("oea:k0=1")(x, SPEC)
    assert config.parse("oea:k0=1").policy.check_inputs is False  # engines: inside CUDA graphs


# --- 6. engine configuration ---


def test_empty_policy_file_is_an_error(tmp_path):
    f = tmp_path / "policy.json"
    f.write_text("  \n")
    with pytest.raises(ValueError, match=f"MOE_REROUTE_POLICY_FILE={f}: the file is empty"):
        config.from_env({"MOE_REROUTE_POLICY_FILE": str(f)})


def test_non_utf8_policy_file_is_an_error(tmp_path):
    f = tmp_path / "policy.json"
    f.write_bytes(b'{"name": "oea", "k0": 3, "note": "\xff\xfe"}')
    with pytest.raises(ValueError, match=f"MOE_REROUTE_POLICY_FILE={f}: not UTF-8 text"):
        config.from_env({"MOE_REROUTE_POLICY_FILE": str(f)})


def test_policy_file_that_is_a_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=f"MOE_REROUTE_POLICY_FILE={tmp_path} is a folder"):
        config.from_env({"MOE_REROUTE_POLICY_FILE": str(tmp_path)})


@pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
def test_counters_must_say_yes_or_no(value):
    with pytest.raises(ValueError, match=f"MOE_REROUTE_COUNTERS='{value}': write 1 .* or 0"):
        config.from_env({"MOE_REROUTE_POLICY": "oea:k0=3", "MOE_REROUTE_COUNTERS": value})


@pytest.mark.parametrize("value,on", [("1", True), ("yes", True), ("On", True), ("0", False), ("off", False), ("", False)])
def test_counters_words(value, on):
    assert config.from_env({"MOE_REROUTE_POLICY": "oea:k0=3", "MOE_REROUTE_COUNTERS": value}).counters is on


@pytest.mark.parametrize("env,needle", [
    ({"MOE_REROUTE_POLICY": "oea:k0=[2,]"}, "MOE_REROUTE_POLICY: policy spec 'oea:k0=[2,]'"),
    ({"MOE_REROUTE_POLICY": "sere:similarity=/etc/passwd"}, "/etc/passwd is not a readable safetensors file"),
    ({"MOE_REROUTE_POLICY": "oea:k0=3", "MOE_REROUTE_COUNTERS": "maybe"}, "MOE_REROUTE_COUNTERS='maybe'"),
])
def test_vllm_register_stops_on_any_unreadable_configuration(monkeypatch, env, needle):
    from moe_reroute.vllm import plugin

    monkeypatch.delenv("MOE_REROUTE_POLICY_FILE", raising=False)
    monkeypatch.delenv("MOE_REROUTE_COUNTERS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(plugin, "install", lambda: pytest.fail("installed despite a bad configuration"))
    with pytest.raises(ValueError, match=re.escape(needle)):
        plugin.register()


# --- task files name the file and line ---


@pytest.mark.parametrize("content,needle", [
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"[1, 2]\n", ":1: a task line must be a JSON object, got a list"),
    (b'{"prompt": "a", "target": "b"}\n' + b"[" * 100_000 + b"\n", ":2: not JSON (nested too deeply to read)"),
])
def test_task_files_name_the_file_and_line(tmp_path, content, needle):
    from moe_reroute.measure.tasks import load_jsonl

    path = tmp_path / "task.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}") + ".*" + re.escape(needle)):
        load_jsonl(path)
    with pytest.raises(ValueError, match="is a folder; give a JSONL task file"):
        load_jsonl(tmp_path)


@pytest.mark.parametrize("policy, needle", [
    (lambda: make_policy("oea", k0=[3] * 5), "oea k0 lists 5 layers, but the model has 2 MoE layers (0..1)"),
    (lambda: make_policy("oea", k0={0: 3, 1: 2, 7: 2}), "oea k0 gives values for MoE layers [7], but the model has 2"),
    (lambda: make_policy("cap", schedule=(1, 2, 4, 2), num_layers=4),
     "cap k lists 4 layers (schedule=(1, 2, 4, 2) over num_layers=4), but the model has 2 MoE layers"),
    (lambda: make_policy("sere", similarity=torch.eye(16).expand(3, 16, 16).clone()),
     "sere similarity lists 3 layers, but the model has 2"),
    (lambda: make_policy("budget", budget={"by_batch": {"8": [4, 4], "max": [4, 4, 4]}}),
     "budget budget lists 3 layers"),
])
def test_per_layer_values_for_more_layers_than_the_model_has_are_refused(policy, needle):
    """A per-layer value that covers MoE layers the model does not have was meant for another model: its values
    would land on the wrong layers, so applying it is refused (the tiny model has 2 MoE layers, E=16, K=4)."""
    from tiny_models import tiny_model

    from moe_reroute import hf

    p = policy()
    with pytest.raises(ValueError, match=re.escape(needle)):
        p.check_layers(2)
    with pytest.raises(ValueError, match="does not fit this model: " + re.escape(needle)):
        hf.apply(tiny_model("qwen3_moe"), p)
    p.check_layers(5 if "5 layers" in needle else 8)  # a model with enough MoE layers takes it


def test_per_layer_values_that_fit_the_model_are_applied():
    from tiny_models import tiny_model

    from moe_reroute import hf

    model = tiny_model("qwen3_moe")
    for p in (make_policy("oea", k0=[1, 2]), make_policy("oea", k0={0: 1, 1: 2}), make_policy("cap", k=2)):
        hf.apply(model, p).remove()
    with pytest.raises(ValueError, match="num_layers must be the model's number of MoE layers"):
        make_policy("cap", k=2).check_layers(0)


@pytest.mark.parametrize("build, needle", [
    (lambda: RouterSpec(16, 4, renormalize="no"), "renormalize must be True or False, got 'no'"),
    (lambda: RouterSpec(16, 4, weights_in_logits_dtype=1), "weights_in_logits_dtype must be True or False"),
    (lambda: RouterSpec(True, True), "num_experts must be a positive int, got True"),
    (lambda: RouterSpec(16, 4, "sigmoid", n_group=4.0), "n_group must be an int, got 4.0"),
    (lambda: RouterSpec(16, 4, "sigmoid", topk_group="1"), "topk_group must be an int, got '1'"),
    (lambda: RouterSpec(16, 4, "sigmoid", routed_scaling_factor=float("nan")), "routed_scaling_factor must be a finite"),
    (lambda: RouterSpec(16, 4, "sigmoid", routed_scaling_factor=-1.0), "routed_scaling_factor must be a finite number > 0"),
    (lambda: RouterSpec(16, 4, "sigmoid", e_score_correction_bias=torch.arange(16)), "must be floating point"),
])
def test_router_spec_refuses_values_that_would_route_wrongly(build, needle):
    """Each of these was once taken (a truthy string as renormalize=True, NaN or negative weights, a float group
    count failing deep in torch); now the spec says what is wrong."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        build()


def test_logits_of_an_unsupported_dtype_and_a_non_finite_bias_are_refused():
    x = torch.randn(3, 16)
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"):
        make_policy("native")(x.to(torch.float8_e4m3fn), RouterSpec(16, 4))
    nan_bias = RouterSpec(16, 4, "sigmoid", e_score_correction_bias=torch.full((16,), float("nan")))
    with pytest.raises(ValueError, match="e_score_correction_bias contains NaN or inf"):
        make_policy("oea", k0=2)(x, nan_bias)
    routing = make_policy("oea", k0=2, check_inputs=False)(x, nan_bias)  # no host check: the engines' CUDA graphs
    assert routing.ids.shape == (3, 4)


@pytest.mark.parametrize("content, needle", [("3", "holds a number"), ("-1.5", "holds a number"),
                                             ("null", "holds null"), ("true", "holds true/false")])
def test_a_policy_file_of_a_json_scalar_is_refused_as_such(tmp_path, content, needle):
    from moe_reroute.policies import load_policy

    f = tmp_path / "p.json"
    f.write_text(content + "\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(f))}: the JSON {needle}, not an object"):
        load_policy(f)


def test_spec_errors_give_an_example_of_the_policy_named():
    from moe_reroute.policies import POLICIES
    from moe_reroute.policies.spec import EXAMPLES

    assert set(EXAMPLES) == set(POLICIES)
    for name, example in EXAMPLES.items():
        assert parse_policy_spec(example)[0] == name
        if name != "native":
            with pytest.raises(ValueError, match=re.escape(f"is not param=value (e.g. {example})")):
                parse_policy_spec(f"{name}:7")


def test_an_engines_native_top_k_is_checked():
    """native=(weights, ids): ids out of range, repeated or of a float dtype would route silently wrong (a float
    id cast to 0); each is refused with what is wrong. Padding rows may hold anything."""
    x, spec = torch.randn(3, 16), RouterSpec(16, 4)
    w, ids = torch.rand(3, 4), torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:4]
                                            for i in range(3)])
    policy = make_policy("oea", k0=2)
    for native, kind, needle in [((w, ids + 16), ValueError, "native ids must be expert ids 0..15 (padding rows too), got"),
                                 ((w, ids - 16), ValueError, "native ids must be expert ids 0..15 (padding rows too), got"),
                                 ((w, ids.float()), TypeError, "native ids must be an integer tensor"),
                                 ((w, torch.zeros_like(ids)), ValueError, "native ids repeat an expert"),
                                 ((w.long(), ids), TypeError, "native weights must be a floating-point tensor"),
                                 ([w], TypeError, "(weights, ids) pair of tensors")]:
        with pytest.raises(kind, match=re.escape(needle)):
            policy(x, spec, native=native)
    padded = ids.clone()
    padded[1] = 0  # a padding row's ids need not be distinct
    valid = torch.tensor([True, False, True])
    want = policy(x, spec, valid=valid, native=(w, ids))
    got = policy(x, spec, valid=valid, native=(w, padded))
    assert torch.equal(got.ids[valid], want.ids[valid])


@pytest.mark.parametrize("layer", [1.0, "1", True, -1])
def test_a_layer_index_that_is_not_an_int_is_refused(layer):
    """layer=True once read as MoE layer 1 and 1.0 failed inside list indexing; each is now named."""
    with pytest.raises(TypeError, match=re.escape("layer must be the MoE-layer index (an int >= 0; ")):
        make_policy("oea", k0=[1, 2])(torch.randn(3, 16), RouterSpec(16, 4), layer=layer)


def test_metrics_with_too_small_an_e_say_so():
    from moe_reroute import metrics

    routing = make_policy("native")(torch.randn(3, 16), RouterSpec(16, 4))
    with pytest.raises(ValueError, match=re.escape("the routing's ids reach past num_experts=4")):
        metrics.unique_experts(routing, 4)
    assert int(metrics.unique_experts(routing, 16)) == len(set(routing.ids.flatten().tolist()))


def test_a_similarity_path_given_to_make_policy_says_how_to_load_it():
    with pytest.raises(ValueError, match=re.escape("sere similarity='sim.safetensors' is a path, not a tensor: load it "
                                                   "with moe_reroute.similarity.load_similarity")):
        make_policy("sere", similarity="sim.safetensors")


def test_parameters_a_policy_would_ignore_are_refused():
    """check_inputs in a spec or policy file once clashed inside make_policy; num_layers beside k was ignored."""
    from moe_reroute.policies.spec import policy_from_object

    with pytest.raises(ValueError, match="check_inputs is not a policy parameter"):
        policy_from_spec("oea:k0=3,check_inputs=false")
    with pytest.raises(ValueError, match="check_inputs is not a policy parameter"):
        policy_from_object({"name": "oea", "k0": 3, "check_inputs": False})
    with pytest.raises(ValueError, match="cap: num_layers goes with schedule"):
        make_policy("cap", k=2, num_layers=4)
    assert make_policy("cap", schedule=(1, 2, 4, 2), num_layers=4).config.k == [1, 2, 3, 4]


def test_a_placement_rank_past_int64_is_named():
    from moe_reroute.placement import check_placement

    with pytest.raises(ValueError, match=re.escape("p.json: 10000000000000000000... is far too large")):
        check_placement([0] * 7 + [10 ** 30], 8, 2, origin="p.json")


def test_numbers_too_large_for_any_parameter_are_named():
    from moe_reroute.policies.spec import policy_from_text

    with pytest.raises(ValueError, match="9999999999... is too large a number for any parameter"):
        parse_policy_spec("oea:k0=" + "9" * 5000)  # once read as a float: "got inf"
    with pytest.raises(ValueError, match="holds an integer of thousands of digits, too large for any parameter"):
        policy_from_text('{"name": "oea", "k0": ' + "9" * 5000 + "}")
