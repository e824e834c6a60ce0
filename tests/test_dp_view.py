"""Data-parallel ranks' tokens routed as one batch (`serving.dp`, the vLLM plugin's `dp_view="gather"`).

Two processes all-gather over torch.distributed (gloo), each holding its own rows (8 and 5, padding and
fixed rows among them): each rank's rows of the gathered routing must be the plain-loop reference's
routing of the whole batch (tests/reference.py), and differ from routing the rank's rows alone. The
vLLM binding of the same path (vLLM's DP group, its step kinds) is tested in tests/test_vllm.py; vLLM's
CPU build cannot run data parallelism, so no engine test covers it (docs/parallel.md).
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

import reference as ref
from test_policies_vs_reference import check_against

from moe_reroute import RouterSpec, make_policy
from moe_reroute.contract import Routing
from moe_reroute.serving import config as plugin_config
from moe_reroute.serving.dp import gather_rows, route_across_ranks

SPEC = RouterSpec(16, 4, "softmax", True)
SIZES = [8, 5]
POLICIES = {  # spec -> (name, params, reference)
    "budget:budget=8": ("budget", {"budget": 8}, lambda x, v, f: ref.ref_budget(x, SPEC, v, 8, fixed=f)),
    "oea:k0=1": ("oea", {"k0": 1}, lambda x, v, f: ref.ref_oea(x, SPEC, v, 1, fixed=f)),
    "gain:budget=8": ("gain", {"budget": 8}, lambda x, v, f: ref.ref_gain(x, SPEC, v, 8, fixed=f)),
    "xshare:budget=8": ("xshare", {"budget": 8}, lambda x, v, f: ref.ref_xshare(x, SPEC, v, budget=8, fixed=f)),
}


def whole_batch(seed: int = 3):
    """The union of both ranks' rows: logits [13, 16], valid (one padding row per rank), a fixed row."""
    g = torch.Generator().manual_seed(seed)
    N = sum(SIZES)
    logits = torch.randn(N, SPEC.num_experts, generator=g) * 2
    valid = torch.ones(N, dtype=torch.bool)
    valid[[7, 12]] = False
    fixed = torch.zeros(N, dtype=torch.bool)
    fixed[9] = True
    return logits, valid, fixed


def rows_of(rank: int) -> slice:
    lo = sum(SIZES[:rank])
    return slice(lo, lo + SIZES[rank])


def _rank_main(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from moe_reroute.serving.dp import gather_sizes, torch_gather

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(SIZES))
    try:
        logits, valid, fixed = whole_batch()
        mine = rows_of(rank)
        sizes = gather_sizes(SIZES[rank], "cpu", torch_gather())
        results = {"sizes": sizes}
        for text, (name, params, _) in POLICIES.items():
            policy = make_policy(name, **params)
            native = make_policy("native")(logits[mine], SPEC)  # an engine's own top-K for the rank's rows
            for with_native in (False, True):
                own, whole, x, v, f = route_across_ranks(
                    policy, logits[mine], SPEC, rank, sizes, torch_gather(), valid[mine], fixed[mine],
                    (native.weights, native.ids) if with_native else None)
                results[text, with_native] = (own.weights, own.ids, whole.ids, x, v, f)
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    """Each rank's results, from two processes gathering over gloo."""
    tmp = tmp_path_factory.mktemp("dp")
    ctx = mp.get_context("spawn")
    outs = [str(tmp / f"rank{r}.pt") for r in range(len(SIZES))]
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp / "store"), outs[r])) for r in range(len(SIZES))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0, f"DP rank {r} failed (exit {p.exitcode})"
    return [torch.load(o) for o in outs]


@pytest.mark.parametrize("text", list(POLICIES))
def test_each_rank_routes_the_whole_batch(gathered, text):
    name, params, reference = POLICIES[text]
    logits, valid, fixed = whole_batch()
    expected = reference(logits, valid, fixed)
    for rank, results in enumerate(gathered):
        assert results["sizes"] == SIZES
        for with_native in (False, True):
            w, ids, whole_ids, x, v, f = results[text, with_native]
            # what every rank routed is the union of the ranks' rows, in rank order
            assert torch.equal(x, logits) and torch.equal(v, valid) and torch.equal(f, fixed)
            mine = rows_of(rank)
            own = Routing(w, ids, valid[mine])
            check_against(own, expected[mine], SPEC, valid[mine])
            assert torch.equal(whole_ids, gathered[0][text, with_native][2])  # the same routing on every rank


def test_the_gather_changes_what_a_batch_policy_loads(gathered):
    """The same rows routed by each rank alone load more experts in all (the test above could fail)."""
    logits, valid, fixed = whole_batch()
    policy = make_policy("budget", budget=8)
    alone = [policy(logits[rows_of(r)], SPEC, valid[rows_of(r)], fixed=fixed[rows_of(r)]) for r in range(2)]
    used_alone = set()
    for r, routing in enumerate(alone):
        used_alone |= set(routing.ids[valid[rows_of(r)]].flatten().tolist())
    whole_ids = gathered[0]["budget:budget=8", False][2]
    used_whole = set(whole_ids[valid].flatten().tolist())
    assert len(used_whole) < len(used_alone)


def test_gather_rows_pads_unequal_ranks_in_process():
    """`gather_rows` against a stand-in all-gather: rows padded to the largest rank, padding dropped, bools
    kept."""
    parts = [torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[4.0]])]
    masks = [torch.tensor([True, False, True]), torch.tensor([False])]
    for rank in range(2):
        def gather(x, rank=rank, source=None):
            source = parts if x.dtype != torch.uint8 else [m.to(torch.uint8) for m in masks]
            padded = [torch.cat([p, p.new_zeros((3 - p.shape[0],) + tuple(p.shape[1:]))]) for p in source]
            assert torch.equal(padded[rank], x)
            return torch.cat(padded)

        assert gather_rows(parts[rank], [3, 1], gather).flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
        assert gather_rows(masks[rank], [3, 1], gather).tolist() == [True, False, True, False]


def test_ranks_without_rows():
    """A rank with no rows still joins the gather and gets an empty routing; when no rank has a row nothing is
    gathered or routed."""
    policy = make_policy("budget", budget=8)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))

    def gather(t):  # rank 0 holds nothing, rank 1 the three rows of `x` (padded rows of rank 0 are zeros)
        other = {torch.float32: x, torch.uint8: torch.ones(3, dtype=torch.uint8)}[t.dtype]
        return torch.cat([torch.zeros_like(other), other])

    own, whole, _, v, _ = route_across_ranks(policy, x[:0], SPEC, 0, [0, 3], gather)
    assert own.ids.shape == (0, 4) and torch.equal(whole.ids, policy(x, SPEC).ids) and v.tolist() == [True] * 3

    def no_gather(t):
        raise AssertionError("nothing to gather")

    own, whole, *_ = route_across_ranks(policy, x[:0], SPEC, 1, [0, 0], no_gather)
    assert own.ids.shape == whole.ids.shape == (0, 4)


def test_rows_that_do_not_match_the_sizes_are_refused():
    policy = make_policy("budget", budget=8)
    with pytest.raises(ValueError, match="DP rank 1 holds 4 rows, but the ranks' row counts are \\[8, 5\\]"):
        route_across_ranks(policy, torch.randn(4, 16), SPEC, 1, SIZES, lambda x: x)


def test_dp_view_setting():
    cfg = plugin_config.parse('{"name": "budget", "budget": 6, "dp_view": "gather"}')
    assert cfg.dp_view == "gather" and "DP ranks routed as one batch" in cfg.describe()
    assert cfg.policy.name == "budget" and cfg.source == "budget:budget=6"
    assert plugin_config.parse("budget:budget=8").dp_view == "local"
    with pytest.raises(ValueError, match='dp_view must be "local" .* or "gather"'):
        plugin_config.parse('{"name": "budget", "budget": 6, "dp_view": "all"}')


def test_sglang_refuses_the_gathered_view():
    from moe_reroute.sglang.plugin import local_view

    cfg = plugin_config.parse('{"name": "oea", "k0": 3, "dp_view": "gather"}')
    with pytest.raises(ValueError, match="built for vLLM's data-parallel attention only"):
        local_view(cfg, "MOE_REROUTE_POLICY")
    local = plugin_config.parse("oea:k0=3")
    assert local_view(local, "MOE_REROUTE_POLICY") is local
