"""`xshare` and `lynx` against their plain-loop references (tests/reference.py), the contract's guarantees,
and the peers' own test cases.

XShare's cases come from the unit tests of vLLM PR #35551 (the file that imports `_prune_experts` and
`_fused_prune_experts` from `vllm/model_executor/layers/fused_moe/gpt_oss_triton_kernels_moe.py`). The peer
masks logits and counts the unmasked columns; here a policy returns the routing, so each case asserts the
experts the tokens route to. The peer's `_prune_experts(gating)` without `topk` has no top-K guarantee
(`guarantee=False` here); with `topk=K` it has one (the default here).

Lynx (gt-nexs/lynx) ships tests of its plugin loading, model registry and a GPU run of Qwen2
(`tests/test_registry.py`, `test_plugin_load.py`, `test_no_op_when_off.py`, `test_integration_qwen2.py`);
none routes a batch, so its cases here are hand-computed from `src/lynx/routing.py`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import distinct_logits, random_mask
from moe_reroute import RouterSpec, make_policy
from moe_reroute.metrics import unique_experts
from test_policies_vs_reference import check_against, tol


@st.composite
def batches(draw, fixed=False):
    scoring = draw(st.sampled_from(["softmax", "topk_softmax"]))
    E = draw(st.sampled_from([2, 4, 8, 16, 32, 64]))
    K = draw(st.integers(1, min(E, 8)))
    renorm = True if scoring == "topk_softmax" else draw(st.booleans())
    spec = RouterSpec(E, K, scoring, renorm)
    T = draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 10**6))
    logits = distinct_logits(T, E, dtype, seed)
    valid = random_mask(T, seed) if draw(st.booleans()) else None
    fix = random_mask(T, seed + 1, p_invalid=0.7) if fixed and draw(st.booleans()) else None
    return spec, logits, valid, fix


def xshare_params(data, spec, T):
    E, K = spec.num_experts, spec.top_k
    p = {}
    how = data.draw(st.sampled_from(["budget", "alpha", "default"]))
    if how == "budget":
        p["budget"] = data.draw(st.integers(1, E))
    elif how == "alpha":
        p["alpha"] = data.draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9]))
    p["k0"] = data.draw(st.integers(0, E))
    if data.draw(st.booleans()):
        p["group_size"] = data.draw(st.integers(1, T))
        p["group_budget"] = data.draw(st.integers(1, E))
    p["guarantee"] = data.draw(st.booleans())
    if data.draw(st.booleans()):
        p["min_batch"] = data.draw(st.integers(0, 8))
        p["max_batch"] = data.draw(st.sampled_from([0, 4, 16]))
        if p["max_batch"] and p["min_batch"] > p["max_batch"]:
            p["min_batch"] = 0
    return p


def lynx_params(data, K=2):
    """Every variant of lynx; "advanced_parametrized" (offset alpha, scale beta) with beta 0 when K=1."""
    variant = data.draw(st.sampled_from(["quant", "quant", "quant_flatten_remove", "advanced_parametrized"]))
    if variant == "advanced_parametrized":
        beta = data.draw(st.sampled_from([0, 0.25, 0.5, 1, 2])) if K > 1 else 0
        return {"variant": variant, "alpha": data.draw(st.sampled_from([-1, 0, 0.5, 1, 2, 3.5])), "beta": beta}
    betas = [None, 1, 2, 3, 4] if variant == "quant" else [1, 2, 3, 4]
    return {"variant": variant, "alpha": data.draw(st.sampled_from([0.7, 1, 1.5, 2, 3, 4])),
            "beta": data.draw(st.sampled_from(betas))}


LYNX_REFERENCES = {"quant": ref.ref_lynx, "quant_flatten_remove": ref.ref_lynx_flatten_remove,
                   "advanced_parametrized": ref.ref_lynx_advanced_parametrized}


def ref_lynx(logits, spec, valid, native_ids=None, fixed=None, variant="quant", **p):
    return LYNX_REFERENCES[variant](logits, spec, valid, native_ids=native_ids, fixed=fixed, **p)


def vl(valid, T):
    return [True] * T if valid is None else valid.tolist()


@settings(max_examples=250, deadline=None)
@given(batches(fixed=True), st.data())
def test_xshare_matches_the_loops(batch, data):
    spec, logits, valid, fixed = batch
    T = logits.shape[0]
    p = xshare_params(data, spec, T)
    ties = data.draw(st.sampled_from(["model", "lower-id"]))
    r = make_policy("xshare", ties=ties, **p)(logits, spec, valid, fixed=fixed)
    expected = ref.ref_xshare(logits, spec, vl(valid, T), native_ids=ref.stock_topk(logits, spec) if ties == "model" else None, fixed=fixed, **p)
    check_against(r, expected, spec, valid, tol(spec, logits))


@settings(max_examples=250, deadline=None)
@given(batches(fixed=True), st.data())
def test_lynx_matches_the_loops(batch, data):
    spec, logits, valid, fixed = batch
    T = logits.shape[0]
    p = lynx_params(data, spec.top_k)
    ties = data.draw(st.sampled_from(["model", "lower-id"]))
    r = make_policy("lynx", ties=ties, **p)(logits, spec, valid, fixed=fixed)
    expected = ref_lynx(logits, spec, vl(valid, T), native_ids=ref.stock_topk(logits, spec) if ties == "model" else None, fixed=fixed, **p)
    check_against(r, expected, spec, valid, tol(spec, logits))


@settings(max_examples=60, deadline=None)
@given(batches(), st.data())
def test_steps_unique_and_by_batch(batch, data):
    """[S, T, E] routes each step as its own call; `unique` is U of the routing; a by_batch value is the
    bucket's value."""
    spec, logits, valid, _ = batch
    T, E = logits.shape
    name = data.draw(st.sampled_from(["xshare", "lynx"]))
    p = {"budget": data.draw(st.integers(1, E))} if name == "xshare" else lynx_params(data, spec.top_k)
    policy = make_policy(name, **p)
    other = distinct_logits(T, E, logits.dtype, seed=99)
    steps = torch.stack([logits, other])
    masks = torch.stack([torch.tensor(vl(valid, T)), torch.ones(T, dtype=torch.bool)])
    both = policy(steps, spec, masks)
    for s in range(2):
        one = policy(steps[s], spec, masks[s])
        assert torch.equal(both.ids[s], one.ids) and torch.allclose(both.weights[s], one.weights)
        assert int(policy.unique(steps[s], spec, masks[s])) == int(unique_experts(one, E))
    assert policy.unique(steps, spec, masks).tolist() == unique_experts(both, E).tolist()
    key = "budget" if name == "xshare" else "alpha"
    bucketed = make_policy(name, **{**p, key: {"by_batch": {str(T): p[key], "max": p[key]}}})
    r = bucketed(logits, spec, valid)
    assert torch.equal(r.ids, policy(logits, spec, valid).ids)


@pytest.mark.parametrize("name,params", [("xshare", {"budget": 3}), ("lynx", {"alpha": 2, "beta": 2})])
def test_fixed_rows_come_back_native(name, params):
    spec = RouterSpec(16, 4)
    x = distinct_logits(10, 16, seed=5)
    fixed = torch.tensor([True, False] * 5)
    r = make_policy(name, **params)(x, spec, fixed=fixed)
    nat = make_policy("native")(x, spec)
    assert torch.equal(r.ids[fixed], nat.ids[fixed]) and torch.equal(r.weights[fixed], nat.weights[fixed])


@pytest.mark.parametrize("params,why", [
    ({"alpha": 2}, "lynx without beta has no fused kernel"),
    ({"alpha": 1, "beta": 0.5, "variant": "advanced_parametrized"}, "variant='advanced_parametrized' has no fused"),
])
def test_lynx_options_without_a_kernel_fall_back_to_torch_with_one_message(params, why):
    """backend='triton' with options the kernel does not cover: one warning, then the torch policy with the
    kernels' ties rule. (The kernel itself: tests/test_kernels.py.)"""
    from moe_reroute import kernels

    kernels._warned.clear()
    policy = make_policy("lynx", backend="triton", **params)
    spec = RouterSpec(16, 4)
    x = distinct_logits(8, 16, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kernels.counting() as c:
            first, second = policy(x, spec), policy(x, spec)
    assert sum(why in str(w.message) for w in caught) == 1 and c.count == 0
    assert policy.ties == "lower-id"
    want = make_policy("lynx", backend="torch", ties="lower-id", **params)(x, spec)
    assert torch.equal(first.ids, want.ids) and torch.equal(second.ids, want.ids)


@pytest.mark.parametrize("make,match", [
    (lambda: make_policy("xshare", budget=4, alpha=0.5), "not both"),
    (lambda: make_policy("xshare", alpha=1.5), r"alpha must be a fraction"),
    (lambda: make_policy("xshare", k0=-1), "k0 must be an int >= 0"),
    (lambda: make_policy("lynx", alpha=0), "lynx alpha must be a positive number"),
    (lambda: make_policy("lynx", alpha=2, beta=float("inf")), "lynx beta must be a positive number"),
    (lambda: make_policy("lynx", alpha=2, beta=1.5), r"a whole number of buckets \(1, 2, 3, ...\), got 1.5"),
    (lambda: make_policy("lynx", alpha=2, beta=[1, 0.5]), "a whole number of buckets"),
    (lambda: make_policy("lynx", alpha=2, variant="flatten"), "lynx variant must be one of quant, quant_flatten_remove"),
    (lambda: make_policy("lynx", alpha=2, variant="quant_flatten_remove"), r"needs beta \(the bottom bucket"),
    (lambda: make_policy("lynx", alpha=2, beta={"by_batch": {"4": 1, "max": None}}, variant="quant_flatten_remove"),
     "needs beta"),
    (lambda: make_policy("lynx", alpha=1, variant="advanced_parametrized"), r"needs beta \(the scale"),
    (lambda: make_policy("lynx", alpha=1, beta=-0.5, variant="advanced_parametrized"),
     r"beta \(variant='advanced_parametrized'\) must be a number >= 0, got -0.5"),
    (lambda: make_policy("lynx", alpha=float("nan"), beta=1, variant="advanced_parametrized"), "a finite number"),
])
def test_bad_options_are_refused_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("params,match", [
    ({"budget": 20}, r"budget=20 > the number of experts E=16"),
    ({"budget": 4, "group_budget": 2}, "give both"),
    ({"budget": 4, "group_size": 9, "group_budget": 2}, "group_size=9 > the step's 8 rows"),
    ({"budget": 4, "min_batch": 9, "max_batch": 4}, "no step would be pruned"),
])
def test_xshare_options_that_do_not_fit_are_refused_before_routing(params, match):
    with pytest.raises(ValueError, match=match):
        make_policy("xshare", **params)(distinct_logits(8, 16), RouterSpec(16, 4))


def test_lynx_options_that_do_not_fit_are_refused_before_routing():
    """advanced_parametrized with K=1 and beta > 0 would keep no expert (the confidence of one expert is
    -w / 1e-8): refused with the fix, before any routing; beta=0 is the peer's static count alpha."""
    from moe_reroute import kernels

    x = distinct_logits(4, 8)
    with kernels.counting() as c, pytest.raises(ValueError, match="K=1.*give beta=0"):
        make_policy("lynx", alpha=1, beta=0.5, variant="advanced_parametrized")(x, RouterSpec(8, 1))
    assert c.count == 0
    r = make_policy("lynx", alpha=1, beta=0, variant="advanced_parametrized")(x, RouterSpec(8, 1))
    assert torch.equal(r.ids, make_policy("native")(x, RouterSpec(8, 1)).ids)  # n = 1 for every token


@pytest.mark.parametrize("name,params", [("xshare", {"budget": 4}), ("lynx", {"alpha": 2}),
                                         ("lynx", {"alpha": 1, "beta": 1, "variant": "advanced_parametrized"})])
def test_sigmoid_routers_are_refused(name, params):
    spec = RouterSpec(16, 4, "sigmoid", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="sigmoid"):
        make_policy(name, **params)(distinct_logits(4, 16), spec)


# ---- XShare's own cases (vLLM PR #35551 unit tests), one per peer test ----

def _used(r):
    return {e for ids, ws in zip(r.ids.tolist(), r.weights.tolist()) for e, w in zip(ids, ws) if w > 0}


def _routed(r, t):
    return {e for e, w in zip(r.ids[t].tolist(), r.weights[t].tolist()) if w > 0}


def test_peer_pruning_disabled():
    """test_pruning_disabled ("no knobs": alpha 0, no budget, no k0, no group budget): unchanged."""
    spec, x = RouterSpec(128, 4), torch.randn(8, 128)
    r = make_policy("xshare", alpha=0.0)(x, spec)
    assert torch.equal(r.ids, make_policy("native")(x, spec).ids)


def test_peer_greedy_total_masks_experts():
    """test_greedy_total_masks_experts: budget 4 of 8, no guarantee: every row keeps the same 4 experts,
    the 4 largest logit sums."""
    spec, x = RouterSpec(8, 4), torch.randn(4, 8)
    r = make_policy("xshare", budget=4, guarantee=False)(x, spec)
    best = set(torch.sort(x.double().sum(0), descending=True, stable=True)[1][:4].tolist())
    assert all(_routed(r, t) == best for t in range(4))


@pytest.mark.parametrize("guarantee", [False, True])
def test_peer_greedy_total_preserves_top(guarantee):
    """test_greedy_total_preserves_top: columns 0 (10.0) and 1 (8.0) survive a budget of 2; column 2 (1.0)
    does not."""
    gating = torch.zeros(4, 8)
    gating[:, 0], gating[:, 1], gating[:, 2] = 10.0, 8.0, 1.0
    r = make_policy("xshare", budget=2, guarantee=guarantee)(gating, RouterSpec(8, 2))
    assert _used(r) == {0, 1}


def test_peer_greedy_total_ge_num_experts():
    """test_greedy_total_ge_num_experts: a budget of E is a no-op. The peer also clamps a budget of 200 to E;
    here a budget above E is refused like every policy's (it is a typo more often than a wish)."""
    spec, x = RouterSpec(8, 2), torch.randn(4, 8)
    assert torch.equal(make_policy("xshare", budget=8)(x, spec).ids, make_policy("native")(x, spec).ids)
    with pytest.raises(ValueError, match="budget=200 > the number of experts E=8"):
        make_policy("xshare", budget=200)(x, spec)


def test_peer_batch_size_one():
    """test_batch_size_one: one row, budget 4: it keeps its own 4 best."""
    spec, x = RouterSpec(8, 4), torch.randn(1, 8)
    r = make_policy("xshare", budget=4, guarantee=False)(x, spec)
    assert _routed(r, 0) == set(torch.topk(x[0], 4).indices.tolist())


def test_peer_top_per_token_preserves_best():
    """test_top_per_token_preserves_best: top_per_token=1 (with the default alpha 0.5) keeps each row's best."""
    gating = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, 1.0, 2.0, 3.0], [2.0, 3.0, 6.0, 1.0]])
    r = make_policy("xshare", k0=1, guarantee=False)(gating, RouterSpec(4, 1))
    assert r.ids[:, 0].tolist() == [1, 0, 2]


def test_peer_top_per_token_with_greedy_total():
    """test_top_per_token_with_greedy_total: budget 2 and top_per_token 1: rows keep 1 and 0, columns 4.. are
    masked."""
    gating = torch.tensor([[1.0, 5.0, 3.0, 2.0, 0.1, 0.1, 0.1, 0.1], [4.0, 1.0, 2.0, 3.0, 0.1, 0.1, 0.1, 0.1]])
    r = make_policy("xshare", budget=2, k0=1)(gating, RouterSpec(8, 2))
    assert 1 in _routed(r, 0) and 0 in _routed(r, 1)
    assert max(_used(r)) < 4


def test_peer_per_group_routes_correctly():
    """test_per_group_routes_correctly: groups of 4 rows, 2 experts each: rows 0-3 keep expert 0, rows 4-7
    expert 6."""
    gating = torch.zeros(8, 8)
    gating[0:4, 0], gating[0:4, 1] = 5.0, 4.0
    gating[4:8, 6], gating[4:8, 7] = 5.0, 4.0
    r = make_policy("xshare", group_budget=2, group_size=4, guarantee=False)(gating, RouterSpec(8, 1))
    assert r.ids[:4, 0].tolist() == [0] * 4 and r.ids[4:, 0].tolist() == [6] * 4


def test_peer_remainder_tokens_not_fully_masked():
    """test_remainder_tokens_not_fully_masked: 6 rows in groups of 4: rows 4 and 5 take the batch's best 2."""
    x = torch.randn(6, 8)
    r = make_policy("xshare", alpha=0.0, group_budget=2, group_size=4, guarantee=False)(x, RouterSpec(8, 2))
    best = set(torch.sort(x.double().sum(0), descending=True, stable=True)[1][:2].tolist())
    assert _routed(r, 4) == best and _routed(r, 5) == best


def test_peer_batch_smaller_than_group():
    """test_batch_smaller_than_group_returns_original: the peer leaves a batch smaller than a group unpruned;
    here that group size is refused with how to fix it (a by_batch group size covers small batches)."""
    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match="group_size=4 > the step's 1 rows"):
        make_policy("xshare", alpha=0.0, group_budget=2, group_size=4)(x, RouterSpec(8, 2))
    by_batch = {"by_batch": {"3": 1, "max": 4}}
    r = make_policy("xshare", alpha=0.0, group_budget=2, group_size=by_batch, guarantee=False)(x, RouterSpec(8, 2))
    assert _routed(r, 0) == set(torch.topk(x[0], 2).indices.tolist())


@pytest.mark.parametrize("M,params", [(4, dict(budget=4, min_batch=8)), (8, dict(budget=4, max_batch=4))])
def test_peer_batch_guard_skips(M, params):
    """test_batch_guard_skips: outside [min_batch, max_batch] rows the batch routes natively."""
    spec, x = RouterSpec(16, 4), torch.randn(M, 16)
    assert torch.equal(make_policy("xshare", **params)(x, spec).ids, make_policy("native")(x, spec).ids)


def test_peer_topk_guarantee():
    """test_topk_guarantee: budget 2 < K=6 with the guarantee: every row keeps its own top-6 (native)."""
    spec, x = RouterSpec(16, 6), torch.randn(8, 16)
    assert torch.equal(make_policy("xshare", budget=2)(x, spec).ids, make_policy("native")(x, spec).ids)


def test_peer_topk_zero_no_guarantee():
    """test_topk_zero_no_guarantee: without the guarantee every row keeps exactly the 2 experts of the budget
    (here its other slots repeat one of them with weight 0)."""
    spec, x = RouterSpec(8, 4), torch.randn(4, 8)
    r = make_policy("xshare", budget=2, guarantee=False)(x, spec)
    assert all(len(_routed(r, t)) == 2 for t in range(4)) and len(_used(r)) == 2


def test_peer_topk_selective_not_all():
    """test_topk_selective_not_all: budget 4 < K=6: between 6 and 10 unmasked per row, and the top-6 among
    them is each row's own: native routing."""
    spec, x = RouterSpec(16, 6), torch.randn(8, 16)
    assert torch.equal(make_policy("xshare", budget=4)(x, spec).ids, make_policy("native")(x, spec).ids)


def test_peer_budget_alpha():
    """test_budget_alpha: alpha 0.25 of E=16 is 4 experts at most."""
    r = make_policy("xshare", alpha=0.25)(torch.randn(8, 16), RouterSpec(16, 2))
    assert len(_used(r)) <= 4


def test_peer_expert_budget_overrides_alpha():
    """test_expert_budget_overrides_alpha: the peer lets budget 8 override alpha 0.1; here giving both is
    refused, and budget 8 alone uses between 3 and 8 experts."""
    with pytest.raises(ValueError, match="not both"):
        make_policy("xshare", budget=8, alpha=0.1)
    r = make_policy("xshare", budget=8)(torch.randn(8, 16), RouterSpec(16, 2))
    assert 2 < len(_used(r)) <= 8


def test_peer_non_contiguous():
    """test_non_contiguous: a strided batch routes as its contiguous copy."""
    x = torch.randn(16, 8)[::2]
    assert not x.is_contiguous()
    r = make_policy("xshare", budget=4, guarantee=False)(x, RouterSpec(8, 4))
    assert all(len(_routed(r, t)) == 4 for t in range(8))
    assert torch.equal(r.ids, make_policy("xshare", budget=4, guarantee=False)(x.contiguous(), RouterSpec(8, 4)).ids)


def test_peer_pruning_reduces_active_experts():
    """test_pruning_reduces_active_experts: seed 42, budget 4, top-2: at most 4 experts in the batch."""
    torch.manual_seed(42)
    r = make_policy("xshare", budget=4)(torch.randn(8, 16), RouterSpec(16, 2))
    assert len(_used(r)) <= 4


def test_peer_fused_with_ties():
    """test_fused_with_ties (a CUDA test there; the rule holds on any device): bfloat16 ones with columns 0-3
    at 10: the budget of 4 keeps exactly those."""
    gating = torch.ones(8, 16, dtype=torch.bfloat16)
    gating[:, :4] = 10.0
    r = make_policy("xshare", budget=4)(gating, RouterSpec(16, 2))
    assert _used(r) <= {0, 1, 2, 3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_peer_fused_dtype(dtype):
    """test_fused_dtype: 16-bit logits, budget 4: at most 4 experts."""
    r = make_policy("xshare", budget=4)(torch.randn(8, 16).to(dtype), RouterSpec(16, 2))
    assert len(_used(r)) <= 4


# ---- Lynx, hand-computed from src/lynx/routing.py ----

def test_lynx_hand_computed_batch():
    """Two tokens, E=4, K=1, alpha=1, B=2. Token 0: logits [0, -0.5, -3, -3] -> q [0, 0, -3, -3]; token 1:
    [-0.5, 0, -3, -3] -> q [0, 0, -3, -3]. Popularity h = 2**q: expert 0 and 1 sum 2 each; each token scores
    q + (sum - own h) / 2 = 0.5 for experts 0 and 1, a tie: both choose expert 0 (lower id). The batch keeps
    {0}, so token 1 routes to expert 0, not its native 1."""
    x = torch.tensor([[0.0, -0.5, -3.0, -3.0], [-0.5, 0.0, -3.0, -3.0]])
    r = make_policy("lynx", alpha=1)(x, RouterSpec(4, 1))
    assert r.ids[:, 0].tolist() == [0, 0]
    assert r.weights[:, 0].tolist() == pytest.approx([1.0, 1.0])


def test_lynx_keeps_the_native_mass_without_renormalisation():
    """renormalize=False: Lynx scales the new weights to the token's native top-K total (routing.py's
    `orig_topk_weights_sum / final_topk_weights_sum`)."""
    x = torch.tensor([[2.0, 1.9, 0.0, -1.0], [1.9, 2.0, -1.0, 0.0]])
    spec = RouterSpec(4, 2, renormalize=False)
    r = make_policy("lynx", alpha=1, beta=2)(x, spec)
    native = make_policy("native")(x, spec)
    assert r.weights.sum(-1).tolist() == pytest.approx(native.weights.sum(-1).tolist())


def test_lynx_beta_floors_the_bottom_bucket():
    """beta=1: every logit more than 1/alpha below the best shares the bottom bucket -1, so popularity alone
    ranks them: token 0 (native [0, 1]) moves its second slot to expert 3, which token 1 ranks first."""
    x = torch.tensor([[5.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 5.0]])
    spec = RouterSpec(4, 2)
    assert make_policy("lynx", alpha=1)(x, spec).ids[0].tolist() == [0, 1]
    r = make_policy("lynx", alpha=1, beta=1)(x, spec)
    assert sorted(r.ids[0].tolist()) == [0, 3]


def test_lynx_flatten_remove_gives_the_bottom_bucket_to_the_first_expert():
    """One token, E=4, K=2, alpha=1, beta=1: logits [2, 0, -1, -1.5] -> q = max(ceil(x - 2), -1) =
    [0, -1, -1, -1]; B=1, so the token scores q alone and takes 0, then 1 (ties to the lower id). Expert 1 is
    in the bottom bucket: its slot goes to expert 0 with its weight. Renormalised: expert 0 alone, weight 1;
    without renormalisation: expert 0 with the native top-2 mass p0 + p1 (Lynx's rescale)."""
    x = torch.tensor([[2.0, 0.0, -1.0, -1.5]])
    p = torch.softmax(x, dim=-1)[0]
    for renorm, mass in ((True, 1.0), (False, float(p[0] + p[1]))):
        r = make_policy("lynx", alpha=1, beta=1, variant="quant_flatten_remove")(x, RouterSpec(4, 2, renormalize=renorm))
        assert r.ids[0].tolist() == [0, 0]
        assert r.weights[0].tolist() == pytest.approx([mass, 0.0])
    plain = make_policy("lynx", alpha=1, beta=1)(x, RouterSpec(4, 2))
    assert plain.ids[0].tolist() == [0, 1]  # "quant" keeps the slot


def test_lynx_advanced_parametrized_counts_by_confidence():
    """K=4, alpha=1, beta=0.5. Token 0's native weights ~[0.7, 0.1, 0.1, 0.1]: c = (0.8 - 0.2) / 0.8 = 0.75,
    n = floor(0.75 * 4 * 0.5) + 1 = 2: it keeps experts 0 and 1. Token 1's are nearly equal: c ~ 0.04,
    n = floor(0.08) + 1 = 1: it keeps expert 4. The batch keeps {0, 1, 4}: token 0 routes to 0, 1, 4 (and a
    spare slot at weight 0), token 1 to 4, 0, 1. Without renormalisation the weights are the softmax over
    the keep set (the peer's softmax over masked logits), so they sum to 1."""
    import math

    lo = -20.0
    x = torch.tensor([[math.log(0.7), math.log(0.1), math.log(0.1) - 1e-3, math.log(0.1) - 2e-3, lo, lo, lo, lo],
                      [lo, lo, lo, lo, 0.0, -0.01, -0.02, -0.03]])
    for renorm in (True, False):
        spec = RouterSpec(8, 4, renormalize=renorm)
        r = make_policy("lynx", alpha=1, beta=0.5, variant="advanced_parametrized")(x, spec)
        assert _routed(r, 0) == {0, 1, 4} and _routed(r, 1) == {4, 0, 1}
        assert r.ids[1, 0].item() == 4
        assert r.weights.sum(-1).tolist() == pytest.approx([1.0, 1.0])
        p = torch.softmax(x[0], dim=-1)
        assert r.weights[0, :2].tolist() == pytest.approx((p[:2] / (p[0] + p[1] + p[4])).tolist(), rel=1e-5)
