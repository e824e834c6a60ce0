"""`native` reproduces transformers' own routers bit for bit, on tiny random-weight models of every supported
architecture, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_reroute import RouterSpec, make_policy  # noqa: E402
from tiny_models import ARCHS, tiny_configs  # noqa: E402

def routers(model):
    """(router, its MoE block) of each MoE layer, found by hand."""
    for layer in model.model.layers:
        mlp = layer.mlp
        router = getattr(mlp, "router", None) or getattr(mlp, "gate", None)
        if router is not None and hasattr(router, "top_k"):
            yield router, mlp


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_is_bit_exact(arch, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_configs()[arch]
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    spec = RouterSpec.from_config(model.config)
    assert spec.arch == arch
    found = 0
    for router, block in routers(model):
        found += 1
        owner = router if hasattr(router, "e_score_correction_bias") else block  # MiniMax-M2: the block's
        bias = getattr(owner, "e_score_correction_bias", None)
        with torch.no_grad():
            router.weight.normal_(0, 1.0)
            if bias is not None:
                bias.copy_(torch.randn_like(bias) * 0.1)
            hidden = torch.randn(37, config.hidden_size, dtype=dtype)
            logits, weights, ids = router(hidden) if owner is router or bias is None else router(hidden, bias)
        layer_spec = spec.with_bias(bias)
        r = make_policy("native")(logits, layer_spec)
        assert torch.equal(r.ids, ids), f"{arch}: ids differ"
        assert r.weights.dtype == torch.float32
        mine = r.weights.to(layer_spec.model_weights_dtype(logits.dtype))
        assert mine.dtype == weights.dtype
        assert torch.equal(mine, weights), f"{arch}: weights differ"
    assert found >= 1


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_from_config_reads_the_router(arch):
    config = tiny_configs()[arch]
    spec = RouterSpec.from_config(config)
    expected = {  # E, K, scoring, renormalize, weights in the logits' dtype
        "qwen3_moe": (16, 4, "softmax", True, True),
        "qwen2_moe": (12, 3, "softmax", False, True),
        "olmoe": (16, 8, "softmax", False, True),
        "mixtral": (8, 2, "softmax", True, False),
        "deepseek_v3": (32, 6, "sigmoid", True, False),
        "gpt_oss": (16, 4, "topk_softmax", True, True),
        "qwen3_next": (16, 4, "softmax", True, True),
        "qwen3_5_moe_text": (12, 3, "softmax", True, True),
        "glm4_moe": (32, 6, "sigmoid", True, False),
        "dots1": (16, 4, "sigmoid", False, False),
        "minimax_m2": (16, 4, "sigmoid", True, False),
    }[arch]
    assert (spec.num_experts, spec.top_k, spec.scoring, spec.renormalize, spec.weights_in_logits_dtype) == expected
    assert spec.arch == arch
    groups = {"deepseek_v3": (4, 2, 2.5), "glm4_moe": (4, 2, 2.5), "dots1": (1, 1, 1.5)}.get(arch, (1, 1, 1.0))
    assert (spec.n_group, spec.topk_group, spec.routed_scaling_factor) == groups


def test_qwen3_5_multimodal_config_is_read_by_its_language_model():
    """Qwen3.5's checkpoints are multimodal (model_type qwen3_5_moe): the spec and the MoE layers come from
    its text config, as vLLM reads it (hf_text_config)."""
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeConfig

    from moe_reroute.contract import moe_layers

    text = tiny_configs()["qwen3_5_moe_text"]
    config = Qwen3_5MoeConfig(text_config=text.to_dict())
    assert config.model_type == "qwen3_5_moe"
    assert RouterSpec.from_config(config) == RouterSpec.from_config(text)
    assert moe_layers(config) == moe_layers(text) == [0, 1]


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="qwen3_moe.*gpt_oss"):
        RouterSpec.from_config(LlamaConfig())
