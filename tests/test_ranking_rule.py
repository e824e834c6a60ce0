"""The ranking rule (the model's top-K are ranks 1..K, in its order; the rest by score, ties to the
lower id), padding rows that hold garbage, and the weight rules, against the loop references and
hand-computed cases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import distinct_logits
from moe_reroute import RouterSpec, make_policy, metrics
from moe_reroute.policies import CapConfig, cap_schedule
from test_policies_vs_reference import batches, check_against, valid_list


def tied_logits(T, E, dtype, seed):
    """Router logits with many equal values per row (bf16 router logits look like this)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 3, (T, E), generator=g).float().div(2).to(dtype)


@st.composite
def tied_batches(draw):
    spec, _, valid = draw(batches())
    T = draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    x = tied_logits(T, spec.num_experts, dtype, draw(st.integers(0, 10**6)))
    valid = torch.rand(T, generator=torch.Generator().manual_seed(T)) > 0.25 if draw(st.booleans()) else None
    return spec, x, valid


def noop_policies(spec):
    K, E = spec.top_k, spec.num_experts
    return [make_policy("cap", k=K), make_policy("cap", k=K, renormalize=True), make_policy("cap", k=K, renormalize=False),
            make_policy("oea", k0=K), make_policy("budget", budget=E),
            make_policy("sere", similarity=torch.eye(E), primary=K)]


@settings(max_examples=150, deadline=None)
@given(tied_batches())
def test_no_op_settings_are_exactly_native(batch):
    """cap:k=K, oea:k0=K, budget=E, sere:primary=K give native routing bit for bit, ties and every dtype."""
    spec, x, valid = batch
    native = make_policy("native")(x, spec)
    keep = torch.ones(x.shape[0], dtype=torch.bool) if valid is None else valid
    for pol in noop_policies(spec):
        r = pol(x, spec, valid)
        assert torch.equal(r.ids[keep], native.ids[keep]), pol
        assert torch.equal(r.weights[keep], native.weights[keep]), pol


@settings(max_examples=150, deadline=None)
@given(tied_batches(), st.data())
def test_oea_never_above_native_with_ties(batch, data):
    spec, x, valid = batch
    k0 = data.draw(st.integers(1, spec.top_k))
    u_native = int(metrics.unique_experts(make_policy("native")(x, spec, valid), spec.num_experts))
    u = int(metrics.unique_experts(make_policy("oea", k0=k0)(x, spec, valid), spec.num_experts))
    assert u <= u_native


@settings(max_examples=150, deadline=None)
@given(tied_batches(), st.data())
def test_policies_with_ties_match_the_loops_given_the_models_top_k(batch, data):
    """ties="model": ranks 1..K are torch.topk's; ties="lower-id": the loops' own order."""
    spec, x, valid = batch
    K, E = spec.top_k, spec.num_experts
    name = data.draw(st.sampled_from(["cap", "oea", "sere", "budget"]))
    sim = None
    if name == "cap":
        params = {"k": data.draw(st.integers(1, K)), "renormalize": data.draw(st.sampled_from([None, True, False]))}
    elif name == "oea":
        params = {"k0": data.draw(st.integers(1, K))}
    elif name == "sere":
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
        sim = torch.rand(E, E, generator=g)
        params = {"primary": data.draw(st.integers(1, K)), "threshold": data.draw(st.sampled_from([0.0, 0.5]))}
    else:
        params = {"budget": data.draw(st.integers(1, E))}
    pol_params = dict(params, similarity=sim) if sim is not None else params
    refs = {"cap": ref.ref_cap, "oea": ref.ref_oea, "sere": ref.ref_sere, "budget": ref.ref_budget}
    args = (sim,) if sim is not None else ()
    vl = valid_list(valid, x.shape[0])
    for ties in ("model", "lower-id"):
        # the loops' own top-K: the stock router's torch ops (groups included) for "model", their order otherwise
        native_ids = ref.stock_topk(x, spec) if ties == "model" else None
        r = make_policy(name, ties=ties, **pol_params)(x, spec, valid)
        rel = 1e-2 if spec.scoring == "topk_softmax" and x.dtype != torch.float32 else 1e-5
        check_against(r, refs[name](x, spec, vl, *args, native_ids=native_ids, **params), spec, valid, rel)


GARBAGE = [float("nan"), float("inf"), -float("inf"), 3e38]


@settings(max_examples=100, deadline=None)
@given(batches(), st.sampled_from(GARBAGE), st.data())
def test_padding_rows_never_change_valid_rows(batch, garbage, data):
    """Whatever a padding row holds (a CUDA graph's stale buffer), the valid rows route the same."""
    spec, x, _ = batch
    T, E, K = x.shape[0], spec.num_experts, spec.top_k
    valid = torch.rand(T, generator=torch.Generator().manual_seed(T + 1)) > 0.3
    if not valid.any() or valid.all():
        return
    g = torch.Generator().manual_seed(5)
    sim = torch.rand(E, E, generator=g)
    clean = x.clone()
    clean[~valid] = 0
    dirty = x.clone()
    dirty[~valid] = garbage
    for pol in [make_policy("cap", k=max(1, K // 2), check_inputs=False), make_policy("oea", k0=1, p=0.6, check_inputs=False),
                make_policy("sere", similarity=sim, primary=1, check_inputs=False),
                make_policy("budget", budget=max(1, E // 4), check_inputs=False)]:
        a, b = pol(clean, spec, valid), pol(dirty, spec, valid)
        assert torch.equal(a.ids, b.ids), pol
        assert torch.equal(a.weights, b.weights), pol


def test_budget_nan_padding_row_from_the_audit():
    spec = RouterSpec(8, 2, "softmax", True)
    torch.manual_seed(0)
    lg = torch.randn(3, 8)
    pad = torch.cat([lg, torch.full((1, 8), float("nan"))])
    valid = torch.tensor([True, True, True, False])
    pol = make_policy("budget", budget=3, check_inputs=False)
    alone = pol(lg, spec)
    padded = pol(pad, spec, valid)
    assert torch.equal(padded.ids[:3], alone.ids)
    u = int(metrics.unique_experts(padded, 8))
    assert u <= 3
    # checks on: a NaN only in a padding row is accepted, a NaN in a valid row is not
    assert torch.equal(make_policy("budget", budget=3)(pad, spec, valid).ids[:3], alone.ids)
    with pytest.raises(ValueError, match=r"first bad token rows: \[3\]"):
        make_policy("budget", budget=3)(pad, spec)


def test_ties_example_from_the_audit():
    """logits [[0,0,0,0],[0,0,1,1]], K=2: the no-op settings give native's ids, whatever its tie order."""
    spec = RouterSpec(4, 2)
    x = torch.tensor([[0.0, 0, 0, 0], [0, 0, 1, 1]])
    native = make_policy("native")(x, spec).ids
    for pol in (make_policy("oea", k0=2), make_policy("cap", k=2), make_policy("budget", budget=4)):
        assert torch.equal(pol(x, spec).ids, native)
    assert make_policy("native", ties="lower-id")(x, spec).ids.tolist() == [[0, 1], [2, 3]]


def test_cap_weights_one_rule_for_every_scoring():
    """renormalize=False: the model's own weights cut to k; True: rescaled to the native top-K total."""
    gpt = RouterSpec(8, 4, "topk_softmax")
    x = torch.tensor([[3.0, 2, 1, 0.5, 0, 0, 0, 0]])
    native = torch.softmax(torch.tensor([3.0, 2, 1, 0.5]), -1)
    cut = make_policy("cap", k=2, renormalize=False)(x, gpt).weights[0, :2]
    torch.testing.assert_close(cut, native[:2])
    scaled = make_policy("cap", k=2, renormalize=True)(x, gpt).weights[0, :2]
    torch.testing.assert_close(scaled, torch.softmax(torch.tensor([3.0, 2]), -1))
    assert scaled.tolist() == pytest.approx([0.731, 0.269], abs=1e-3)

    ds = RouterSpec(16, 4, "sigmoid", True, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    y = distinct_logits(5, 16, seed=3)
    nat = make_policy("native")(y, ds)
    assert nat.weights.sum(-1).tolist() == pytest.approx([2.5] * 5)
    cut = make_policy("cap", k=2, renormalize=False)(y, ds)
    native_w = [dict(zip(i, w)) for i, w in zip(nat.ids.tolist(), nat.weights.tolist())]
    for t in range(5):  # the model's weights, not raw sigmoid x 2.5
        assert cut.weights[t, :2].tolist() == pytest.approx([native_w[t][e] for e in cut.ids[t, :2].tolist()])
    assert (cut.weights[:, 2:] == 0).all()
    full = make_policy("cap", k=2, renormalize=True)(y, ds)
    assert full.weights.sum(-1).tolist() == pytest.approx([2.5] * 5)
    for renorm in (None, True, False):  # cap:k=K is native under both
        for spec, z in ((gpt, x), (ds, y), (RouterSpec(16, 4, renormalize=False), y)):
            r = make_policy("cap", k=spec.top_k, renormalize=renorm)(z, spec)
            n = make_policy("native")(z, spec)
            assert torch.equal(r.ids, n.ids) and torch.equal(r.weights, n.weights)


def test_integral_parameters_and_config_replace():
    assert make_policy("oea", k0=np.int64(2)).config.k0 == 2
    assert make_policy("cap", k=np.int32(3)).config.k == 3
    with pytest.raises(ValueError, match=r"oea k0 must be an int >= 1, got 2.0 \(a float\)"):
        make_policy("oea", k0=2.0)
    c = CapConfig(schedule=(2, 4, 6, 3), num_layers=5)
    d = dataclasses.replace(c, renormalize=True)
    assert d.k == c.k and d.renormalize is True
    with pytest.raises(ValueError, match="either k or schedule"):
        CapConfig(k=[1, 1, 1, 1, 1], schedule=(2, 4, 6, 3), num_layers=5)


def test_cap_schedule_endpoints():
    """Layer 1 takes b, the last layer e, the interior layer p takes h (hand-computed)."""
    assert cap_schedule(2, 6, 4, 3, 5) == [2, 4, 6, 5, 4]
    assert cap_schedule(2, 8, 4, 2, 3) == [2, 8, 4]
    for p in (1, 5):
        with pytest.raises(ValueError, match="interior layer number 2..4"):
            cap_schedule(2, 6, 4, p, 5)
    with pytest.raises(ValueError, match="at least 3 MoE layers"):
        cap_schedule(2, 6, 4, 1, 2)
