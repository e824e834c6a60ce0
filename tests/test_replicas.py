"""Redundant experts (EPLB): `moe_reroute.replicas` against vLLM's replica choice written out as a loop,
hand-computed cases, and oea / budget over a replicated placement against their plain-loop references."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import distinct_logits, random_mask
from moe_reroute import RouterSpec, make_policy
from moe_reroute.replicas import Replicas, eplb_replicas, logical_maps, physical_to_logical, replica_hash
from test_ep_policies import draw_oea
from test_policies_vs_reference import batches, check_against, tol, valid_list


def test_hash_by_hand():
    # t * 2654435769 mod 2^32: 0, 2654435769, 5308871538 - 2^32 = 1013904242, 7963307307 - 2^32 = 3668340011
    assert replica_hash(4).tolist() == [0, 2654435769, 1013904242, 3668340011]


def test_maps_by_hand():
    r = Replicas.from_physical([0, 1, 2, 3, 0, 3], 2)
    assert r.logical_to_physical.tolist() == [[0, 4], [1, -1], [2, -1], [3, 5]]
    assert r.replica_count.tolist() == [2, 1, 1, 2]
    assert r.slot_ranks().tolist() == [0, 0, 0, 1, 1, 1]
    # rows 0 and 2 hash even (first replica), rows 1 and 3 odd (second) for the doubled experts 0 and 3
    ids = torch.tensor([[0, 3], [3, 1], [0, 2], [0, 3]])
    assert r.to_physical(ids).tolist() == [[0, 3], [5, 1], [0, 2], [4, 5]]
    assert physical_to_logical(r).tolist() == [0, 1, 2, 3, 0, 3]
    assert r.to_json() == {"ranks": 2, "physical_to_logical": [0, 1, 2, 3, 0, 3]}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(0, 12), st.integers(1, 40), st.integers(0, 10**6))
def test_slots_against_the_loop(E, extra, T, seed):
    g = torch.Generator().manual_seed(seed)
    p2l = torch.cat([torch.randperm(E, generator=g), torch.randint(0, E, (extra,), generator=g)])
    p2l = p2l[torch.randperm(E + extra, generator=g)]
    D = next(d for d in (4, 3, 2, 1) if (E + extra) % d == 0)
    r = Replicas.from_physical(p2l, D)
    slot = ref.replica_slots(p2l.tolist())
    got = r.token_slots(T, None, torch.device("cpu"))
    assert got.tolist() == [[slot(t, e) for e in range(E)] for t in range(T)]
    assert physical_to_logical(r).tolist() == p2l.tolist()
    l2p, count = logical_maps(p2l, E)
    assert torch.equal(l2p, r.logical_to_physical) and torch.equal(count, r.replica_count)


def test_per_layer_and_steps():
    r = Replicas.from_physical([[0, 1, 2, 3], [3, 2, 1, 0]], 2)
    ids = torch.tensor([[[0, 1]], [[0, 1]]])  # [S=2, T=1, K=2]
    assert r.to_physical(ids, layer=0).tolist() == [[[0, 1]], [[0, 1]]]
    assert r.to_physical(ids, layer=1).tolist() == [[[3, 2]], [[3, 2]]]
    with pytest.raises(ValueError, match="per MoE layer"):
        r.at(None, torch.device("cpu"))
    with pytest.raises(ValueError, match="out of range"):
        r.at(2, torch.device("cpu"))


def test_eplb_by_hand():
    # loads [10, 1, 1, 5], 2 extra slots: expert 0 (10) gets a replica (5 each), then 0 again (5 > 5? no: the
    # first highest load per replica is expert 0 at 5, id order) -> counts [3, 1, 1, 1], per-slot loads
    # [3.33, 1, 1, 5, 3.33, 3.33]; packed 3 slots a rank, heaviest first onto the lighter rank
    r = eplb_replicas(torch.tensor([10.0, 1, 1, 5]), 2, 2)
    assert r.replica_count.tolist() == [3, 1, 1, 1]
    p2l = physical_to_logical(r).tolist()
    rank0, rank1 = sorted(p2l[:3]), sorted(p2l[3:])
    # rank loads: {5 + 3.33 + 1} and {3.33 + 3.33 + 1}, in some order
    assert sorted([rank0, rank1]) == sorted([[0, 2, 3], [0, 0, 1]]) or sorted([rank0, rank1]) == sorted(
        [[0, 1, 3], [0, 0, 2]])
    with pytest.raises(ValueError, match="split evenly"):
        eplb_replicas(torch.ones(4), 4, 1)


@pytest.mark.parametrize("bad, match", [
    ({"ranks": 2, "physical_to_logical": [0, 1, 2]}, "split evenly"),
    ({"ranks": 2, "physical_to_logical": [0, 1, 5, 1]}, "expert 2 has no replica .* up to 5"),
    ({"ranks": 2, "physical_to_logical": [0, -1, 2, 1]}, "logical expert -1"),
    ({"ranks": 2, "physical_to_logical": [0, 0, 2, 2]}, "expert 1 has no replica"),
    ({"ranks": 2, "physical_to_logical": [0, 0, 0, 1]}, "places 2 logical experts but the model has E=4"),
    ({"ranks": 0, "physical_to_logical": [0, 1]}, "ranks"),
    ({"physical_to_logical": [0, 1]}, "exactly the keys"),
    ({"ranks": 2, "physical_to_logical": [[0, 1], [0]]}, "differ in length"),
    ({"ranks": 2, "physical_to_logical": "0,1"}, "non-empty list"),
])
def test_bad_replicas(bad, match):
    spec = RouterSpec(4, 2)
    with pytest.raises(ValueError, match=match):
        make_policy("oea", k0=1, ep=bad.get("ranks", 2) or 1, placement=bad)(torch.randn(3, 4), spec)


def test_ranks_and_experts_must_fit(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"ranks": 2, "physical_to_logical": [0, 1, 2, 3, 0, 1]}))
    with pytest.raises(ValueError, match="give ep=2"):
        make_policy("budget", budget=2, ep=3, placement=str(f))
    with pytest.raises(ValueError, match="E=8"):
        make_policy("budget", budget=2, ep=2, placement=str(f))(torch.randn(3, 8), RouterSpec(8, 2))


def draw_replicas(data, E):
    """(physical_to_logical list, D): every expert once, plus up to E random extra replicas, shuffled."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    extra = data.draw(st.integers(0, E))
    p2l = torch.cat([torch.arange(E), torch.randint(0, E, (extra,), generator=g)])
    p2l = p2l[torch.randperm(len(p2l), generator=g)]
    divisors = [d for d in range(1, len(p2l) + 1) if len(p2l) % d == 0]
    return p2l.tolist(), data.draw(st.sampled_from(divisors))


@settings(max_examples=120, deadline=None)
@given(batches(), st.data())
def test_oea_replicas(batch, data):
    spec, logits, valid = batch
    K, E = spec.top_k, spec.num_experts
    params = draw_oea(data, K, E)
    p2l, D = draw_replicas(data, E)
    cap = data.draw(st.one_of(st.none(), st.integers(1, len(p2l) // D + 1)))
    placement = {"ranks": D, "physical_to_logical": p2l}
    r = make_policy("oea", **params, ep=D, placement=placement, rank_cap=cap)(logits, spec, valid)
    expected = ref.ref_oea_ep(logits, spec, valid_list(valid, logits.shape[0]), ranks=D, rank_cap=cap,
                              physical_to_logical=p2l, **params)
    check_against(r, expected, spec, valid, tol(spec, logits))


@settings(max_examples=120, deadline=None)
@given(batches(), st.data())
def test_budget_replicas(batch, data):
    spec, logits, valid = batch
    p2l, D = draw_replicas(data, spec.num_experts)
    budget = data.draw(st.integers(1, len(p2l)))
    cap = data.draw(st.one_of(st.none(), st.integers(1, len(p2l) // D + 1)))
    placement = {"ranks": D, "physical_to_logical": p2l}
    r = make_policy("budget", budget=budget, ep=D, placement=placement, rank_cap=cap)(logits, spec, valid)
    expected = ref.ref_budget_ep(logits, spec, valid_list(valid, logits.shape[0]), budget, ranks=D, rank_cap=cap,
                                 physical_to_logical=p2l)
    check_against(r, expected, spec, valid, tol(spec, logits))


@pytest.mark.parametrize("seed", range(4))
def test_fixed_rows_and_steps(seed):
    E, K, T, D = 32, 4, 12, 4
    spec = RouterSpec(E, K)
    p2l = list(range(E)) + [0, 5, 9, 17, 17, 30, 2, 11]
    placement = {"ranks": D, "physical_to_logical": p2l}
    x = distinct_logits(T, E, seed=seed)
    valid = random_mask(T, seed)
    fixed = random_mask(T, seed + 50, p_invalid=0.7)
    vl, fl = valid.tolist(), fixed.tolist()
    oea = make_policy("oea", k0=2, ep=D, placement=placement)
    check_against(oea(x, spec, valid, fixed=fixed), ref.ref_oea_ep(x, spec, vl, 2, D, fixed=fl, physical_to_logical=p2l),
                  spec, valid)
    budget = make_policy("budget", budget=10, ep=D, placement=placement)
    check_against(budget(x, spec, valid, fixed=fixed),
                  ref.ref_budget_ep(x, spec, vl, 10, D, fixed=fl, physical_to_logical=p2l), spec, valid)
    xs = torch.stack([distinct_logits(T, E, seed=seed + s) for s in range(3)])
    vs = torch.stack([random_mask(T, seed + s) for s in range(3)])
    for pol in (oea, budget):
        r = pol(xs, spec, vs)
        for s in range(3):
            one = pol(xs[s], spec, vs[s])
            assert torch.equal(r.ids[s], one.ids) and torch.allclose(r.weights[s], one.weights)


@pytest.mark.parametrize("seed", range(4))
def test_no_redundancy_is_the_plain_placement(seed):
    """P = E (each expert one slot): the same routing as the [E] placement those slots give."""
    E, K, T, D = 16, 4, 10, 4
    spec = RouterSpec(E, K)
    g = torch.Generator().manual_seed(seed)
    p2l = torch.randperm(E, generator=g)
    ranks = torch.empty(E, dtype=torch.long)
    ranks[p2l] = torch.arange(E) // (E // D)
    x = distinct_logits(T, E, seed=seed)
    for name, params in (("oea", {"k0": 2}), ("budget", {"budget": 6})):
        a = make_policy(name, ep=D, placement={"ranks": D, "physical_to_logical": p2l.tolist()}, **params)(x, spec)
        b = make_policy(name, ep=D, placement=ranks, **params)(x, spec)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)


def test_cap_bounds_the_busiest_rank_in_slots():
    E, K, T, D = 64, 8, 32, 8
    spec = RouterSpec(E, K)
    p2l = list(range(E)) + list(range(0, 64, 4))  # 80 slots, 10 a rank
    r = Replicas.from_physical(p2l, D)
    x = distinct_logits(T, E, seed=3)
    routed = make_policy("budget", budget=24, ep=D, placement={"ranks": D, "physical_to_logical": p2l})(x, spec)
    slots = r.to_physical(routed.ids)
    used = torch.zeros(80, dtype=torch.bool)
    used[slots[routed.weights > 0].unique()] = True
    per_rank = used.view(D, 10).sum(dim=-1)
    top1 = r.to_physical(torch.topk(x, 1).indices)[:, 0]
    forced = torch.zeros(80, dtype=torch.bool)
    forced[top1] = True
    assert (per_rank <= torch.maximum(forced.view(D, 10).sum(dim=-1), torch.full((D,), 3))).all()
    assert int(used.sum()) <= max(24, int(forced.sum()))
