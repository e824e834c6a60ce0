"""Every policy traces as one graph under torch.compile(fullgraph=True): no host synchronisation, no
data-dependent shapes, so it can run inside CUDA graphs. The compiled result equals eager."""

from __future__ import annotations

import pytest
import torch

from conftest import distinct_logits, random_mask
from moe_reroute import RouterSpec, make_policy

E = 64
SPECS = {
    "softmax": RouterSpec(E, 8),
    "sigmoid": RouterSpec(E, 8, "sigmoid", True, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                          e_score_correction_bias=torch.linspace(-0.1, 0.1, E)),
    "topk_softmax": RouterSpec(E, 4, "topk_softmax"),
}
POLICIES = [
    ("native", {}),
    ("cap", {"k": 3}),
    ("oea", {"k0": 2}),
    ("oea", {"k0": 3, "p": 0.8, "k_max": 4, "max_rank": 32}),
    ("oea", {"k0": [1, 2, 3]}),
    ("sere", {"similarity": torch.rand(E, E)}),
    ("budget", {"budget": 20}),
    ("gain", {"budget": 6, "base": 2}),
]
INDUCTOR = [POLICIES[3], POLICIES[5], POLICIES[6]]  # oea with every option, sere, budget


@pytest.mark.long
@pytest.mark.parametrize("scoring", list(SPECS))
@pytest.mark.parametrize("name,params", POLICIES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x)))
def test_fullgraph(scoring, name, params):
    torch._dynamo.reset()
    spec = SPECS[scoring]
    policy = make_policy(name, **params)
    layer = 2 if isinstance(params.get("k0"), list) else None
    # inductor (codegen, what vLLM's compiled mode runs) for the policies with the most ops, with softmax
    # scoring; the others take the eager backend: the same tracing, no codegen (a cold inductor compile costs
    # 10-50 s of CI per case, and gain's loop of `budget` steps takes inductor minutes)
    backend = "inductor" if scoring == "softmax" and any(params is q for _, q in INDUCTOR) else "eager"

    def run(x, v):
        return policy(x, spec, v, layer=layer)

    compiled = torch.compile(run, fullgraph=True, backend=backend)
    for T, seed in ((16, 0), (5, 1)):
        x, v = distinct_logits(T, E, seed=seed), random_mask(T, seed)
        got, want = compiled(x, v), run(x, v)
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.weights, want.weights)


@pytest.mark.parametrize("name,params", POLICIES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x)))
def test_fullgraph_with_fixed_rows(name, params):
    """A `fixed` mask traces in the same single graph (eager backend: the tracing, no codegen)."""
    torch._dynamo.reset()
    spec = SPECS["sigmoid"]
    policy = make_policy(name, **params)
    layer = 2 if isinstance(params.get("k0"), list) else None

    def run(x, v, f):
        return policy(x, spec, v, layer=layer, fixed=f)

    compiled = torch.compile(run, fullgraph=True, backend="eager")
    for T, seed in ((16, 0), (5, 1)):
        x, v, f = distinct_logits(T, E, seed=seed), random_mask(T, seed), random_mask(T, seed + 7, p_invalid=0.6)
        got, want = compiled(x, v, f), run(x, v, f)
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.weights, want.weights)


def traces_as_eager(run):
    """`run(x, valid, fixed)` compiled as one graph (eager backend) returns what it returns uncompiled, with
    and without fixed rows, at two batch sizes."""
    compiled = torch.compile(run, fullgraph=True, backend="eager")
    for T, seed in ((16, 0), (5, 1)):
        x, v = distinct_logits(T, E, seed=seed), random_mask(T, seed)
        for f in (None, random_mask(T, seed + 7, p_invalid=0.6)):
            got, want = compiled(x, v, f), run(x, v, f)
            assert torch.equal(got.ids, want.ids)
            torch.testing.assert_close(got.weights, want.weights)


PEERS = [("xshare", {"budget": 20}), ("xshare", {"budget": 12, "k0": 1, "group_budget": 4, "group_size": 2}),
         ("lynx", {"alpha": 3, "beta": 2}), ("lynx", {"alpha": 1})]


@pytest.mark.parametrize("scoring", ["softmax", "topk_softmax"])  # the peers' rules are defined on these
@pytest.mark.parametrize("name,params", PEERS, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x)))
def test_fullgraph_peers(scoring, name, params):
    """xshare and lynx, with and without fixed rows, trace as one graph too (eager backend)."""
    torch._dynamo.reset()
    spec = SPECS[scoring]
    policy = make_policy(name, **params)

    def run(x, v, f):
        return policy(x, spec, v, fixed=f)

    traces_as_eager(run)


# placements: contiguous, one list per MoE layer (two layers), and redundant experts (E + 8 slots on 4 ranks)
_P2L = list(range(E)) + [0, 1, 2, 3, 4, 5, 6, 7]
EP = [("oea", {"k0": 2, "ep": 4}), ("oea", {"k0": [1, 2, 3], "ep": 2, "rank_cap": 6}),
      ("budget", {"budget": 12, "ep": 2, "placement": [[r % 2 for r in range(E)], [r // (E // 2) for r in range(E)]]}),
      ("budget", {"budget": 12, "ep": 4, "placement": {"ranks": 4, "physical_to_logical": _P2L}}),
      ("oea", {"k0": 2, "ep": 4, "placement": {"ranks": 4, "physical_to_logical": _P2L}})]


@pytest.mark.parametrize("name,params", EP, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x))[:40])
def test_fullgraph_ep(name, params):
    """oea and budget under expert parallelism (contiguous, per-layer and redundant-expert placements; the
    per-device placement cache) trace as one graph too (eager backend): torch 2.11's dynamo reads neither
    `__dict__` nor `copy.copy`."""
    torch._dynamo.reset()
    spec = SPECS["softmax"]
    policy = make_policy(name, **params)

    def run(x, v, f):
        return policy(x, spec, v, layer=1, fixed=f)

    traces_as_eager(run)
