"""Layer numbering: per-layer values are indexed by MoE layer (dense layers not counted).

`moe_reroute.contract.moe_layers` reads a config's MoE layers; the transformers adapter, traces and
calibration call policies with the MoE-layer index. Checked on tiny DeepSeek-V3 models whose decoder
layer 0 is dense, against a plain computation: the same model with each router's own top-k set by hand.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

from moe_reroute import make_policy
from moe_reroute.contract import moe_index, moe_layers
from moe_reroute.policies import cap_schedule

transformers = pytest.importorskip("transformers")

from moe_reroute.hf import Recorder, apply, moe_routers  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


# --- which decoder layers a config makes MoE layers ---


def configs():
    """(config, its MoE decoder layers written out by hand)."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        Dots1Config,
        Glm4MoeConfig,
        GptOssConfig,
        MiniMaxM2Config,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
        Qwen3NextConfig,
    )
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig

    return [
        (Qwen3MoeConfig(num_hidden_layers=6, decoder_sparse_step=2), [1, 3, 5]),
        (Qwen3MoeConfig(num_hidden_layers=5, mlp_only_layers=[0, 3]), [1, 2, 4]),
        (Qwen3MoeConfig(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]), [1, 5]),
        (Qwen2MoeConfig(num_hidden_layers=6, decoder_sparse_step=3, mlp_only_layers=[5]), [2]),
        (Qwen3MoeConfig(num_hidden_layers=3, num_experts=0), []),
        (DeepseekV3Config(num_hidden_layers=6, first_k_dense_replace=3), [3, 4, 5]),
        (DeepseekV3Config(num_hidden_layers=61), list(range(3, 61))),  # DeepSeek-V3's own layout
        (DeepseekV2Config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2), [2, 4]),
        (MixtralConfig(num_hidden_layers=4), [0, 1, 2, 3]),
        (OlmoeConfig(num_hidden_layers=3), [0, 1, 2]),
        (GptOssConfig(num_hidden_layers=2), [0, 1]),
        (Glm4MoeConfig(num_hidden_layers=46, first_k_dense_replace=1), list(range(1, 46))),  # GLM-4.5-Air's
        (Dots1Config(num_hidden_layers=5, first_k_dense_replace=2, n_routed_experts=8), [2, 3, 4]),
        (Qwen3NextConfig(num_hidden_layers=4, mlp_only_layers=[1]), [0, 2, 3]),
        (MiniMaxM2Config(num_hidden_layers=3), [0, 1, 2]),
        (Qwen3_5MoeTextConfig(num_hidden_layers=4), [0, 1, 2, 3]),
        (Qwen3_5MoeConfig(text_config={"num_hidden_layers": 3}), [0, 1, 2]),  # multimodal: its text config's
        (types.SimpleNamespace(model_type="kimi_k2", num_hidden_layers=5, first_k_dense_replace=1,
                               moe_layer_freq=1, n_routed_experts=8), [1, 2, 3, 4]),
        (types.SimpleNamespace(model_type="deepseek_v3", num_hidden_layers=4, first_k_dense_replace=1,
                               n_routed_experts=None), []),
    ]


@pytest.mark.parametrize("config, expected", configs(), ids=lambda c: getattr(c, "model_type", None) or str(c))
def test_moe_layers_of_each_layout(config, expected):
    assert moe_layers(config) == expected
    for n, decoder_layer in enumerate(expected):
        assert moe_index(config, decoder_layer) == (n, "")


def test_layers_without_a_moe_layer_index_say_why():
    ds = configs()[5][0]  # DeepSeek-V3, layers 0-2 dense
    assert moe_index(ds, 1) == (None, "decoder layer 1 is not a MoE layer of the model's config "
                                      "(MoE layers: decoder layers 3-5)")
    assert moe_index(configs()[2][0], 9)[1].endswith("(MoE layers: decoder layers 1, 5)")
    assert moe_index(ds, None) == (None, "its module name holds no decoder-layer index")
    assert moe_index(None, 3) == (None, "the model's config could not be read")
    llama4 = types.SimpleNamespace(model_type="llama4", num_hidden_layers=4)
    assert moe_layers(llama4) is None
    assert "which decoder layers of model_type 'llama4' are MoE layers is not known" in moe_index(llama4, 0)[1]
    bad = types.SimpleNamespace(model_type="deepseek_v3", num_hidden_layers=4, first_k_dense_replace="3",
                                n_routed_experts=8)
    with pytest.raises(ValueError, match="first_k_dense_replace must be an int >= 0, got '3'; check the model"):
        moe_layers(bad)


@pytest.mark.parametrize("arch, overrides, expected", [
    ("deepseek_v3", {"num_hidden_layers": 4, "first_k_dense_replace": 2}, [2, 3]),
    ("qwen3_moe", {"num_hidden_layers": 4, "mlp_only_layers": [0, 2]}, [1, 3]),
    ("qwen2_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2}, [1, 3]),
    ("mixtral", {}, [0, 1]),
    ("gpt_oss", {}, [0, 1]),
    ("glm4_moe", {"num_hidden_layers": 4, "first_k_dense_replace": 2}, [2, 3]),
    ("dots1", {"num_hidden_layers": 3}, [1, 2]),
    ("qwen3_next", {"num_hidden_layers": 4, "mlp_only_layers": [2]}, [0, 1, 3]),
    ("qwen3_5_moe_text", {}, [0, 1]),
    ("minimax_m2", {"num_hidden_layers": 3}, [0, 1, 2]),
])
def test_moe_layers_are_the_ones_transformers_builds(arch, overrides, expected):
    model = tiny_model(arch, **overrides)
    assert [i for i, _ in moe_routers(model)] == expected
    assert moe_layers(model.config) == expected


# --- per-layer values on a DeepSeek-V3 with a dense decoder layer 0 ---


def with_router_top_k(model, ks):
    """A copy of `model` whose n-th MoE router picks its own top-ks[n] (renormalised and scaled as the
    model does): routing by the model's code alone, no policy."""
    ref = copy.deepcopy(model)
    routers = list(moe_routers(ref))
    assert len(routers) == len(ks)
    for (_, router), k in zip(routers, ks):
        router.top_k = k
    return ref


def run(model, ids, policy=None, **kw):
    """Logits of a teacher-forced forward with every forward re-routed, and what routing each layer got."""
    with Recorder(model, keep="routing") as rec, torch.no_grad():
        if policy is None:
            logits = model(input_ids=ids).logits
        else:
            with apply(model, policy, phase="all", **kw):
                logits = model(input_ids=ids).logits
    return logits, rec.steps[0].layers


def kept_experts(rec, E=32):
    """[N, E] bool: the experts each token's slots with weight > 0 use (a recorded layer's routing)."""
    hits = torch.zeros(rec.ids.shape[0], E, dtype=torch.long).scatter_add_(1, rec.ids.long(), (rec.weights > 0).long())
    return hits > 0  # a dropped slot repeats a kept expert with weight 0


def ids(seed=0, B=3, L=7):
    return torch.randint(2, 64, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ks", [[2, 3], [3, 2]])
def test_a_per_layer_list_is_indexed_by_moe_layer(ks):
    """cap:k=[a, b] on decoder layers 0 (dense), 1, 2: MoE layer 0 (decoder 1) keeps a experts per token,
    MoE layer 1 (decoder 2) keeps b, exactly the experts and output of the model's own top-a / top-b."""
    model = tiny_model("deepseek_v3", seed=3, num_hidden_layers=3)
    assert [i for i, _ in moe_routers(model)] == [1, 2]
    x = ids()
    got, layers = run(model, x, make_policy("cap", k=ks))
    want, ref_layers = run(with_router_top_k(model, ks), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for decoder_layer, k in zip((1, 2), ks):
        kept = kept_experts(layers[decoder_layer])
        assert (kept.sum(-1) == k).all()
        assert torch.equal(kept, kept_experts(ref_layers[decoder_layer]))


def test_a_cap_schedule_counts_moe_layers():
    """schedule (b, h, e, p) = (2, 5, 3, 2) over num_layers=3 MoE layers of a model with 1 dense + 3 MoE
    decoder layers: b on the first MoE layer (decoder 1), h on the second, e on the last (decoder 3)."""
    model = tiny_model("deepseek_v3", seed=4, num_hidden_layers=4)
    assert [i for i, _ in moe_routers(model)] == [1, 2, 3]
    assert cap_schedule(2, 5, 3, 2, num_layers=3) == [2, 5, 3]
    x = ids(1)
    got, layers = run(model, x, make_policy("cap", schedule=(2, 5, 3, 2), num_layers=3))
    want, ref_layers = run(with_router_top_k(model, [2, 5, 3]), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for decoder_layer, k in zip((1, 2, 3), (2, 5, 3)):
        kept = kept_experts(layers[decoder_layer])
        assert (kept.sum(-1) == k).all(), decoder_layer
        assert torch.equal(kept, kept_experts(ref_layers[decoder_layer]))


@pytest.mark.parametrize("native_at", [0, 1])
def test_a_stacked_similarity_is_indexed_by_moe_layer(native_at):
    """sere with an [L=2, E, E] similarity: at the MoE layer whose matrix is the identity every
    secondary expert is critical (kept), so that layer routes natively; at the other (all ones) the
    secondary experts move onto primary ones."""
    model = tiny_model("deepseek_v3", seed=5, num_hidden_layers=3)
    E = 32
    sims = [torch.ones(E, E), torch.ones(E, E)]
    sims[native_at] = torch.eye(E)
    x = ids(2, B=4, L=5)
    _, layers = run(model, x, make_policy("sere", similarity=torch.stack(sims), threshold=0.5))
    decoder = {0: 1, 1: 2}  # MoE layer -> decoder layer
    native = layers[decoder[native_at]]
    moved = layers[decoder[1 - native_at]]
    assert torch.equal(native.ids, native.native_ids)
    assert not torch.equal(moved.ids, moved.native_ids)
    assert (moved.unique <= moved.native_unique).all() and (moved.unique < moved.native_unique).any()


def test_apply_layers_are_decoder_layers_and_values_moe_layers():
    """layers=[2] re-routes decoder layer 2 only, with the value for MoE layer 1."""
    model = tiny_model("deepseek_v3", seed=6, num_hidden_layers=3)
    x = ids(3)
    handle = apply(model, "cap", k=[6, 1], layers=[2], phase="all")
    assert handle.layers == [2] and handle.moe_layers == {2: 1}
    with Recorder(model, keep="routing") as rec, torch.no_grad():
        model(input_ids=x)
    handle.remove()
    layers = rec.steps[0].layers
    assert torch.equal(layers[1].ids, layers[1].native_ids)
    assert (kept_experts(layers[2]).sum(-1) == 1).all()
    with pytest.raises(ValueError, match=r"layers \[0\] are not MoE layers of this model; give decoder-layer "
                                         r"indices of its MoE layers: \[1, 2\]"):
        apply(model, "cap", k=1, layers=[0])
    with pytest.raises(ValueError, match=r"does not fit MoE layer 1 \(decoder layer 2\).*lists 1 layers"):
        apply(model, "cap", k=[2])


def test_a_trace_is_replayed_by_moe_layer():
    """A trace of the dense-first model keeps decoder layers [1, 2]; replaying cap:k=[6, 1] gives MoE
    layer 0 (decoder 1) native U and MoE layer 1 (decoder 2) the U of cap:k=1."""
    from moe_reroute.metrics import unique_experts

    model = tiny_model("deepseek_v3", seed=7, num_hidden_layers=3)
    with Recorder(model, keep="logits") as rec, torch.no_grad():
        model(input_ids=ids(4, B=1, L=12))
    trace = rec.to_trace().rebatch(1)
    assert trace.layers == [1, 2] and [trace.moe_layer(i) for i in (1, 2)] == [0, 1]
    u = trace.replay(make_policy("cap", k=[6, 1]))

    def by_hand(layer, policy):
        x = trace.logits[layer]
        return torch.stack([unique_experts(policy(x[s], trace.specs[layer], trace.valid[s]), 32)
                            for s in range(trace.steps)])

    assert torch.equal(u[1], by_hand(1, make_policy("native")))
    assert torch.equal(u[2], by_hand(2, make_policy("cap", k=1)))
    assert not torch.equal(u[2], by_hand(2, make_policy("native")))
    with pytest.raises(ValueError, match=r"layer 0 is not in this trace; it holds decoder layers \[1, 2\]"):
        trace.moe_layer(0)


def test_calibrated_similarity_is_keyed_by_moe_layer(tmp_path):
    from moe_reroute.hf import calibrate_similarity, load_similarity, save_similarity

    model = tiny_model("deepseek_v3", seed=8, num_hidden_layers=3)
    sims = calibrate_similarity(model, ids(5, B=2, L=8), method="cosine", progress=False)
    assert sorted(sims) == [0, 1]
    path = save_similarity(sims, tmp_path / "sim.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["layers"] == "moe"
    assert sorted(load_similarity(path, num_experts=32)) == [0, 1]
    apply(model, "sere", similarity=load_similarity(path)).remove()  # one matrix per MoE layer fits
