"""Policies at their no-op settings are native routing exactly, the engine's own top-K included; the
similarity file format stands below the transformers adapter."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moe_reroute import RouterSpec, make_policy
from moe_reroute.metrics import unique_experts


@pytest.mark.parametrize("name,params", [("oea", {"k0": 2}), ("budget", {"budget": 8}), ("cap", {"k": 2}),
                                         ("xshare", {"budget": 8}), ("gain", {"budget": 8})])
def test_lower_id_ties_honour_the_engines_top_k(name, params):
    """ties="lower-id" with an engine's native=(weights, ids): ranks 1..K are the engine's, so at the no-op
    setting the policy returns them, and U never exceeds native's. Token 0 has four equal logits; the
    engine picked experts 2 and 3 for it."""
    spec = RouterSpec(8, 2)
    x = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 2, 1, 0, 0, 0, 0.0]])
    native = (torch.full((2, 2), 0.5), torch.tensor([[2, 3], [2, 3]]))
    r = make_policy(name, ties="lower-id", **params)(x, spec, native=native)
    assert r.ids.tolist() == [[2, 3], [2, 3]]
    assert int(unique_experts(r, 8)) == 2


def test_oea_piggybacks_on_the_engines_top_k_with_lower_id_ties():
    """k0=1: token 0's base is the engine's rank 1 (expert 2), not the lowest id of its tied experts."""
    spec = RouterSpec(8, 2)
    x = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 2, 1, 0, 0, 0, 0.0]])
    native = (torch.full((2, 2), 0.5), torch.tensor([[2, 3], [2, 3]]))
    r = make_policy("oea", k0=1, ties="lower-id")(x, spec, native=native)
    assert set(r.ids.flatten().tolist()) == {2}


@pytest.mark.parametrize("name,params", [("budget", {"budget": 4}), ("oea", {"k0": 3}), ("cap", {"k": 3}),
                                         ("lynx", {"alpha": 1}), ("gain", {"budget": 4})])
def test_weight_zero_native_experts_stay_at_the_no_op_setting(name, params):
    """A row with fewer than K finite logits (check_inputs off): its native top-K holds weight-0 experts;
    the no-op setting keeps exactly those ids (lynx, whose batch keeps every native expert here, too)."""
    spec = RouterSpec(4, 3, renormalize=False)
    x = torch.tensor([[1.0, 0.0, float("-inf"), float("-inf")], [0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    nat = make_policy("native", check_inputs=False)(x, spec)
    r = make_policy(name, check_inputs=False, **params)(x, spec)
    if name == "lynx":
        assert sorted(r.ids[0].tolist()) == sorted(nat.ids[0].tolist())
    else:
        assert torch.equal(r.ids, nat.ids) and torch.equal(r.weights, nat.weights)


def test_save_similarity_writes_layers_that_share_one_tensor(tmp_path):
    """One matrix for every layer (the same tensor object) writes and reads back."""
    from moe_reroute.similarity import load_similarity, save_similarity

    shared = torch.rand(8, 8)
    path = save_similarity({0: shared, 1: shared, 2: shared[:, :]}, tmp_path / "sim.safetensors")
    back = load_similarity(path, num_experts=8)
    assert sorted(back) == [0, 1, 2] and all(torch.equal(m, shared) for m in back.values())


def test_reading_a_similarity_file_does_not_import_the_transformers_adapter(tmp_path):
    """policies -> similarity file, never policies -> hf (which imports the policies)."""
    from moe_reroute.similarity import save_similarity

    path = save_similarity({0: torch.eye(4)}, tmp_path / "sim.safetensors")
    code = ("import sys; from moe_reroute.policies import policy_from_spec; "
            f"policy_from_spec('sere:similarity={path}', num_experts=4); "
            "print(sorted(m for m in sys.modules if m.startswith('moe_reroute.hf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
