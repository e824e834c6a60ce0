"""`Policy.unique`: U counted without the routing equals U of the routing, exactly.

Every policy, every scoring, both ties rules, [T, E] and [S, T, E], random valid and fixed masks, logits
without ties, with many ties (small integers) and with the cases the counting path must recognise as
unsafe: probabilities tied by rounding or underflow where the logits differ, float64 logits equal in
float32, non-finite values in valid rows (with check_inputs=False).
"""

from __future__ import annotations

import pytest
import torch

from moe_reroute import RouterSpec, make_policy, metrics
from test_steps import CASES, SPECS, E, _kernels_usable, similarity, steps_batch

MORE_CASES = CASES + [
    ("native", {}),
    ("cap", {"k": 4}),  # k = K: native
    ("oea", {"k0": 4}),  # k0 = K: native
    ("oea", {"k0": 2, "p": 0.7, "max_rank": 12, "k_max": 3}),
    ("oea", {"k0": [3, 1], "p": [0.4, 1.0], "max_rank": E}),
]


def check(policy, x, spec, valid=None, fixed=None, layer=None, what=""):
    want = metrics.unique_experts(policy(x, spec, valid, layer=layer, fixed=fixed), spec.num_experts)
    got = policy.unique(x, spec, valid, layer=layer, fixed=fixed)
    assert got.dtype == torch.int64 and got.shape == want.shape, what
    if not torch.equal(got, want):
        bad = (got != want).nonzero().flatten()[:4].tolist() if want.dim() else []
        raise AssertionError(f"{what}: U {got.tolist()} != {want.tolist()} (steps {bad})")


@pytest.mark.parametrize("name,params", MORE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MORE_CASES)])
@pytest.mark.parametrize("scoring", sorted(SPECS))
@pytest.mark.parametrize("ties_rule", ["model", "lower-id"])
def test_unique_equals_unique_of_the_routing(name, params, scoring, ties_rule):
    spec = SPECS[scoring]
    policy = make_policy(name, backend="torch", ties=ties_rule, **params)
    for seed, (T, ties, use_fixed, dtype) in enumerate([
        (3, False, False, torch.float32), (9, False, True, torch.bfloat16), (9, True, True, torch.float32),
        (9, True, False, torch.bfloat16), (1, True, False, torch.float16), (16, False, False, torch.float64),
    ]):
        x, valid, fixed = steps_batch(6, T, seed, ties, dtype)
        fixed = fixed if use_fixed else None
        for layer in (0, 1):
            what = f"{name} {params} {scoring} {ties_rule} T={T} ties={ties} fixed={use_fixed} {dtype} layer={layer}"
            check(policy, x, spec, valid, fixed, layer, what)  # [S, T, E]
            for s in (0, 2):  # [T, E]: a step without padding, one with some
                check(policy, x[s], spec, valid[s], None if fixed is None else fixed[s], layer, what + f" step {s}")
        if T > 1:
            check(policy, x[0], spec, None, None, 0, f"{name} {scoring} valid=None")


def _wide_batch(S, T, E, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, T, E, generator=g).to(dtype)
    valid = torch.rand(S, T, generator=g) > 0.1
    return x, valid


@pytest.mark.parametrize("ties_rule", ["model", "lower-id"])
def test_benchmark_shape(ties_rule):
    """E = 128, K = 8, bfloat16 random normal (about 5% of rows tie at the k0-th rank)."""
    spec = RouterSpec(128, 8, "softmax", True)
    x, valid = _wide_batch(64, 16, 128, 3, torch.bfloat16)
    for params in ({"k0": 4}, {"k0": 1}, {"k0": 7, "p": 0.5}):
        check(make_policy("oea", ties=ties_rule, **params), x, spec, valid, what=str(params))
    check(make_policy("cap", k=3, ties=ties_rule), x, spec, valid, what="cap")
    check(make_policy("native", ties=ties_rule), x, spec, valid, what="native")


def _rounding_ties(S, T, seed):
    """Softmax rows whose probabilities tie although their logits differ: logits one float32 step apart,
    and rows spanning far more than exp can hold (most probabilities underflow to 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, T, E, generator=g)
    near = torch.rand(S, T, generator=g) < 0.5
    x[..., 1] = torch.where(near, torch.nextafter(x[..., 0], torch.tensor(float("inf"))), x[..., 1])
    x[..., 2] = torch.where(near, torch.nextafter(x[..., 0], torch.tensor(-float("inf"))), x[..., 2])
    x[..., 0] += torch.where(near, 3.0, 0.0)
    far = ~near & (torch.rand(S, T, generator=g) < 0.7)
    x = torch.where(far[..., None], x * 300, x)
    return x, torch.rand(S, T, generator=g) > 0.2


@pytest.mark.parametrize("ties_rule", ["model", "lower-id"])
@pytest.mark.parametrize("scoring", sorted(SPECS))
def test_probabilities_tied_by_rounding(ties_rule, scoring):
    spec = SPECS[scoring]
    for seed in range(4):
        x, valid = _rounding_ties(8, 12, seed)
        for name, params in [("oea", {"k0": 1}), ("oea", {"k0": 2}), ("oea", {"k0": 3}), ("cap", {"k": 2}), ("native", {})]:
            check(make_policy(name, ties=ties_rule, **params), x, spec, valid, what=f"{name} {params} seed {seed}")


def test_float64_logits_equal_in_float32():
    """Each row's best two are expert 0 and one of experts 1-3, a hair apart in float64 and one value in
    float32, which the policies rank by: counting by the float64 order would find 3 experts, not 1."""
    spec = SPECS["softmax"]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, E, generator=g, dtype=torch.float64)
    x[..., 0] = 5.0
    rival = 1 + torch.arange(7) % 3  # [T]
    x.scatter_(-1, rival.expand(5, 7)[..., None], 5.0 + 1e-12)
    for ties_rule in ("model", "lower-id"):
        for name, params in (("oea", {"k0": 1}), ("cap", {"k": 1}), ("oea", {"k0": 2})):
            check(make_policy(name, ties=ties_rule, **params), x, spec, what=f"{name} {params} {ties_rule}")


@pytest.mark.parametrize("scoring", sorted(SPECS))
def test_non_finite_valid_rows_without_the_check(scoring):
    spec = SPECS[scoring]
    x, valid, fixed = steps_batch(6, 9, 11)
    x[valid] = torch.where(torch.rand(x[valid].shape, generator=torch.Generator().manual_seed(2)) < 0.05,
                           torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(0, 3, x[valid].shape)],
                           x[valid])
    for name, params in [("oea", {"k0": 2}), ("cap", {"k": 3}), ("native", {})]:
        for ties_rule in ("model", "lower-id"):
            policy = make_policy(name, check_inputs=False, ties=ties_rule, **params)
            check(policy, x, spec, valid, fixed, what=f"{name} {ties_rule}")


def test_unique_checks_inputs_as_a_call():
    spec = SPECS["softmax"]
    x, valid, _ = steps_batch(3, 5, 0)
    valid[0, 1] = True
    bad = x.clone()
    bad[0, 1, 3] = float("nan")
    policy = make_policy("oea", k0=2)
    with pytest.raises(ValueError, match=r"NaN or inf \(first bad \(step, token row\)s: \[\(0, 1\)\]\)"):
        policy.unique(bad, spec, valid)
    with pytest.raises(ValueError, match="oea k0=5 > the model's K=4"):
        make_policy("oea", k0=5).unique(x, spec, valid)
    with pytest.raises(ValueError, match=r"valid must have shape \[S, T\]"):
        policy.unique(x, spec, valid[0])
    with pytest.raises(ValueError, match="call the policy with layer="):
        make_policy("oea", k0=[1, 2]).unique(x, spec, valid)


def test_all_padding_counts_nothing():
    spec = SPECS["softmax"]
    x, _, fixed = steps_batch(3, 5, 1)
    valid = torch.zeros(3, 5, dtype=torch.bool)
    for name, params in [("oea", {"k0": 2}), ("cap", {"k": 1}), ("native", {}), ("budget", {"budget": 5})]:
        u = make_policy(name, **params).unique(x, spec, valid, fixed=fixed)
        assert u.tolist() == [0, 0, 0], name


@pytest.mark.skipif(not _kernels_usable(), reason="Triton kernels unavailable (no Triton, or no GPU and no interpreter)")
def test_unique_with_the_kernels():
    spec = SPECS["softmax"]
    x, valid, fixed = steps_batch(3, 5, 5)
    for name, params in [("oea", {"k0": 2}), ("sere", {"similarity": similarity(E, 4)})]:
        policy = make_policy(name, backend="triton", check_inputs=False, **params)
        check(policy, x, spec, valid, fixed, what=f"kernels {name}")
