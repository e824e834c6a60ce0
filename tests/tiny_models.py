"""Tiny random-weight configs of the six supported MoE architectures (no downloads)."""

from __future__ import annotations

ARCHS = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "gpt_oss"]

COMMON = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def tiny_configs(**overrides):
    """{arch: tiny config}; `overrides` (e.g. num_hidden_layers=4) go to every config."""
    from transformers import (
        DeepseekV3Config,
        GptOssConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    def kw(**fields):
        return {**COMMON, **fields, **overrides}

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
