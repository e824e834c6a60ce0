"""Parameters that depend on the step size (`by_batch` buckets), and policy files through every loader.

The reference for a by_batch policy at a step of T tokens is the same policy built with that bucket's
plain value: the two must route identically.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import distinct_logits, random_mask
from moe_reroute import RouterSpec, load_policy, make_policy
from moe_reroute.policies.base import ByBatch
from moe_reroute.policies.spec import policy_from_text
from moe_reroute.vllm import config as plugin_config

SPEC = RouterSpec(num_experts=16, top_k=4)
K0 = {"by_batch": {"1": 4, "4": [1, 2], "16": 3, "max": {0: 2, 1: 1}}}  # bounds as JSON writes them


def bucket_value(T: int, layer: int):
    """K0's value at a step of T tokens, MoE layer `layer`, read off by hand."""
    if T <= 1:
        return 4
    if T <= 4:
        return [1, 2][layer]
    if T <= 16:
        return 3
    return {0: 2, 1: 1}[layer]


def same(a, b):
    assert torch.equal(a.ids, b.ids)
    assert torch.allclose(a.weights, b.weights, rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 2, 4, 5, 16, 17, 40])
@pytest.mark.parametrize("layer", [0, 1])
def test_each_step_size_takes_its_buckets_value(T, layer):
    policy = make_policy("oea", k0=K0)
    x = distinct_logits(T, 16, seed=T)
    valid = random_mask(T, seed=T, p_invalid=0.2)
    same(policy(x, SPEC, valid, layer=layer), make_policy("oea", k0=bucket_value(T, layer))(x, SPEC, valid, layer=layer))


@pytest.mark.parametrize("name, params, plain", [
    ("cap", {"k": {"by_batch": {"2": 4, "max": 1}}}, lambda T: {"k": 4 if T <= 2 else 1}),
    ("budget", {"budget": {"by_batch": {"8": 12, "max": [6, 9]}}}, lambda T: {"budget": 12 if T <= 8 else [6, 9]}),
    ("gain", {"budget": {"by_batch": {"8": 12, "max": [6, 9]}}}, lambda T: {"budget": 12 if T <= 8 else [6, 9]}),
    ("oea", {"k0": 2, "k_max": {"by_batch": {"4": 4, "max": 3}}}, lambda T: {"k0": 2, "k_max": 4 if T <= 4 else 3}),
])
def test_other_policies_and_parameters(name, params, plain):
    policy = make_policy(name, **params)
    for T in (1, 2, 3, 8, 9, 30):
        x = distinct_logits(T, 16, seed=100 + T)
        same(policy(x, SPEC, layer=1), make_policy(name, **plain(T))(x, SPEC, layer=1))


def test_sere_primary_by_batch():
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(16, 16, generator=g)
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(1.0)
    policy = make_policy("sere", similarity=sim, primary={"by_batch": {"3": 3, "max": 1}}, threshold=0.3)
    for T in (2, 3, 4, 12):
        x = distinct_logits(T, 16, seed=T)
        ref = make_policy("sere", similarity=sim, primary=3 if T <= 3 else 1, threshold=0.3)
        same(policy(x, SPEC), ref(x, SPEC))


@pytest.mark.parametrize("name,params,field,at", [
    ("oea", {"k0": K0, "ep": 2, "placement": [[0, 1] * 8, [1, 0] * 8]}, "k0", bucket_value),
    ("budget", {"budget": {"by_batch": {"4": [6, 7], "max": 9}}, "ep": 4}, "budget",
     lambda T, layer: [6, 7][layer] if T <= 4 else 9),
    ("cap", {"k": [2, 3]}, "k", lambda T, layer: [2, 3][layer]),
    ("sere", {"similarity": torch.rand(16, 16), "primary": [1, 2]}, "primary", lambda T, layer: [1, 2][layer]),
])
def test_a_resolved_config_is_a_copy_with_every_attribute(name, params, field, at):
    """`at_layer` writes its shallow copy out (torch 2.11's dynamo cannot trace copy.copy): the copy holds
    every attribute the config holds (the same objects: the placement and its cache are shared), but for the
    per-layer or by-batch value, resolved."""
    config = make_policy(name, **params).config
    for layer in (0, 1):
        for T in (3, 20):
            got = config.at_layer(layer, T)
            assert type(got) is type(config) and got is not config
            assert set(vars(got)) == set(vars(config))
            for attr, value in vars(config).items():
                assert getattr(got, attr) == at(T, layer) if attr == field else getattr(got, attr) is value


def test_bucket_bounds_are_read_as_written():
    b = ByBatch.parse("k0", {"by_batch": {"32": 3, "1": 8, "4": 4, "max": 2}})
    assert b.buckets == ((1, 8), (4, 4), (32, 3)) and b.rest == 2
    assert [b.at(T) for T in (1, 2, 4, 5, 32, 33, 10_000)] == [8, 4, 4, 3, 3, 2, 2]
    assert ByBatch.parse("k0", b.to_json()) == b
    assert ByBatch.parse("k0", {"by_batch": {1: 8, "max": 2}}).buckets == ((1, 8),)


@pytest.mark.parametrize("value, message", [
    ({"by_batch": {"1": 4}}, 'needs a "max" bucket'),
    ({"by_batch": {"01": 4, "max": 1}}, "bound '01' is not a step size"),
    ({"by_batch": {"0": 4, "max": 1}}, "bound '0' is not a step size"),
    ({"by_batch": {"-2": 4, "max": 1}}, "bound '-2' is not a step size"),
    ({"by_batch": {"one": 4, "max": 1}}, "bound 'one' is not a step size"),
    ({"by_batch": {}}, "a value by batch size is an object"),
    ({"by_batch": {"max": 1}, "extra": 2}, "a value by batch size is an object"),
    ({"by_batch": {"max": {"by_batch": {"max": 1}}}}, "by_batch cannot nest"),
    ({"by_batch": {"4": 0, "max": 1}}, "oea k0 must be an int >= 1"),
    ({"by_batch": {"4": [], "max": 1}}, "empty per-layer list"),
    ({"by_batch": {"4": {-1: 2}, "max": 1}}, "layer keys must be non-negative ints"),
])
def test_bad_buckets_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        make_policy("oea", k0=value)


def test_a_parameter_that_cannot_vary_says_so():
    with pytest.raises(ValueError, match="renormalize cannot differ by batch size"):
        make_policy("cap", k=2, renormalize={"by_batch": {"max": True}})


def test_a_bucket_that_does_not_fit_is_named():
    policy = make_policy("oea", k0={"by_batch": {"2": 5, "max": 2}})
    policy(distinct_logits(3, 16), SPEC)  # a step in the bucket that fits
    with pytest.raises(ValueError, match=r"oea k0=5 > the model's K=4 \(by_batch bucket of steps up to 2 tokens\)"):
        policy.check_model(SPEC, None)
    with pytest.raises(ValueError, match=r"k0=6 > the model's K=4 \(by_batch bucket \"max\"\)"):
        make_policy("oea", k0={"by_batch": {"2": 1, "max": 6}}).check_model(SPEC, None)
    with pytest.raises(ValueError, match="lists 2 layers; MoE layer 2"):
        make_policy("oea", k0=K0).check_model(SPEC, 2)


def test_varies_by_layer_looks_inside_buckets():
    assert make_policy("oea", k0=K0).config.varies_by_layer()
    assert not make_policy("oea", k0={"by_batch": {"1": 2, "max": 1}}).config.varies_by_layer()
    assert make_policy("oea", k0={"by_batch": {"1": 2, "max": 1}}).config.varies_by_batch()
    assert not make_policy("oea", k0=[1, 2]).config.varies_by_batch()


def tuned_file(tmp_path):
    obj = {"name": "oea", "k0": {"by_batch": {"1": 4, "4": [1, 2], "16": 3, "max": {"0": 2, "1": 1}}}, "p": 1.0, "phase": "decode", "verify": False,
           "about": {"written by": "a test", "budget": 0.01}}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(obj, indent=1))
    return path


def test_a_policy_file_loads_the_same_through_every_loader(tmp_path, monkeypatch):
    path = tuned_file(tmp_path)
    direct = make_policy("oea", k0={"by_batch": {1: 4, 4: [1, 2], 16: 3, "max": {0: 2, 1: 1}}}, p=1.0)
    loaded = load_policy(path)
    monkeypatch.setenv(plugin_config.POLICY_FILE_ENV, str(path))
    monkeypatch.delenv(plugin_config.POLICY_ENV, raising=False)
    engine = plugin_config.from_env()
    assert engine.verify is False and engine.phase == "decode"
    assert loaded.config == direct.config == engine.policy.config
    for T in (1, 3, 9, 20):
        x = distinct_logits(T, 16, seed=T)
        for layer in (0, 1):
            same(loaded(x, SPEC, layer=layer), direct(x, SPEC, layer=layer))


def test_load_policy_reads_a_spec_line_and_names_the_file(tmp_path):
    spec = tmp_path / "p.txt"
    spec.write_text("cap:k=2\n")
    assert load_policy(spec).config == make_policy("cap", k=2).config
    for text, message in [("", "the file is empty"), ("{", "not valid JSON"), ('{"k0": 3}', 'must be an object with a "name"'),
                          ('{"name": "oea", "k0": {"by_batch": {"2": 1}}}', 'needs a "max" bucket'),
                          ("oea:k0=0", "k0 must be an int >= 1")]:
        spec.write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            load_policy(spec)
        assert str(spec) in str(e.value)
    with pytest.raises(ValueError, match="no such file"):
        load_policy(tmp_path / "missing.json")


def test_json_layer_keys_inside_buckets_are_layers():
    p = policy_from_text('{"name": "oea", "k0": {"by_batch": {"4": {"1": 2, "0": 1}, "max": 1}}}')
    assert p.config.k0.buckets == ((4, {1: 2, 0: 1}),)
    with pytest.raises(ValueError, match="layer key '01' is not written plainly"):
        policy_from_text('{"name": "oea", "k0": {"by_batch": {"4": {"01": 2}, "max": 1}}}')


def test_the_fused_kernels_take_each_buckets_value():
    pytest.importorskip("triton")
    from moe_reroute import kernels

    if not kernels.available("cpu")[0]:
        pytest.skip(kernels.available("cpu")[1])
    fused = make_policy("oea", k0=K0, backend="triton")
    for T in (1, 3, 9, 20):
        x = distinct_logits(T, 16, seed=T)
        ref = make_policy("oea", k0=bucket_value(T, 1), ties="lower-id", backend="torch")
        r, want = fused(x, SPEC, layer=1), ref(x, SPEC, layer=1)
        assert torch.equal(r.ids.long(), want.ids)
        assert torch.allclose(r.weights, want.weights, rtol=1e-6, atol=0)


def test_adapters_check_every_bucket_before_the_first_forward():
    from tiny_models import tiny_model

    from moe_reroute import hf

    model = tiny_model("qwen3_moe")
    K = model.config.num_experts_per_tok
    with pytest.raises(ValueError, match=r"by_batch bucket \"max\""):
        hf.apply(model, make_policy("oea", k0={"by_batch": {"1": 1, "max": K + 1}}))
    with pytest.raises(ValueError, match=r"by_batch bucket of steps up to 4 tokens"):
        plugin_config.parse('{"name": "cap", "k": {"by_batch": {"4": 99, "max": 1}}}').policy.check_model(SPEC, 0)
