"""distinct_ids: a routing with K distinct experts per row, against a plain-loop reference."""

from __future__ import annotations

import pytest
import torch

from moe_reroute import RouterSpec
from moe_reroute.policies.spec import policy_from_spec
from moe_reroute.contract import Routing
from moe_reroute.metrics import unique_experts
from moe_reroute.serving.distinct import distinct_ids, has_repeats


def reference(ids: list[list[int]], weights: list[list[float]], valid: list[bool], E: int):
    """One batch, slot by slot: a repeated expert moves its weight onto the first slot naming it and takes
    the lowest expert the batch loaded that its row does not use yet, else the lowest unused expert."""
    loaded = sorted({e for row, ok in zip(ids, valid) if ok for e in row})
    out_ids, out_w = [], []
    for row, wrow in zip(ids, weights):
        used = set(row)
        new_ids, new_w = [], []
        for e, w in zip(row, wrow):
            if e in new_ids:
                new_w[new_ids.index(e)] += w
                pick = next((x for x in loaded if x not in used), None)
                if pick is None:
                    pick = next(x for x in range(E) if x not in used)
                used.add(pick)
                new_ids.append(pick)
                new_w.append(0.0)
            else:
                new_ids.append(e)
                new_w.append(w)
        out_ids.append(new_ids)
        out_w.append(new_w)
    return out_ids, out_w


def moe_out(x: torch.Tensor, routing: Routing, experts: torch.Tensor) -> torch.Tensor:
    """Plain loop: each token's output is the weighted sum of its slots' experts (x @ W_e)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(routing.ids.shape[-1]):
            out[t] += routing.weights[t, k] * (x[t] @ experts[routing.ids[t, k]])
    return out


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_plain_loop(seed):
    g = torch.Generator().manual_seed(seed)
    E = int(torch.randint(2, 10, (), generator=g))
    K = int(torch.randint(1, E + 1, (), generator=g))
    T = int(torch.randint(1, 7, (), generator=g))
    pool = int(torch.randint(1, E + 1, (), generator=g))  # ids drawn from few experts: many repeats
    ids = torch.randint(0, pool, (T, K), generator=g)
    weights = torch.rand(T, K, generator=g)
    valid = torch.rand(T, generator=g) > 0.3
    got = distinct_ids(Routing(weights, ids, valid), E)
    ref_ids, ref_w = reference(ids.tolist(), weights.tolist(), valid.tolist(), E)
    assert got.ids.tolist() == ref_ids
    torch.testing.assert_close(got.weights, torch.tensor(ref_w))
    assert not has_repeats(got.ids).any()
    # the layer's output is unchanged
    x = torch.randn(T, 3, generator=g)
    experts = torch.randn(E, 3, 3, generator=g)
    torch.testing.assert_close(moe_out(x, got, experts), moe_out(x, Routing(weights, ids, valid), experts))


def test_steps_are_separate_batches():
    ids = torch.tensor([[[0, 0], [1, 1]], [[2, 2], [3, 3]]])  # [S=2, T=2, K=2]
    w = torch.ones(2, 2, 2)
    got = distinct_ids(Routing(w, ids), 4)
    for s in range(2):
        ref_ids, ref_w = reference(ids[s].tolist(), w[s].tolist(), [True, True], 4)
        assert got.ids[s].tolist() == ref_ids and got.weights[s].tolist() == ref_w
    assert got.ids.tolist() == [[[0, 1], [1, 0]], [[2, 3], [3, 2]]]


@pytest.mark.parametrize("policy", ["oea:k0=1", "cap:k=2", "budget:budget=6", "oea:k0=2"])
def test_policies_keep_their_U(policy):
    spec = RouterSpec(16, 4)
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    routing = policy_from_spec(policy)(logits, spec)
    got = distinct_ids(routing, 16)
    assert not has_repeats(got.ids).any()
    assert int(unique_experts(got, 16)) == int(unique_experts(routing, 16))
    x = torch.randn(8, 3)
    experts = torch.randn(16, 3, 3)
    torch.testing.assert_close(moe_out(x, got, experts), moe_out(x, routing, experts))


def test_distinct_rows_are_returned_as_they_are():
    """Unchanged, bit for bit, and without a host synchronisation (no test of the data decides the path)."""
    from conftest import HostSyncLog

    r = Routing(torch.rand(3, 2), torch.tensor([[0, 1], [2, 3], [1, 0]]), torch.tensor([True, True, False]))
    with HostSyncLog() as log:
        got = distinct_ids(r, 4)
        distinct_ids(Routing(torch.rand(2, 3), torch.tensor([[0, 0, 1], [2, 2, 2]])), 4)  # with repeats
    assert log.found == []
    assert torch.equal(got.ids, r.ids) and got.ids.dtype == r.ids.dtype and torch.equal(got.weights, r.weights)
    assert distinct_ids(Routing(torch.rand(3, 1), torch.tensor([[0], [0], [2]])), 4).ids.tolist() == [[0], [0], [2]]


def test_too_few_loaded_experts_take_the_lowest_others():
    r = Routing(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[5, 5, 5]]))
    got = distinct_ids(r, 8)
    assert got.ids.tolist() == [[5, 0, 1]] and got.weights.tolist() == [[1.0, 0.0, 0.0]]
