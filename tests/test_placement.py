"""Expert placement and per-rank metrics against plain loops (tests/reference.py) and hand-computed cases."""

from __future__ import annotations

import json

import pytest
import torch

import reference as ref
from conftest import distinct_logits, random_mask
from moe_reroute import RouterSpec, Routing, make_policy, metrics, placement


def test_contiguous_hand_computed():
    assert placement.contiguous(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert placement.contiguous(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # D not dividing E: blocks of floor(E/D) or ceil(E/D) experts
    assert placement.contiguous(5, 2).tolist() == [0, 0, 0, 1, 1]
    assert placement.rank_sizes(5, 2) == [3, 2]
    assert placement.rank_sizes(10, 4) == [3, 2, 3, 2]
    for E in range(1, 40):
        for D in range(1, E + 1):
            p = placement.contiguous(E, D)
            assert torch.bincount(p, minlength=D).tolist() == placement.rank_sizes(E, D)
            if E % D == 0:
                assert p.tolist() == [e // (E // D) for e in range(E)]


def test_balanced_hand_computed():
    # loads 8 7 6 5 4 3 2 1 over 2 ranks of 4: 8->0, 7->1, 6->1 (7 < 8), 5->0 (8 < 13), 4->0 (13 = 13: lower
    # rank), 3->1 (13 < 17), 2->1 (16 < 17), 1->0 (rank 1 full)
    load = torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1])
    got = placement.balanced(load, 2)
    assert got.tolist() == ref.ref_balanced_placement(load.tolist(), 2)
    assert got.tolist() == [0, 1, 1, 0, 0, 1, 1, 0]
    assert torch.bincount(got, minlength=2).tolist() == [4, 4]
    # one hot expert takes rank 0; the idle ones fill rank 1 first (load 0 < 100), the last goes to rank 0
    assert placement.balanced(torch.tensor([0.0, 0, 0, 100]), 2).tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("seed", range(20))
def test_balanced_against_loop(seed):
    g = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 96, (1,), generator=g))
    D = int(torch.randint(1, E + 1, (1,), generator=g))
    if seed % 2:  # many equal loads: the ties rule decides
        load = torch.randint(0, 5, (E,), generator=g).double()
    else:
        load = torch.rand(E, generator=g, dtype=torch.float64)
    got = placement.balanced(load, D)
    assert got.tolist() == ref.ref_balanced_placement(load.tolist(), D)
    assert torch.bincount(got, minlength=D).tolist() == placement.rank_sizes(E, D)
    layered = placement.balanced(torch.stack([load, load.flip(0)]), D)
    assert layered[0].tolist() == got.tolist()
    assert layered[1].tolist() == ref.ref_balanced_placement(load.flip(0).tolist(), D)


def test_balanced_spreads_load():
    g = torch.Generator().manual_seed(0)
    load = torch.rand(128, generator=g, dtype=torch.float64) ** 4
    per_rank = lambda p: torch.zeros(8, dtype=torch.float64).scatter_add_(0, p, load)  # noqa: E731
    assert per_rank(placement.balanced(load, 8)).max() < per_rank(placement.contiguous(128, 8)).max()


@pytest.mark.parametrize("bad, match", [
    (0, "D >= 1"), (-3, "D >= 1"), (9, "D=9 ranks needs 1 <= D <= E=8"), (2.0, "whole number"), (True, "whole number"),
])
def test_bad_ranks(bad, match):
    with pytest.raises(ValueError, match=match):
        placement.contiguous(8, bad)
    with pytest.raises(ValueError, match=match):
        placement.balanced(torch.ones(8), bad)


@pytest.mark.parametrize("obj, match", [
    ([0, 1, 0], "places 3 experts but the model has E=4; give a rank for every expert"),
    ([0, 1, 2, 1], "expert 2 is on rank 2, but D=2 ranks are numbered 0..1"),
    ([0, -1, 0, 1], "expert 1 is on rank -1"),
    ([[0, 0, 1, 1], [0, 1, 1, 5]], "expert 3 of MoE layer 1 is on rank 5"),
    ([[0, 0, 1, 1], [0, 1]], "every MoE layer places all E experts"),
    ([0, 1.5, 0, 1], "a non-empty JSON list of integer ranks"),
    ([], "a non-empty JSON list"),
    ({"0": 1}, "a non-empty JSON list"),
    ([[[0]]], "a non-empty JSON list"),
    ([True, False, True, False], "a non-empty JSON list"),
])
def test_bad_placement(obj, match):
    with pytest.raises(ValueError, match=match):
        placement.check_placement(obj, 4, 2)


def test_placement_file(tmp_path):
    f = tmp_path / "p.json"
    placement.save_placement(torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]]), f)
    assert placement.load_placement(f, 4, 2).tolist() == [[1, 0, 1, 0], [0, 0, 1, 1]]
    assert placement.at_layer(placement.load_placement(f, 4, 2), 1).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="2 per-layer placements but the model has 3 MoE layers"):
        placement.load_placement(f, 4, 2, layers=3)
    with pytest.raises(ValueError, match="is on rank 1, but D=1"):
        placement.load_placement(f, 4, 1)
    f.write_text("[0, 1,")
    with pytest.raises(ValueError, match="not valid JSON"):
        placement.load_placement(f, 4, 2)
    with pytest.raises(FileNotFoundError):
        placement.load_placement(tmp_path / "missing.json", 4, 2)
    f.write_text(json.dumps([0, 0, 1, 1]))
    assert placement.make_placement(str(f), 4, 2).tolist() == [0, 0, 1, 1]
    assert placement.make_placement("contiguous", 4, 2).tolist() == [0, 0, 1, 1]
    assert placement.make_placement("eplb", 4, 2, load=torch.tensor([1.0, 2, 3, 4])).tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="computed from each expert's load"):
        placement.make_placement("eplb", 4, 2)


def test_rank_metrics_hand_computed():
    r = Routing(weights=torch.ones(3, 2), ids=torch.tensor([[0, 1], [2, 7], [3, 4]]),
                valid=torch.tensor([True, True, False]))
    p = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # used {0, 1, 2, 7}: ranks 0 0 1 3
    assert metrics.unique_experts_per_rank(r, 8, 4, p).tolist() == [2, 1, 0, 1]
    assert int(metrics.max_unique_per_rank(r, 8, 4, p)) == 2
    assert float(metrics.mean_unique_per_rank(r, 8, 4, p)) == 1.0
    q = torch.tensor([1, 2, 3, 0, 0, 0, 0, 1])
    assert metrics.unique_experts_per_rank(r, 8, 4, q).tolist() == [0, 2, 1, 1]
    assert ref.ref_rank_unique(r.ids.tolist(), r.valid.tolist(), q.tolist(), 4) == ([0, 2, 1, 1], 2, 1.0)


@pytest.mark.parametrize("seed", range(12))
def test_rank_metrics_against_loop(seed):
    g = torch.Generator().manual_seed(seed)
    E, K = [(8, 2), (32, 4), (64, 8), (128, 8), (60, 6)][seed % 5]
    D = int(torch.randint(1, E + 1, (1,), generator=g))
    S, T = 3, int(torch.randint(1, 20, (1,), generator=g))
    spec = RouterSpec(E, K)
    x = torch.stack([distinct_logits(T, E, seed=seed * 10 + s) for s in range(S)])  # [S, T, E]
    valid = torch.stack([random_mask(T, seed * 10 + s) for s in range(S)])
    r = make_policy("oea", k0=2)(x, spec, valid)
    p = [placement.contiguous(E, D), placement.balanced(torch.rand(E, generator=g), D),
         torch.randint(0, D, (E,), generator=g)][seed % 3]
    per = metrics.unique_experts_per_rank(r, E, D, p)  # [S, D]
    mx, mean = metrics.max_unique_per_rank(r, E, D, p), metrics.mean_unique_per_rank(r, E, D, p)
    for s in range(S):
        counts, m, avg = ref.ref_rank_unique(r.ids[s].tolist(), r.valid[s].tolist(), p.tolist(), D)
        assert per[s].tolist() == counts
        assert int(mx[s]) == m
        assert float(mean[s]) == pytest.approx(avg)
    assert torch.equal(metrics.rank_unique(metrics.used_experts(r, E), p, D), per)
