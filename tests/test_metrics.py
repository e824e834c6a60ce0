"""Metrics against hand-computed cases and plain loops."""

from __future__ import annotations

import pytest
import torch

from conftest import distinct_logits, random_mask
from moe_reroute import RouterSpec, Routing, make_policy, metrics


def test_hand_computed():
    r = Routing(
        weights=torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.5, 0.5]]),
        ids=torch.tensor([[0, 1], [2, 2], [5, 7]]),
        valid=torch.tensor([True, True, False]),
    )
    assert int(metrics.unique_experts(r, 8)) == 3  # {0, 1, 2}; the padding row's 5, 7 do not count
    assert metrics.experts_per_token(r).tolist() == [2, 1, 2]
    assert metrics.unique_experts_per_rank(r, 8, 2).tolist() == [3, 0]
    assert metrics.unique_experts_per_rank(r, 8, 4).tolist() == [2, 1, 0, 0]
    placement = torch.tensor([3, 2, 1, 0, 0, 0, 0, 0])
    assert metrics.unique_experts_per_rank(r, 8, 4, placement).tolist() == [0, 1, 1, 1]
    assert int(metrics.max_unique_per_rank(r, 8, 4)) == 2


def test_retained_mass_and_overlap_hand_computed():
    spec = RouterSpec(4, 2)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(logits, -1)[0].tolist()
    cap = make_policy("cap", k=1)(logits, spec)
    native = make_policy("native")(logits, spec)
    assert float(metrics.retained_mass(cap, logits, spec)[0]) == pytest.approx(p[0] / (p[0] + p[1]))
    assert float(metrics.retained_mass(native, logits, spec)[0]) == pytest.approx(1.0)
    assert float(metrics.overlap_with_native(cap, native, 4)[0]) == pytest.approx(0.5)
    s = metrics.summarize(cap, logits, spec, native)
    assert s["unique_experts"] == 1 and s["native_unique_experts"] == 2 and s["experts_per_token"] == 1


@pytest.mark.parametrize("seed", range(10))
def test_against_loops(seed):
    E, K, T, D = 64, 8, 24, 4
    spec = RouterSpec(E, K)
    x = distinct_logits(T, E, seed=seed)
    valid = random_mask(T, seed)
    r = make_policy("oea", k0=2)(x, spec, valid)
    n = make_policy("native")(x, spec, valid)
    used = set()
    for t in range(T):
        if valid[t]:
            used.update(r.ids[t].tolist())
    assert int(metrics.unique_experts(r, E)) == len(used)
    per_rank = [len({e for e in used if e * D // E == d}) for d in range(D)]
    assert metrics.unique_experts_per_rank(r, E, D).tolist() == per_rank
    assert int(metrics.max_unique_per_rank(r, E, D)) == max(per_rank)
    probs = torch.softmax(x.double(), -1)
    for t in range(T):
        mine, theirs = set(r.ids[t].tolist()), set(n.ids[t].tolist())
        assert int(metrics.experts_per_token(r)[t]) == len(mine)
        assert float(metrics.overlap_with_native(r, n, E)[t]) == pytest.approx(len(mine & theirs) / len(theirs))
        want = sum(probs[t, e] for e in mine) / sum(probs[t, e] for e in theirs)
        assert float(metrics.retained_mass(r, x, spec)[t]) == pytest.approx(float(want), rel=1e-5)


def test_bad_rank_count():
    r = Routing(weights=torch.ones(1, 1), ids=torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="D=9 ranks needs 1 <= D <= E=8"):
        metrics.unique_experts_per_rank(r, 8, 9)
