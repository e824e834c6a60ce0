"""Every policy against its plain-loop reference (tests/reference.py), over random batches.

Ids must agree exactly (as sets per token); weights closely. Padding rows must point only at experts
the valid rows already use, with weight 0.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import distinct_logits, random_mask
from moe_reroute import RouterSpec, make_policy


@st.composite
def batches(draw):
    scoring = draw(st.sampled_from(["softmax", "sigmoid", "topk_softmax"]))
    if scoring == "sigmoid":
        n_group = draw(st.sampled_from([1, 2, 4, 8]))
        size = draw(st.sampled_from([2, 4, 8]))
        E = n_group * size
        topk_group = draw(st.integers(1, n_group))
        K = draw(st.integers(1, min(topk_group * size, 8)))
        bias = None
        if draw(st.booleans()):
            g = torch.Generator().manual_seed(draw(st.integers(0, 10**6)))
            bias = (torch.randn(E, generator=g) * 0.1).float()
        spec = RouterSpec(
            E, K, "sigmoid", draw(st.booleans()), n_group=n_group, topk_group=topk_group,
            routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])), e_score_correction_bias=bias,
        )
    else:
        E = draw(st.sampled_from([2, 4, 8, 16, 32, 64, 128]))
        K = draw(st.integers(1, min(E, 8)))
        renorm = True if scoring == "topk_softmax" else draw(st.booleans())
        spec = RouterSpec(E, K, scoring, renorm)
    T = draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 10**6))
    logits = distinct_logits(T, E, dtype, seed)
    valid = random_mask(T, seed) if draw(st.booleans()) else None
    return spec, logits, valid


def as_dicts(routing):
    """Per token {expert: summed weight}; checks that weight-0 repeats only repeat a used expert."""
    out = []
    for ids, ws in zip(routing.ids.tolist(), routing.weights.tolist()):
        d = {}
        for e, w in zip(ids, ws):
            d[e] = d.get(e, 0.0) + w
        out.append(d)
    return out


def check_against(routing, expected, spec, valid, rel=1e-5):
    T, K = routing.ids.shape
    assert routing.ids.shape == (T, spec.top_k) and routing.weights.shape == (T, spec.top_k)
    assert routing.weights.dtype == torch.float32
    assert not routing.ids.dtype.is_floating_point
    assert torch.isfinite(routing.weights).all()
    assert ((routing.ids >= 0) & (routing.ids < spec.num_experts)).all()
    valid_list = [True] * T if valid is None else valid.tolist()
    got = as_dicts(routing)
    used = set()
    for t in range(T):
        if not valid_list[t]:
            continue
        assert sorted(got[t]) == sorted(expected[t]), f"token {t}: ids {sorted(got[t])} != reference {sorted(expected[t])}"
        for e, w in expected[t].items():
            assert got[t][e] == pytest.approx(w, rel=rel, abs=rel / 10), f"token {t} expert {e}"
        # every weight-0 slot repeats an expert that carries the token's weight
        for e, w in zip(routing.ids[t].tolist(), routing.weights[t].tolist()):
            if w == 0:
                assert e in expected[t]
        used.update(got[t])
    for t in range(T):
        if not valid_list[t]:
            assert set(got[t]) <= used or not used, "a padding row adds an expert to the batch"
            assert all(w == 0 for w in routing.weights[t].tolist())


def tol(spec, logits):
    """GPT-OSS's own router takes its softmax in the logits' dtype: its weights (which cap cuts, and every
    policy hands a token that keeps its native top-K) are rounded to it."""
    return 1e-2 if spec.scoring == "topk_softmax" and logits.dtype != torch.float32 else 1e-5


def valid_list(valid, T):
    return [True] * T if valid is None else valid.tolist()


@settings(max_examples=150, deadline=None)
@given(batches())
def test_native(batch):
    spec, logits, valid = batch
    r = make_policy("native")(logits, spec, valid)
    # GPT-OSS's own router takes its softmax in the logits' dtype
    rel = 1e-2 if spec.scoring == "topk_softmax" and logits.dtype != torch.float32 else 1e-5
    check_against(r, ref.ref_native(logits, spec, None), spec, None, rel)


@settings(max_examples=150, deadline=None)
@given(batches(), st.data())
def test_cap(batch, data):
    spec, logits, valid = batch
    k = data.draw(st.integers(1, spec.top_k))
    renorm = data.draw(st.sampled_from([None, True, False]))
    r = make_policy("cap", k=k, renormalize=renorm)(logits, spec, valid)
    check_against(r, ref.ref_cap(logits, spec, None, k, renorm), spec, valid, tol(spec, logits))


@settings(max_examples=200, deadline=None)
@given(batches(), st.data())
def test_oea(batch, data):
    spec, logits, valid = batch
    K, E = spec.top_k, spec.num_experts
    k0 = data.draw(st.integers(1, K))
    general = data.draw(st.booleans())
    params = {"k0": k0}
    if general:
        params["p"] = data.draw(st.sampled_from([0.3, 0.5, 0.8, 0.95, 1.0]))
        params["k_max"] = data.draw(st.integers(k0, K))
        params["max_rank"] = data.draw(st.integers(1, E))
    r = make_policy("oea", **params)(logits, spec, valid)
    vl = valid_list(valid, logits.shape[0])
    check_against(r, ref.ref_oea(logits, spec, vl, **params), spec, valid, tol(spec, logits))


@settings(max_examples=200, deadline=None)
@given(batches(), st.data())
def test_sere(batch, data):
    spec, logits, valid = batch
    E, K = spec.num_experts, spec.top_k
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    sim = torch.rand(E, E, generator=g)
    if data.draw(st.booleans()):  # raw cosine-like values in [-1, 1]
        sim = sim * 2 - 1
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(1.0)
    primary = data.draw(st.integers(1, K))
    threshold = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
    r = make_policy("sere", similarity=sim, primary=primary, threshold=threshold)(logits, spec, valid)
    vl = valid_list(valid, logits.shape[0])
    check_against(r, ref.ref_sere(logits, spec, vl, sim, primary, threshold), spec, valid, tol(spec, logits))


@settings(max_examples=200, deadline=None)
@given(batches(), st.data())
def test_budget(batch, data):
    spec, logits, valid = batch
    budget = data.draw(st.integers(1, spec.num_experts))
    r = make_policy("budget", budget=budget)(logits, spec, valid)
    vl = valid_list(valid, logits.shape[0])
    check_against(r, ref.ref_budget(logits, spec, vl, budget), spec, valid, tol(spec, logits))


@settings(max_examples=200, deadline=None)
@given(batches(), st.data())
def test_gain(batch, data):
    spec, logits, valid = batch
    budget = data.draw(st.integers(1, spec.num_experts))
    base = data.draw(st.integers(1, spec.top_k))
    r = make_policy("gain", budget=budget, base=base)(logits, spec, valid)
    vl = valid_list(valid, logits.shape[0])
    check_against(r, ref.ref_gain(logits, spec, vl, budget, base), spec, valid, tol(spec, logits))


def test_gain_counts_what_a_token_keeps_within_the_set():
    """Hand-computed (E=5, K=2, budget 3). Native top-2: token 0 {1, 4}, token 1 {1, 0}, token 2 {4, 3}; the
    top-1s give the set {1, 4}. `budget` adds expert 3 (token 2's native mass 5/13 against token 1's 4/11 for
    expert 0). But token 2 already holds expert 1 as its second slot (q = 4/13), so expert 3 raises its kept
    mass by only 1/13, to 12/13: log(1 + (1/13) / (12/13)) = log(13/12); token 1 holds expert 4 (q = 3/11),
    so expert 0 raises its kept mass by 1/11, from 10/11: log(1 + 1/10) = log(11/10), the larger: `gain` adds 0."""
    spec = RouterSpec(5, 2)
    counts = torch.tensor([[2.0, 8, 6, 3, 7], [4, 7, 1, 2, 3], [3, 4, 2, 5, 8]])
    x = (counts / counts.sum(-1, keepdim=True)).log()
    assert set(make_policy("budget", budget=3)(x, spec).ids.flatten().tolist()) == {1, 3, 4}
    r = make_policy("gain", budget=3)(x, spec)
    assert set(r.ids.flatten().tolist()) == {0, 1, 4}
    check_against(r, ref.ref_gain(x, spec, [True] * 3, 3), spec, None)


@pytest.mark.parametrize("name,params", [
    ("oea", {"k0": 3}),
    ("oea", {"k0": 2, "p": 0.7, "max_rank": 64}),
    ("budget", {"budget": 96}),
    ("gain", {"budget": 96}),
    ("cap", {"k": 5}),
])
def test_large_batch_matches_reference(name, params):
    """T=2048, E=512: the vectorised path still agrees with the loops at serving sizes."""
    spec = RouterSpec(512, 8)
    logits = distinct_logits(2048, 512, torch.float32, seed=7)
    valid = random_mask(2048, 7, p_invalid=0.1)
    r = make_policy(name, **params)(logits, spec, valid)
    refs = {"oea": ref.ref_oea, "budget": ref.ref_budget, "cap": ref.ref_cap, "gain": ref.ref_gain}
    check_against(r, refs[name](logits, spec, valid.tolist(), **params), spec, valid)


def test_sere_folds_a_reroute_onto_an_expert_the_token_already_uses():
    """Hand-computed: a secondary expert re-routed to a primary expert its token already holds has
    its weight folded into that slot, and the freed slot becomes a weight-0 repeat."""
    spec = RouterSpec(4, 3, "softmax", renormalize=False)
    logits = torch.tensor([[4.0, 2.0, 1.0, -5.0], [-5.0, 4.0, 0.0, 1.0]])
    sim = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.9, 0.8],
        [0.0, 0.9, 1.0, 0.0],
        [0.0, 0.8, 0.0, 1.0],
    ])
    r = make_policy("sere", similarity=sim, primary=1, threshold=0.5)(logits, spec)
    probs = torch.softmax(logits, -1).tolist()
    # P = {0, 1}. Token 0: slots (0, 1, 2) -> 1 is primary, 2 -> 1 (sim .9): folded into slot 1.
    assert r.ids[0].tolist() == [0, 1, 1]
    assert r.weights[0].tolist() == pytest.approx([probs[0][0], probs[0][1] + probs[0][2], 0.0])
    # Token 1: slots (1, 3, 2) -> 3 -> 1 (sim .8, folds into slot 0); 2 -> 1 (sim .9, folds too).
    assert r.ids[1].tolist() == [1, 1, 1]
    assert r.weights[1].tolist() == pytest.approx([probs[1][1] + probs[1][3] + probs[1][2], 0.0, 0.0])


@pytest.mark.parametrize("name,params", [
    ("cap", {"k": 2}), ("oea", {"k0": 1}), ("budget", {"budget": 3}), ("gain", {"budget": 3}),
    ("sere", {"similarity": torch.ones(6, 6), "primary": 1, "threshold": 0.0}),
])
def test_ties_go_to_the_lower_expert_id(name, params):
    """With ties="lower-id" every ranking puts equal scores in id order (tests/test_ranking_rule.py covers
    ties="model", whose ranks 1..K are torch.topk's)."""
    spec = RouterSpec(6, 3)
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    r = make_policy(name, ties="lower-id", **params)(logits, spec)
    refs = {"cap": ref.ref_cap, "oea": ref.ref_oea, "budget": ref.ref_budget, "gain": ref.ref_gain,
            "sere": ref.ref_sere}
    extra = {k: v for k, v in params.items() if k != "similarity"}
    args = (params["similarity"],) if name == "sere" else ()
    expected = refs[name](logits, spec, [True, True], *args, **extra)
    check_against(r, expected, spec, None)


def test_oea_top_p_counts_the_expert_that_reaches_p():
    """t_i is the fewest experts whose mass is >= p: a top-1 holding exactly p gives a base of one."""
    from moe_reroute.scoring import scores, token_probs

    spec = RouterSpec(8, 4)
    x = distinct_logits(1, 8, seed=3)
    p_top = float(token_probs(*scores(x, spec)).max())
    r = make_policy("oea", k0=3, p=p_top)(x, spec)
    assert int((r.weights > 0).sum()) == 1
    r = make_policy("oea", k0=3, p=min(1.0, p_top + 1e-6))(x, spec)
    assert int((r.weights > 0).sum()) == 2
