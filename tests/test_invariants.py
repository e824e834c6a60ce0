"""Properties every routing must have, and the degenerate cases where a policy must equal native."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import distinct_logits, random_mask
from moe_reroute import RouterSpec, make_policy, metrics


def well_formed(r, spec):
    """ids in range; within a token the weight-carrying experts are distinct; weight-0 slots repeat one of them."""
    T, K = r.ids.shape
    assert K == spec.top_k and r.weights.shape == (T, K)
    assert r.weights.dtype == torch.float32 and torch.isfinite(r.weights).all()
    assert ((r.ids >= 0) & (r.ids < spec.num_experts)).all()
    assert (r.weights >= 0).all()
    for t in range(T):
        ids, ws = r.ids[t].tolist(), r.weights[t].tolist()
        carrying = [e for e, w in zip(ids, ws) if w > 0]
        assert len(carrying) == len(set(carrying)), f"token {t} holds an expert twice with weight: {ids} {ws}"
        if r.valid is None or r.valid[t]:
            assert carrying, f"valid token {t} has no weighted expert"
            assert set(ids) == set(carrying), f"token {t}: a weight-0 slot adds a new expert: {ids} {ws}"


SPEC_CHOICES = [
    RouterSpec(128, 8),
    RouterSpec(64, 8, renormalize=False),
    RouterSpec(8, 2),
    RouterSpec(32, 4, "topk_softmax"),
    RouterSpec(64, 8, "sigmoid", True, n_group=8, topk_group=4, routed_scaling_factor=2.5),
]


def sim_for(E, seed=0):
    s = torch.rand(E, E, generator=torch.Generator().manual_seed(seed))
    s = (s + s.T) / 2
    s.fill_diagonal_(1)
    return s


def policies_for(spec):
    K, E = spec.top_k, spec.num_experts
    return [
        make_policy("cap", k=max(1, K // 2)),
        make_policy("oea", k0=max(1, K // 3)),
        make_policy("oea", k0=1, p=0.6, max_rank=E // 2 or 1),
        make_policy("sere", similarity=sim_for(E), primary=min(2, K), threshold=0.3),
        make_policy("budget", budget=max(1, E // 4)),
    ]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SPEC_CHOICES), st.integers(1, 64), st.integers(0, 10**6), st.booleans())
def test_all_policies_well_formed_and_never_above_native(spec, T, seed, pad):
    logits = distinct_logits(T, spec.num_experts, seed=seed)
    valid = random_mask(T, seed) if pad else None
    native = make_policy("native")(logits, spec, valid)
    u_native = int(metrics.unique_experts(native, spec.num_experts))
    for policy in policies_for(spec):
        r = policy(logits, spec, valid)
        well_formed(r, spec)
        u = int(metrics.unique_experts(r, spec.num_experts))
        if policy.name in ("oea", "sere", "cap"):
            assert u <= u_native, f"{policy}: U={u} > native {u_native}"


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SPEC_CHOICES), st.integers(1, 48), st.integers(0, 10**6), st.data())
def test_oea_keeps_each_tokens_top_k0(spec, T, seed, data):
    k0 = data.draw(st.integers(1, spec.top_k))
    logits = distinct_logits(T, spec.num_experts, seed=seed)
    r = make_policy("oea", k0=k0)(logits, spec)
    top = make_policy("cap", k=k0)(logits, spec)  # each token's top-k0 (cap is checked against its reference)
    for t in range(T):
        assert set(top.ids[t].tolist()) <= set(r.ids[t].tolist())


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SPEC_CHOICES), st.integers(1, 64), st.integers(0, 10**6), st.data())
def test_budget_bound(spec, T, seed, data):
    budget = data.draw(st.integers(1, spec.num_experts))
    logits = distinct_logits(T, spec.num_experts, seed=seed)
    valid = random_mask(T, seed)
    r = make_policy("budget", budget=budget)(logits, spec, valid)
    u = int(metrics.unique_experts(r, spec.num_experts))
    native = make_policy("native")(logits, spec)
    top1 = {native.ids[t][native.weights[t].argmax()].item() for t in range(T) if valid[t]}
    assert u <= max(budget, len(top1))
    if budget >= int(valid.sum()):  # room for every token's best expert
        assert u <= budget
    for t in range(T):  # every valid token keeps its top-1
        if valid[t]:
            best = native.ids[t][native.weights[t].argmax()].item()
            assert best in r.ids[t].tolist()


@pytest.mark.parametrize("spec", SPEC_CHOICES, ids=lambda s: f"{s.scoring}-E{s.num_experts}-K{s.top_k}")
def test_single_token_degenerate_cases(spec):
    K, E = spec.top_k, spec.num_experts
    for seed in range(20):
        x = distinct_logits(1, E, seed=seed)
        native = make_policy("native")(x, spec)
        for policy in (make_policy("budget", budget=K), make_policy("budget", budget=E), make_policy("cap", k=K),
                       make_policy("gain", budget=K), make_policy("gain", budget=E)):
            r = policy(x, spec)
            assert sorted(r.ids[0].tolist()) == sorted(native.ids[0].tolist()), policy
            torch.testing.assert_close(
                dict_weights(r), dict_weights(native), msg=lambda m: f"{policy}: {m}"
            )
        # OEA on a batch of one is the paper's algorithm degenerating to top-k0
        for k0 in range(1, K + 1):
            r = make_policy("oea", k0=k0)(x, spec)
            cap = make_policy("cap", k=k0)(x, spec)
            assert sorted(set(r.ids[0].tolist())) == sorted(set(cap.ids[0].tolist()))
            torch.testing.assert_close(dict_weights(r), dict_weights(cap))


def dict_weights(r):
    """[E]-indexed weights of token 0 (sums duplicates) for order-free comparison."""
    out = torch.zeros(int(r.ids.max()) + 513)
    return out.index_add_(0, r.ids[0], r.weights[0])[:512]


@pytest.mark.parametrize("name,params", [
    ("oea", {"k0": 2}), ("budget", {"budget": 12}), ("sere", {"similarity": sim_for(32)}), ("gain", {"budget": 12}),
])
def test_padding_rows_do_not_influence_real_tokens(name, params):
    """Changing what padding rows contain must not change the routing of real tokens."""
    spec = RouterSpec(32, 4)
    policy = make_policy(name, **params)
    x = distinct_logits(12, 32, seed=3)
    valid = torch.tensor([True, False] * 6)
    a = policy(x, spec, valid)
    y = x.clone()
    y[~valid] = distinct_logits(6, 32, seed=99)
    b = policy(y, spec, valid)
    assert torch.equal(a.ids[valid], b.ids[valid])
    assert torch.equal(a.weights[valid], b.weights[valid])
    # and U counts only real tokens: the same as routing the real tokens alone
    alone = policy(x[valid], spec)
    assert int(metrics.unique_experts(a, 32)) == int(metrics.unique_experts(alone, 32))


def test_per_layer_parameters_match_scalar_configs():
    spec = RouterSpec(64, 8)
    x = distinct_logits(16, 64, seed=5)
    as_list = make_policy("oea", k0=[1, 3, 5])
    as_map = make_policy("oea", k0={0: 1, 1: 3, 2: 5})
    for layer, k0 in enumerate([1, 3, 5]):
        want = make_policy("oea", k0=k0)(x, spec)
        for policy in (as_list, as_map):
            got = policy(x, spec, layer=layer)
            assert torch.equal(got.ids, want.ids) and torch.equal(got.weights, want.weights)
    sims = torch.stack([sim_for(64, s) for s in range(3)])
    stacked = make_policy("sere", similarity=sims, primary=[1, 2, 3])
    listed = make_policy("sere", similarity=list(sims), primary={0: 1, 1: 2, 2: 3})
    for layer in range(3):
        want = make_policy("sere", similarity=sims[layer], primary=layer + 1)(x, spec)
        for policy in (stacked, listed):
            got = policy(x, spec, layer=layer)
            assert torch.equal(got.ids, want.ids) and torch.equal(got.weights, want.weights)


@pytest.mark.parametrize("name,params", [
    ("native", {}), ("cap", {"k": 4}), ("oea", {"k0": 3}), ("sere", {"similarity": sim_for(512)}),
    ("budget", {"budget": 64}), ("gain", {"budget": 16}),
])
def test_serving_sizes(name, params):
    """T=4096 tokens, E=512 experts: shapes hold and nothing blows up."""
    spec = RouterSpec(512, 8)
    x = torch.randn(4096, 512, generator=torch.Generator().manual_seed(0))
    r = make_policy(name, **params)(x, spec)
    assert r.ids.shape == (4096, 8) and r.weights.shape == (4096, 8)
    assert torch.isfinite(r.weights).all()
    well_formed(r, spec)


@pytest.mark.parametrize("spec", SPEC_CHOICES + [
    RouterSpec(64, 8, "sigmoid", True, n_group=8, topk_group=4, routed_scaling_factor=2.5,
               e_score_correction_bias=torch.linspace(-0.5, 0.5, 64)[torch.randperm(64, generator=torch.Generator().manual_seed(1))]),
], ids=lambda s: f"{s.scoring}-E{s.num_experts}-K{s.top_k}")
def test_gain_at_budget_e_is_native(spec):
    """budget = E: the set grows to every expert, so every token routes natively, also where a selection
    bias ranks an expert above one of more gate mass (a negative gain: it joins last, but joins)."""
    E = spec.num_experts
    for seed in range(5):
        x = distinct_logits(24, E, seed=seed)
        valid = random_mask(24, seed)
        r, nat = make_policy("gain", budget=E)(x, spec, valid), make_policy("native")(x, spec, valid)
        assert torch.equal(r.ids[valid], nat.ids[valid]) and torch.equal(r.weights[valid], nat.weights[valid])


def test_cap_schedule_hand_computed():
    from moe_reroute.policies import cap_schedule

    # layer 1 -> b=8, layer p=3 -> h=6, last layer 5 -> e=4; linear in between
    assert cap_schedule(8, 6, 4, 3, 5) == [8, 7, 6, 5, 4]
    assert cap_schedule(6, 2, 2, 2, 3) == [6, 2, 2]
    assert cap_schedule(8, 4, 4, 3, 4) == [8, 6, 4, 4]
    assert cap_schedule(8, 4, 2, 2, 5) == [8, 4, 3, 3, 2]  # 3.33 -> 3, 2.67 -> 3
    spec = RouterSpec(16, 8)
    x = distinct_logits(4, 16, seed=0)
    policy = make_policy("cap", schedule=(8, 6, 4, 3), num_layers=5)
    for layer, k in enumerate([8, 7, 6, 5, 4]):
        assert (policy(x, spec, layer=layer).weights > 0).sum(-1).tolist() == [k] * 4
