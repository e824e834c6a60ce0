"""Fixed rows: `policy(..., fixed=mask)` keeps the masked rows native and counts their native experts in
the batch's expert set, which the other rows may use. Against the loop references (tests/reference.py),
bit-for-bit native on the fixed rows, and hand-computed cases where a re-routed token uses a fixed
token's expert (torch backend; tests/test_kernels.py holds the kernels against torch)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import distinct_logits
from moe_reroute import RouterSpec, make_policy, metrics
from test_policies_vs_reference import batches, check_against, tol, valid_list
from test_ranking_rule import tied_batches

POLICY_NAMES = ["native", "cap", "oea", "sere", "budget", "gain"]
REFS = {"native": ref.ref_native, "cap": ref.ref_cap, "oea": ref.ref_oea, "sere": ref.ref_sere,
        "budget": ref.ref_budget, "gain": ref.ref_gain}


def random_fixed(T: int, seed: int, share: float) -> torch.Tensor:
    """[T] bool: each row fixed with probability `share` (0: none, 1: all)."""
    return torch.rand(T, generator=torch.Generator().manual_seed(seed + 2)) < share


def draw_params(name, spec, data, top_p=True):
    """(the policy's parameters, the reference's extra positional args, the reference's keyword args).
    top_p=False leaves oea's p at 1 (with many equal scores a cumulative mass may sit exactly on p, where
    float32 and the loops' float64 sums may disagree)."""
    K, E = spec.top_k, spec.num_experts
    if name == "cap":
        p = {"k": data.draw(st.integers(1, K)), "renormalize": data.draw(st.sampled_from([None, True, False]))}
        return p, (), p
    if name == "oea":
        k0 = data.draw(st.integers(1, K))
        p = {"k0": k0}
        if data.draw(st.booleans()):
            p.update(k_max=data.draw(st.integers(k0, K)), max_rank=data.draw(st.integers(1, E)))
            if top_p:
                p["p"] = data.draw(st.sampled_from([0.3, 0.8, 1.0]))
        return p, (), p
    if name == "sere":
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
        sim = torch.rand(E, E, generator=g)
        sim = (sim + sim.T) / 2
        sim.fill_diagonal_(1.0)
        p = {"primary": data.draw(st.integers(1, K)), "threshold": data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))}
        return dict(p, similarity=sim), (sim,), p
    if name == "budget":
        p = {"budget": data.draw(st.integers(1, E))}
        return p, (), p
    if name == "gain":
        p = {"budget": data.draw(st.integers(1, E)), "base": data.draw(st.integers(1, K))}
        return p, (), p
    return {}, (), {}


def checked(name, valid):
    """The `valid` check_against compares with: `native` routes padding rows as the model does."""
    return None if name == "native" else valid


def assert_native_on(r, nat, rows):
    """Bit for bit the native routing on `rows` ([T] bool)."""
    assert torch.equal(r.ids[rows], nat.ids[rows])
    assert torch.equal(r.weights[rows], nat.weights[rows])


@pytest.mark.parametrize("name", POLICY_NAMES)
@settings(max_examples=120, deadline=None)
@given(batch=batches(), share=st.sampled_from([0.0, 0.3, 0.7, 1.0]), data=st.data())
def test_fixed_rows_match_the_loops(name, batch, share, data):
    """Random batches (padding rows too) with random fixed rows, against the loop references; fixed
    rows are exactly native."""
    spec, logits, valid = batch
    T = logits.shape[0]
    fixed = random_fixed(T, data.draw(st.integers(0, 10**6)), share)
    params, args, ref_params = draw_params(name, spec, data)
    r = make_policy(name, **params)(logits, spec, valid, fixed=fixed)
    vl = valid_list(valid, T)
    expected = REFS[name](logits, spec, vl, *args, fixed=fixed.tolist(), **ref_params)
    check_against(r, expected, spec, checked(name, valid), tol(spec, logits))
    rows = fixed & torch.tensor(vl)
    assert_native_on(r, make_policy("native")(logits, spec), rows)


@settings(max_examples=100, deadline=None)
@given(batch=tied_batches(), name=st.sampled_from(POLICY_NAMES), ties=st.sampled_from(["model", "lower-id"]),
       data=st.data())
def test_fixed_rows_are_native_with_ties(batch, name, ties, data):
    """Many equal scores: fixed rows are still what `native` returns (same ties rule), bit for bit, and
    the other rows match the loops given the model's top-K."""
    spec, x, valid = batch
    T = x.shape[0]
    fixed = random_fixed(T, data.draw(st.integers(0, 10**6)), 0.4)
    params, args, ref_params = draw_params(name, spec, data, top_p=False)
    r = make_policy(name, ties=ties, **params)(x, spec, valid, fixed=fixed)
    nat = make_policy("native", ties=ties)(x, spec)
    vl = valid_list(valid, T)
    assert_native_on(r, nat, fixed & torch.tensor(vl))
    # the loops' own top-K: the stock router's torch ops (groups included) for "model", their order otherwise
    native_ids = ref.stock_topk(x, spec) if ties == "model" else None
    expected = REFS[name](x, spec, vl, *args, native_ids=native_ids, fixed=fixed.tolist(), **ref_params)
    check_against(r, expected, spec, checked(name, valid), tol(spec, x))


@settings(max_examples=100, deadline=None)
@given(batch=batches(), name=st.sampled_from(POLICY_NAMES), data=st.data())
def test_no_fixed_row_is_the_call_without_fixed(batch, name, data):
    """fixed all False routes exactly as fixed=None (today's call), and a fixed flag on a padding row
    changes nothing: it is padding whatever `fixed` says."""
    spec, logits, valid = batch
    T = logits.shape[0]
    params, _, _ = draw_params(name, spec, data)
    pol = make_policy(name, **params)
    base = pol(logits, spec, valid)
    for r in (pol(logits, spec, valid, fixed=torch.zeros(T, dtype=torch.bool)), pol(logits, spec, valid, fixed=None)):
        assert torch.equal(r.ids, base.ids) and torch.equal(r.weights, base.weights)
    if valid is not None:
        fixed = random_fixed(T, data.draw(st.integers(0, 10**6)), 0.5)
        a = pol(logits, spec, valid, fixed=fixed | ~valid)
        b = pol(logits, spec, valid, fixed=fixed & valid)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)


@settings(max_examples=100, deadline=None)
@given(batch=tied_batches(), name=st.sampled_from(POLICY_NAMES), data=st.data())
def test_an_all_fixed_batch_is_native(batch, name, data):
    spec, x, valid = batch
    T = x.shape[0]
    params, _, _ = draw_params(name, spec, data)
    r = make_policy(name, **params)(x, spec, valid, fixed=torch.ones(T, dtype=torch.bool))
    keep = torch.ones(T, dtype=torch.bool) if valid is None else valid
    assert_native_on(r, make_policy("native")(x, spec), keep)


@settings(max_examples=150, deadline=None)
@given(batch=tied_batches(), data=st.data())
def test_oea_and_budget_with_fixed_rows_stay_within_their_sets(batch, data):
    """U(oea) <= U(native) with fixed rows too (the fixed rows' experts are part of native's set), and
    budget's U is at most max(budget, forced experts: re-routed top-1s and fixed native top-Ks)."""
    spec, x, valid = batch
    T, E = x.shape[0], spec.num_experts
    fixed = random_fixed(T, data.draw(st.integers(0, 10**6)), data.draw(st.sampled_from([0.2, 0.5, 0.9])))
    v = torch.ones(T, dtype=torch.bool) if valid is None else valid
    ties = data.draw(st.sampled_from(["model", "lower-id"]))
    nat = make_policy("native", ties=ties)(x, spec, valid)
    u_native = int(metrics.unique_experts(nat, E))
    k0 = data.draw(st.integers(1, spec.top_k))
    u = int(metrics.unique_experts(make_policy("oea", k0=k0, ties=ties)(x, spec, valid, fixed=fixed), E))
    assert u <= u_native
    nat = make_policy("native", ties="lower-id")(x, spec, valid)  # ids best first: slot 0 is the top-1
    budget = data.draw(st.integers(1, E))
    forced = set()
    for t in range(T):
        if v[t]:
            forced.update(nat.ids[t].tolist() if fixed[t] else nat.ids[t, :1].tolist())
    u = int(metrics.unique_experts(make_policy("budget", budget=budget, ties="lower-id")(x, spec, valid, fixed=fixed), E))
    assert u <= max(budget, len(forced))


def test_engine_native_top_k_comes_back_on_fixed_rows():
    """An engine's own top-K (`native=`), in its slot order, is exactly what a fixed row returns."""
    spec = RouterSpec(16, 4)
    x = distinct_logits(6, 16, seed=4)
    nat = make_policy("native")(x, spec)
    engine = (nat.weights.flip(1).contiguous(), nat.ids.flip(1).int())  # another slot order, int32 ids
    fixed = torch.tensor([True, False, True, False, False, True])
    sim = torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    for name, params in [("cap", {"k": 2}), ("oea", {"k0": 1}), ("sere", {"similarity": sim, "primary": 1}),
                         ("budget", {"budget": 4})]:
        r = make_policy(name, **params)(x, spec, native=engine, fixed=fixed)
        assert torch.equal(r.ids[fixed], engine[1][fixed].long()), name
        assert torch.equal(r.weights[fixed], engine[0][fixed]), name


# --- hand-computed: 3 tokens, E=8, K=2; token 0 is fixed ---

SPEC = RouterSpec(8, 2, "softmax", renormalize=True)
X = torch.tensor([
    [5.0, 4.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # native {0, 1}; ranking 0 1 7 6 5 4 3 2
    [0.1, 3.0, 5.0, 0.2, 0.3, 0.4, 0.5, 0.6],  # native {2, 1}; ranking 2 1 7 6 5 4 3 0
    [0.6, 0.1, 0.2, 5.0, 4.0, 0.3, 0.4, 0.5],  # native {3, 4}; ranking 3 4 0 7 6 5 2 1
])
FIXED = torch.tensor([True, False, False])


def experts(r, t):
    """{expert: weight} of token t's slots with weight."""
    out = {}
    for e, w in zip(r.ids[t].tolist(), r.weights[t].tolist()):
        if w > 0:
            out[e] = out.get(e, 0.0) + w
    return out


def pair(a, b):
    """Softmax weights of two kept experts with logits a and b, renormalised over them."""
    return 1 / (1 + math.exp(b - a)), 1 / (1 + math.exp(a - b))


def test_oea_piggybacks_on_a_fixed_tokens_expert():
    """k0=1. Fixed: S = {0, 1} (token 0's native) + {2} + {3}; token 1 takes expert 1 at its rank 2 (only
    token 0's second expert), token 2 walks past 4 to 0. Without fixed, S = {0, 2, 3} and token 1
    takes 3 instead."""
    pol = make_policy("oea", k0=1)
    r = pol(X, SPEC, fixed=FIXED)
    nat = make_policy("native")(X, SPEC)
    assert torch.equal(r.ids[0], nat.ids[0]) and torch.equal(r.weights[0], nat.weights[0])
    w2, w1 = pair(5.0, 3.0)
    assert experts(r, 1) == pytest.approx({2: w2, 1: w1})
    w3, w0 = pair(5.0, 0.6)
    assert experts(r, 2) == pytest.approx({3: w3, 0: w0})
    assert int(metrics.unique_experts(r, 8)) == 4 < int(metrics.unique_experts(nat, 8)) == 5
    free = pol(X, SPEC)
    assert sorted(experts(free, 1)) == [2, 3]


def test_sere_keeps_a_secondary_expert_a_fixed_token_loads():
    """primary=1: with token 0 fixed, P = {0, 1, 2, 3}, so token 1's secondary expert 1 stays and token 2's
    secondary 4 moves to its most similar primary (3). Without fixed, P = {0, 2, 3}: expert 1 moves to 2."""
    sim = torch.eye(8)
    sim[1, 2] = sim[2, 1] = 0.9
    sim[4, 3] = sim[3, 4] = 0.8
    pol = make_policy("sere", similarity=sim, primary=1, threshold=0.5)
    p = torch.softmax(X, -1)
    r = pol(X, SPEC, fixed=FIXED)
    assert experts(r, 0) == pytest.approx({0: float(p[0, 0] / p[0, :2].sum()), 1: float(p[0, 1] / p[0, :2].sum())})
    w2, w1 = pair(5.0, 3.0)
    assert experts(r, 1) == pytest.approx({2: w2, 1: w1})
    assert experts(r, 2) == pytest.approx({3: 1.0})
    free = pol(X, SPEC)
    assert experts(free, 1) == pytest.approx({2: 1.0})


def test_budget_counts_a_fixed_tokens_experts_against_the_budget():
    """budget=3: forced = {0, 1} (fixed token 0) + {2} + {3}, four experts, more than the budget: the set
    is just them; token 2 gets 3 and 0. budget=5 leaves one more, expert 4 (token 2's mass): native."""
    r = make_policy("budget", budget=3)(X, SPEC, fixed=FIXED)
    assert sorted(experts(r, 0)) == [0, 1]
    assert experts(r, 1) == pytest.approx(dict(zip((2, 1), pair(5.0, 3.0))))
    assert experts(r, 2) == pytest.approx(dict(zip((3, 0), pair(5.0, 0.6))))
    assert int(metrics.unique_experts(r, 8)) == 4
    r = make_policy("budget", budget=5)(X, SPEC, fixed=FIXED)
    assert sorted(experts(r, 2)) == [3, 4]
    free = make_policy("budget", budget=3)(X, SPEC)  # without fixed: set {0, 2, 3}
    assert sorted(experts(free, 0)) == [0, 3]


def test_cap_keeps_every_native_expert_of_a_fixed_token():
    r = make_policy("cap", k=1)(X, SPEC, fixed=FIXED)
    nat = make_policy("native")(X, SPEC)
    assert torch.equal(r.ids[0], nat.ids[0]) and torch.equal(r.weights[0], nat.weights[0])
    assert experts(r, 1) == pytest.approx({2: 1.0}) and experts(r, 2) == pytest.approx({3: 1.0})


@pytest.mark.parametrize("bad,needle", [
    ([True, False, False], "fixed must be a \\[T\\] bool tensor .* or None, got list"),
    (torch.ones(3), "fixed must be a bool tensor \\[T\\], got torch.float32; pass fixed.bool\\(\\)"),
    (torch.ones(2, dtype=torch.bool), "fixed must have shape \\[T\\]=\\[3\\]"),
    (torch.ones(3, 1, dtype=torch.bool), "fixed must have shape \\[T\\]=\\[3\\]"),
    (torch.ones(3, dtype=torch.bool, device="meta"), "fixed is on meta but router_logits on cpu"),
])
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_bad_fixed_masks_are_refused(name, bad, needle):
    params = {"cap": {"k": 1}, "oea": {"k0": 1}, "sere": {"similarity": torch.eye(8)}, "budget": {"budget": 2},
              "gain": {"budget": 2}}
    with pytest.raises(ValueError, match=needle):
        make_policy(name, **params.get(name, {}))(X, SPEC, fixed=bad)
