"""oea and budget with expert parallelism (`ep`, `placement`, `rank_cap`) against their plain-loop
references (tests/reference.py), the no-op settings, fixed rows, steps, the kernel fallback and errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import distinct_logits, random_mask
from moe_reroute import RouterSpec, make_policy, metrics, placement
from moe_reroute.policies import policy_from_spec
from test_policies_vs_reference import batches, check_against, tol, valid_list


def draw_ep(data, E):
    """(params, placement list or None) for a random EP setting over E experts."""
    D = data.draw(st.integers(1, E))
    params = {"ep": D}
    where = None
    if data.draw(st.booleans()):
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
        where = torch.randint(0, D, (E,), generator=g)
        params["placement"] = where
    if data.draw(st.booleans()):
        params["rank_cap"] = data.draw(st.integers(1, max(1, E // D + 2)))
    return params, None if where is None else where.tolist()


def draw_oea(data, K, E):
    """Random OEA parameters for K and E: k0, and sometimes p, k_max and max_rank."""
    k0 = data.draw(st.integers(1, K))
    params = {"k0": k0}
    if data.draw(st.booleans()):
        params["p"] = data.draw(st.sampled_from([0.5, 0.9, 1.0]))
        params["k_max"] = data.draw(st.integers(k0, K))
        params["max_rank"] = data.draw(st.integers(1, E))
    return params


@settings(max_examples=150, deadline=None)
@given(batches(), st.data())
def test_oea_ep(batch, data):
    spec, logits, valid = batch
    K, E = spec.top_k, spec.num_experts
    params = draw_oea(data, K, E)
    ep, where = draw_ep(data, E)
    r = make_policy("oea", **params, **ep)(logits, spec, valid)
    vl = valid_list(valid, logits.shape[0])
    expected = ref.ref_oea_ep(logits, spec, vl, ranks=ep["ep"], placement=where, rank_cap=ep.get("rank_cap"),
                              **params)
    check_against(r, expected, spec, valid, tol(spec, logits))


@settings(max_examples=150, deadline=None)
@given(batches(), st.data())
def test_budget_ep(batch, data):
    spec, logits, valid = batch
    budget = data.draw(st.integers(1, spec.num_experts))
    ep, where = draw_ep(data, spec.num_experts)
    r = make_policy("budget", budget=budget, **ep)(logits, spec, valid)
    vl = valid_list(valid, logits.shape[0])
    expected = ref.ref_budget_ep(logits, spec, vl, budget, ranks=ep["ep"], placement=where,
                                 rank_cap=ep.get("rank_cap"))
    check_against(r, expected, spec, valid, tol(spec, logits))


@pytest.mark.parametrize("seed", range(6))
def test_fixed_rows_against_reference(seed):
    E, K, T = 32, 4, 12
    spec = RouterSpec(E, K)
    x = distinct_logits(T, E, seed=seed)
    valid = random_mask(T, seed)
    fixed = random_mask(T, seed + 50, p_invalid=0.7)  # about 30% fixed
    vl, fl = valid.tolist(), fixed.tolist()
    r = make_policy("oea", k0=2, ep=4)(x, spec, valid, fixed=fixed)
    check_against(r, ref.ref_oea_ep(x, spec, vl, 2, 4, fixed=fl), spec, valid)
    r = make_policy("budget", budget=8, ep=4)(x, spec, valid, fixed=fixed)
    check_against(r, ref.ref_budget_ep(x, spec, vl, 8, 4, fixed=fl), spec, valid)


def test_large_batch_matches_reference():
    """T=512, E=128, D=8: the vectorised path agrees with the loops at serving sizes."""
    spec = RouterSpec(128, 8)
    x = distinct_logits(512, 128, seed=11)
    valid = random_mask(512, 11, p_invalid=0.1)
    vl = valid.tolist()
    check_against(make_policy("oea", k0=3, ep=8)(x, spec, valid), ref.ref_oea_ep(x, spec, vl, 3, 8), spec, valid)
    check_against(make_policy("budget", budget=32, ep=8)(x, spec, valid), ref.ref_budget_ep(x, spec, vl, 32, 8),
                  spec, valid)


@pytest.mark.parametrize("seed", range(5))
def test_one_rank_is_the_plain_policy(seed):
    """D = 1 without rank_cap: the cap is the whole set, so the routing is the plain policy's, bit for bit."""
    spec = RouterSpec(64, 8)
    x = distinct_logits(24, 64, seed=seed)
    valid = random_mask(24, seed)
    for name, params in (("oea", {"k0": 3}), ("oea", {"k0": 2, "p": 0.6, "max_rank": 20}), ("budget", {"budget": 20})):
        a = make_policy(name, **params)(x, spec, valid)
        b = make_policy(name, ep=1, **params)(x, spec, valid)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("seed", range(5))
def test_cap_bounds_the_busiest_rank(seed):
    E, K, T, D = 128, 8, 16, 8
    spec = RouterSpec(E, K)
    x = distinct_logits(T, E, seed=seed)
    p = placement.contiguous(E, D)
    for name, params, cap in (("oea", {"k0": 3, "rank_cap": 3}, 3), ("budget", {"budget": 32}, 4)):
        r = make_policy(name, ep=D, **params)(x, spec)
        per = metrics.unique_experts_per_rank(r, E, D, p)
        top1 = torch.zeros(E, dtype=torch.long).scatter_(0, torch.topk(x, 1).indices[:, 0], 1)
        forced = torch.zeros(D, dtype=torch.long).scatter_add_(0, p, top1)
        assert (per <= torch.maximum(forced, torch.full_like(forced, cap))).all()


def test_steps_equal_separate_calls():
    spec = RouterSpec(32, 4)
    x = torch.stack([distinct_logits(8, 32, seed=s) for s in range(4)])
    valid = torch.stack([random_mask(8, s) for s in range(4)])
    for name, params in (("oea", {"k0": 2, "ep": 4}), ("budget", {"budget": 8, "ep": 4, "rank_cap": 3})):
        pol = make_policy(name, **params)
        r = pol(x, spec, valid)
        for s in range(4):
            one = pol(x[s], spec, valid[s])
            assert torch.equal(r.ids[s], one.ids) and torch.allclose(r.weights[s], one.weights)
        assert pol.unique(x, spec, valid).tolist() == metrics.unique_experts(r, 32).tolist()


def test_per_layer_placement_and_file(tmp_path):
    spec = RouterSpec(8, 2)
    x = distinct_logits(6, 8, seed=1)
    layers = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0, 1, 0]])
    f = tmp_path / "p.json"
    f.write_text(json.dumps(layers.tolist()))
    from_file = policy_from_spec(f"oea:k0=2,ep=2,placement={f}")
    for layer in (0, 1):
        want = ref.ref_oea_ep(x, spec, [True] * 6, 2, 2, placement=layers[layer].tolist())
        check_against(from_file(x, spec, layer=layer), want, spec, None)
        check_against(make_policy("oea", k0=2, ep=2, placement=layers)(x, spec, layer=layer), want, spec, None)
    with pytest.raises(ValueError, match="per MoE layer; call with layer="):
        from_file(x, spec)
    with pytest.raises(ValueError, match="lists 2 MoE layers; MoE layer 2 is out of range"):
        from_file(x, spec, layer=2)


def test_kernel_fallback_warns_once_and_matches_torch():
    """`ep` has a fused kernel (tests/test_kernels.py); over redundant experts (replicas) it has none: torch ops,
    one warning."""
    from moe_reroute.replicas import Replicas

    spec = RouterSpec(16, 4)
    x = distinct_logits(6, 16, seed=2)
    replicas = Replicas.from_physical(list(range(16)) + [0, 1, 2, 3], 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = make_policy("budget", budget=6, ep=2, placement=replicas, backend="triton")(x, spec)
        make_policy("budget", budget=6, ep=2, placement=replicas, backend="triton")(x, spec)
    said = [str(m.message) for m in w if "budget with ep" in str(m.message)]
    assert len(said) <= 1  # once per process (an earlier test may have said it already)
    from moe_reroute import kernels

    assert "budget with ep over redundant experts (a replicas placement) has no fused kernel" in kernels._warned
    t = make_policy("budget", budget=6, ep=2, placement=replicas, backend="torch", ties="lower-id")(x, spec)
    assert torch.equal(r.ids, t.ids) and torch.equal(r.weights, t.weights)


@pytest.mark.parametrize("params, match", [
    ({"placement": "contiguous"}, "give ep=D"),
    ({"rank_cap": 2}, "give ep=D"),
    ({"ep": 0}, "ep must be the number of expert-parallel ranks"),
    ({"ep": 2.5}, "ep must be the number of expert-parallel ranks"),
    ({"ep": 2, "rank_cap": 0}, "rank_cap must be an int >= 1"),
    ({"ep": 2, "placement": [0, 1, 2, 0, 1, 0, 1, 0]}, "expert 2 is on rank 2, but D=2"),
    ({"ep": 2, "placement": [[0]]}, "places 1 experts|D=2 ranks needs"),
    ({"ep": 2, "placement": 3}, "a non-empty JSON list of integer ranks"),
])
def test_bad_options(params, match):
    with pytest.raises(ValueError, match=match):
        make_policy("oea", k0=2, **params)
    with pytest.raises(ValueError, match=match):
        make_policy("budget", budget=4, **params)


def test_options_that_do_not_fit_the_model(tmp_path):
    spec = RouterSpec(8, 2)
    x = distinct_logits(4, 8)
    with pytest.raises(ValueError, match="D=16 ranks needs 1 <= D <= E=8"):
        make_policy("oea", k0=2, ep=16)(x, spec)
    with pytest.raises(ValueError, match="places 4 experts but the model has E=8"):
        make_policy("budget", budget=4, ep=2, placement=[0, 0, 1, 1])(x, spec)
    with pytest.raises(ValueError, match="none.json: no such file"):
        policy_from_spec(f"oea:k0=2,ep=2,placement={tmp_path / 'none.json'}")
    (tmp_path / "bad.json").write_text("[0, 1")
    with pytest.raises(ValueError, match="not valid JSON"):
        policy_from_spec(f"oea:k0=2,ep=2,placement={tmp_path / 'bad.json'}")
