"""`native` reproduces transformers' own routers bit for bit, on tiny random-weight models of all six
architectures, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_reroute import RouterSpec, make_policy  # noqa: E402
from tiny_models import tiny_configs  # noqa: E402

def routers(model):
    for layer in model.model.layers:
        mlp = layer.mlp
        router = getattr(mlp, "router", None) or getattr(mlp, "gate", None)
        if router is not None and hasattr(router, "top_k"):
            yield router


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_is_bit_exact(arch, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_configs()[arch]
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    spec = RouterSpec.from_config(model.config)
    assert spec.arch == arch
    found = 0
    for router in routers(model):
        found += 1
        with torch.no_grad():
            router.weight.normal_(0, 1.0)
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.copy_(torch.randn_like(router.e_score_correction_bias) * 0.1)
            hidden = torch.randn(37, config.hidden_size, dtype=dtype)
            logits, weights, ids = router(hidden)
        layer_spec = spec.with_bias(getattr(router, "e_score_correction_bias", None))
        r = make_policy("native")(logits, layer_spec)
        assert torch.equal(r.ids, ids), f"{arch}: ids differ"
        assert r.weights.dtype == torch.float32
        mine = r.weights.to(layer_spec.model_weights_dtype(logits.dtype))
        assert mine.dtype == weights.dtype
        assert torch.equal(mine, weights), f"{arch}: weights differ"
    assert found >= 1


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_spec_from_config_reads_the_router(arch):
    config = tiny_configs()[arch]
    spec = RouterSpec.from_config(config)
    expected = {
        "qwen3_moe": (16, 4, "softmax", True),
        "qwen2_moe": (12, 3, "softmax", False),
        "olmoe": (16, 8, "softmax", False),
        "mixtral": (8, 2, "softmax", True),
        "deepseek_v3": (32, 6, "sigmoid", True),
        "gpt_oss": (16, 4, "topk_softmax", True),
    }[arch]
    assert (spec.num_experts, spec.top_k, spec.scoring, spec.renormalize) == expected
    if arch == "deepseek_v3":
        assert (spec.n_group, spec.topk_group, spec.routed_scaling_factor) == (4, 2, 2.5)


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="qwen3_moe.*gpt_oss"):
        RouterSpec.from_config(LlamaConfig())
