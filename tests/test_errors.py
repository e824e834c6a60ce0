"""Bad input gets a clear error naming the problem, never silently wrong routing."""

from __future__ import annotations

import pytest
import torch

from moe_reroute import RouterSpec, make_policy

SPEC = RouterSpec(16, 4)
X = torch.randn(5, 16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name,params", [("native", {}), ("cap", {"k": 2}), ("oea", {"k0": 2}), ("budget", {"budget": 4})])
def test_non_finite_logits(bad, name, params):
    x = X.clone()
    x[3, 7] = bad
    with pytest.raises(ValueError, match=r"NaN or inf.*\[3\]"):
        make_policy(name, **params)(x, SPEC)
    # engines that turn the check off still get a routing (their responsibility)
    make_policy(name, check_inputs=False, **params)(x.nan_to_num(), SPEC)


def test_spec_errors():
    with pytest.raises(ValueError, match="top_k K=9 > num_experts E=8"):
        RouterSpec(8, 9)
    with pytest.raises(ValueError, match="unknown scoring"):
        RouterSpec(8, 2, "relu")
    with pytest.raises(ValueError, match="n_group=3 must divide"):
        RouterSpec(16, 2, "sigmoid", n_group=3)
    with pytest.raises(ValueError, match="too few to pick K"):
        RouterSpec(16, 8, "sigmoid", n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="e_score_correction_bias must be a tensor of shape"):
        RouterSpec(16, 2, "sigmoid", e_score_correction_bias=torch.zeros(15))
    with pytest.raises(ValueError, match="apply only to scoring='sigmoid'"):
        RouterSpec(16, 2, n_group=4)


def test_parameter_errors():
    with pytest.raises(ValueError, match="k0=5 > the model's K=4"):
        make_policy("oea", k0=5)(X, SPEC)
    with pytest.raises(ValueError, match="k_max=6 > the model's K=4"):
        make_policy("oea", k0=2, k_max=6)(X, SPEC)
    with pytest.raises(ValueError, match="k_max=1 < k0=2"):
        make_policy("oea", k0=2, k_max=1)
    with pytest.raises(ValueError, match="p must be a probability"):
        make_policy("oea", k0=2, p=1.5)
    with pytest.raises(ValueError, match="k0 must be an int >= 1"):
        make_policy("oea", k0=0)
    with pytest.raises(TypeError, match="its parameters are: k0, p, k_max, max_rank"):
        make_policy("oea", k=3)
    with pytest.raises(ValueError, match="cap k=5 > the model's K=4"):
        make_policy("cap", k=5)(X, SPEC)
    with pytest.raises(ValueError, match="cap needs k="):
        make_policy("cap")
    with pytest.raises(ValueError, match="budget=17 > the number of experts E=16"):
        make_policy("budget", budget=17)(X, SPEC)
    with pytest.raises(ValueError, match="unknown policy 'expert-share'; available: native, cap, oea, sere, budget, gain, "
                                         "xshare, lynx"):
        make_policy("expert-share")
    with pytest.raises(ValueError, match="sere primary=5 > the model's K=4"):
        make_policy("sere", similarity=torch.eye(16), primary=5)(X, SPEC)


def test_per_layer_errors():
    policy = make_policy("oea", k0=[1, 2])
    with pytest.raises(ValueError, match="call the policy with layer="):
        policy(X, SPEC)
    with pytest.raises(ValueError, match="lists 2 layers; MoE layer 2 is out of range .layers count MoE layers only"):
        policy(X, SPEC, layer=2)
    with pytest.raises(ValueError, match="no value for MoE layer 4 .it covers MoE layers .0, 3.; layers count MoE layers only"):
        make_policy("oea", k0={0: 1, 3: 2})(X, SPEC, layer=4)
    with pytest.raises(ValueError, match="k0 must be an int"):
        make_policy("oea", k0=[1, 0])
    with pytest.raises(ValueError, match="renormalize cannot differ per layer"):
        make_policy("cap", k=2, renormalize=[True, False])


def test_similarity_errors():
    with pytest.raises(ValueError, match=r"similarity for MoE layer None is \(8, 8\) but the model has E=16"):
        make_policy("sere", similarity=torch.eye(8))(X, SPEC)
    with pytest.raises(ValueError, match="square"):
        make_policy("sere", similarity=torch.ones(16, 8))
    bad = torch.eye(16)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf; recalibrate"):
        make_policy("sere", similarity=bad)
    with pytest.raises(ValueError, match="sere needs similarity="):
        make_policy("sere")
    with pytest.raises(ValueError, match="holds 2 layers; MoE layer 3"):
        make_policy("sere", similarity=torch.stack([torch.eye(16)] * 2))(X, SPEC, layer=3)


def test_shape_and_dtype_errors():
    policy = make_policy("oea", k0=2)
    with pytest.raises(ValueError, match=r"2-D \[T, E\].* or 3-D \[S, T, E\].*reshape"):
        policy(X[None, None], SPEC)  # (X[None] is one step of X: [S, T, E] with S = 1)
    with pytest.raises(ValueError, match="E=15 experts but the RouterSpec says num_experts=16"):
        policy(X[:, :15], SPEC)
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64, got torch.int64"):
        policy(X.long(), SPEC)
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        policy(X, SPEC, valid=torch.ones(5))
    with pytest.raises(ValueError, match=r"valid must have shape \[T\]=\[5\]"):
        policy(X, SPEC, valid=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="spec must be a RouterSpec"):
        policy(X, {"num_experts": 16})
    with pytest.raises(ValueError, match="no tokens"):
        policy(X[:0], SPEC)
