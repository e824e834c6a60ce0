"""Tiny random-weight configs of the supported MoE architectures (no downloads)."""

from __future__ import annotations

ARCHS = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "gpt_oss",
         "qwen3_next", "qwen3_5_moe_text", "glm4_moe", "dots1", "minimax_m2"]
# Qwen3-Next and Qwen3.5-MoE: one linear-attention (Gated DeltaNet, torch fallback on CPU) and one full
# attention layer
LINEAR_ATTENTION = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                        layer_types=["linear_attention", "full_attention"])

COMMON = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def tiny_configs(**overrides):
    """{arch: tiny config}; `overrides` (e.g. num_hidden_layers=4) go to every config."""
    from transformers import (
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
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    def kw(**fields):
        return {**COMMON, **fields, **overrides}

    def linear(**fields):  # the layer types follow num_hidden_layers: linear attention, then full, repeated
        L = overrides.get("num_hidden_layers", COMMON["num_hidden_layers"])
        types = [("linear_attention", "full_attention")[i % 2] for i in range(L)]
        return kw(**LINEAR_ATTENTION, **fields) | {"layer_types": types}

    return {
        "qwen3_moe": Qwen3MoeConfig(**kw(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
                                         norm_topk_prob=True, head_dim=8)),
        "qwen2_moe": Qwen2MoeConfig(**kw(num_experts=12, num_experts_per_tok=3, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=16, norm_topk_prob=False)),
        "olmoe": OlmoeConfig(**kw(num_experts=16, num_experts_per_tok=8, intermediate_size=16)),
        "mixtral": MixtralConfig(**kw(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16)),
        "deepseek_v3": DeepseekV3Config(**kw(num_key_value_heads=4, n_routed_experts=32, num_experts_per_tok=6,
                                             n_group=4, topk_group=2, moe_intermediate_size=16, intermediate_size=32,
                                             first_k_dense_replace=1, routed_scaling_factor=2.5, n_shared_experts=1,
                                             q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=8)),
        "gpt_oss": GptOssConfig(**kw(num_local_experts=16, num_experts_per_tok=4, intermediate_size=16, head_dim=8)),
        "qwen3_next": Qwen3NextConfig(**linear(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
                                               shared_expert_intermediate_size=16, norm_topk_prob=True, head_dim=8)),
        "qwen3_5_moe_text": Qwen3_5MoeTextConfig(**linear(num_experts=12, num_experts_per_tok=3, moe_intermediate_size=16,
                                                          shared_expert_intermediate_size=16, head_dim=8)),
        "glm4_moe": Glm4MoeConfig(**kw(n_routed_experts=32, num_experts_per_tok=6, n_group=4, topk_group=2,
                                       moe_intermediate_size=16, intermediate_size=32, first_k_dense_replace=1,
                                       routed_scaling_factor=2.5, n_shared_experts=1, head_dim=8)),
        "dots1": Dots1Config(**kw(n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1,
                                  moe_intermediate_size=16, intermediate_size=32, first_k_dense_replace=1,
                                  routed_scaling_factor=1.5, n_shared_experts=1, head_dim=8)),
        "minimax_m2": MiniMaxM2Config(**kw(num_local_experts=16, num_experts_per_tok=4, intermediate_size=16,
                                           head_dim=8, bos_token_id=1, eos_token_id=2)),
    }


def tiny_model(arch, seed=0, dtype=None, **overrides):
    """A tiny random model of `arch`, eval mode, float32, with routers spread enough to matter
    (but not so far that DeepSeek's sigmoid saturates into ties). `overrides` change its config
    (e.g. `tiny_model("deepseek_v3", num_hidden_layers=4)`: a dense layer 0, then 3 MoE layers)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_configs(**overrides)[arch]).eval()
    model.generation_config.pad_token_id = 0  # the tests' pad token; generation suppresses it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(0, 0.3)
    return model


def tiny_tokenizer():
    """A character-level tokenizer over 63 symbols ([PAD] = 0), for the tiny models' vocabulary of 64."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + " .,\n!?'-:"
    vocab = {"[PAD]": 0, "[UNK]": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
