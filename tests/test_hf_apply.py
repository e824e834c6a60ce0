"""The transformers adapter on tiny random-weight models of every supported architecture."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_reroute import RouterSpec, make_policy  # noqa: E402
from moe_reroute.hf import Recorder, apply, moe_routers  # noqa: E402
from tiny_models import ARCHS, tiny_model  # noqa: E402

PAD = 0


def prompts(B=3, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(1, B):  # left padding of different lengths
        ids[b, : b % L] = PAD
        mask[b, : b % L] = 0
    return ids, mask


def greedy(model, ids, mask, n=6):
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD,
        eos_token_id=None, suppress_tokens=[PAD], return_dict_in_generate=True, output_logits=True,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def no_hooks_left(model):
    from moe_reroute.hf.apply import decoder

    assert not decoder(model)._forward_pre_hooks
    for _, r in moe_routers(model):
        assert not r._forward_hooks


@pytest.mark.parametrize("arch", ARCHS)
def test_native_is_identical_and_removal_restores(arch):
    model = tiny_model(arch)
    ids, mask = prompts()
    seq0, logits0 = greedy(model, ids, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with apply(model, "native", phase="all"):
        seq1, logits1 = greedy(model, ids, mask)
    assert torch.equal(seq0, seq1)
    assert torch.equal(logits0, logits1)
    no_hooks_left(model)
    handle = apply(model, "cap", k=1)
    seq2, _ = greedy(model, ids, mask)
    handle.remove()
    seq3, logits3 = greedy(model, ids, mask)
    assert torch.equal(seq0, seq3) and torch.equal(logits0, logits3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    no_hooks_left(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_oea_never_activates_more_than_native(arch):
    model = tiny_model(arch, seed=1)
    ids, mask = prompts(B=4)
    with apply(model, "oea", k0=1), Recorder(model) as rec:
        greedy(model, ids, mask)
    decode_steps = [s for s in rec.steps if s.new_tokens == 1]
    assert len(decode_steps) == 5  # 6 new tokens: one prefill, five decode forwards
    for layer, u in rec.unique_per_layer(decode_only=True).items():
        assert u.shape == (5,) and (u <= rec.unique_per_layer(native=True, decode_only=True)[layer]).all()
    fewer = 0
    for step in rec.steps:
        assert set(step.layers) == {i for i, _ in moe_routers(model)}
        for r in step.layers.values():
            if step.new_tokens == 1:
                assert (r.unique <= r.native_unique).all()
                fewer += int((r.unique < r.native_unique).sum())
            else:  # prefill routes natively by default
                assert torch.equal(r.unique, r.native_unique)
    assert fewer > 0, "oea k0=1 never reduced U on a batch of 4"


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_of_k_on_one_sequence_decodes_as_native(arch):
    model = tiny_model(arch, seed=2)
    K = RouterSpec.from_config(model.config).top_k
    ids, mask = prompts(B=1, L=4, seed=3)
    seq0, logits0 = greedy(model, ids, mask, n=8)
    with apply(model, "budget", budget=K):  # prefill native; each decode step is a batch of one
        seq1, logits1 = greedy(model, ids, mask, n=8)
    assert torch.equal(seq0, seq1)
    torch.testing.assert_close(logits0, logits1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_decode_simulation_agrees_with_step_by_step_decode(arch):
    """One teacher-forced forward with phase='decode-sim' sees the same batches as decoding step by step
    with a KV cache: same U per layer and step, logits equal up to KV-cache numerics."""
    model = tiny_model(arch, seed=4)
    B, L = 4, 7
    ids = torch.randint(2, 64, (B, L), generator=torch.Generator().manual_seed(5))
    policy = make_policy("oea", k0=1)
    with apply(model, policy, phase="decode-sim"), Recorder(model) as sim, torch.no_grad():
        sim_logits = model(input_ids=ids).logits
    cache = transformers.DynamicCache(config=model.config)
    step_logits = []
    with apply(model, policy), Recorder(model) as steps, torch.no_grad():
        for t in range(L):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            step_logits.append(out.logits[:, 0])
    torch.testing.assert_close(torch.stack(step_logits, 1), sim_logits, rtol=1e-4, atol=1e-4)
    sim_u, step_u = sim.unique_per_layer(), steps.unique_per_layer()
    assert sim_u.keys() == step_u.keys()
    for layer in sim_u:
        assert torch.equal(sim_u[layer], step_u[layer])
        assert (sim_u[layer] <= sim.unique_per_layer(native=True)[layer]).all()


def test_padding_and_finished_sequences_are_invalid():
    model = tiny_model("qwen3_moe")
    ids, mask = prompts(B=3, L=5)
    with Recorder(model, keep="routing") as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        # a decode step in which sequence 0 already finished: generate() feeds it the pad token
        step = torch.tensor([[PAD], [7], [9]])
        model(input_ids=step, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1))
    prefill, decode = rec.steps
    first = next(iter(prefill.layers.values()))
    assert torch.equal(first.valid, mask.bool())
    assert next(iter(decode.layers.values())).valid[:, 0].tolist() == [False, True, True]


def test_per_layer_parameters_and_layer_subset():
    model = tiny_model("qwen3_moe", seed=6)
    ids, mask = prompts(B=4)
    with apply(model, "cap", k={1: 1}, layers=[1]), Recorder(model, keep="routing") as rec:
        greedy(model, ids, mask, n=3)
    for step in rec.steps[1:]:
        assert torch.equal(step.layers[0].ids, step.layers[0].native_ids)  # layer 0 untouched
        kept = (step.layers[1].weights > 0).sum(-1)
        assert (kept == 1).all()


def test_errors_leave_the_model_as_it_was():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="does not fit MoE layer 0 .decoder layer 0.*E=8"):
        apply(model, "sere", similarity=torch.eye(16))
    with pytest.raises(ValueError, match="does not fit MoE layer 1 .decoder layer 1.*lists 1 layers"):
        apply(model, "oea", k0=[1])
    with pytest.raises(ValueError, match="k0=3 > the model's K=2"):
        apply(model, "oea", k0=3)
    with pytest.raises(ValueError, match=r"layers \[5\] are not MoE layers"):
        apply(model, "oea", k0=1, layers=[5])
    with pytest.raises(ValueError, match="phase must be one of"):
        apply(model, "oea", k0=1, phase="prefill")
    no_hooks_left(model)


def test_unsupported_model_lists_supported_ones():
    from transformers import AutoModelForCausalLM, LlamaConfig

    llama = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=32, hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16)
    )
    with pytest.raises(ValueError, match="qwen3_moe, qwen2_moe, olmoe, mixtral, deepseek_v3, gpt_oss"):
        apply(llama, "oea", k0=1)


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe", "minimax_m2"])
def test_correction_bias_is_read_where_the_model_keeps_it(arch):
    """The sigmoid routers' correction bias: on the router (DeepSeek-V3, GLM-4.5) or on the MoE block, which
    passes it to the router (MiniMax-M2). With a bias that moves the choice, `native` still gives the stock
    model's tokens and logits, and `layer_spec` holds each layer's own bias."""
    from moe_reroute.hf.apply import decoder, layer_spec

    model = tiny_model(arch, seed=5)
    spec = RouterSpec.from_config(model.config)
    biases = []
    with torch.no_grad():
        for i, router in moe_routers(model):
            owner = router if hasattr(router, "e_score_correction_bias") else decoder(model).layers[i].mlp
            owner.e_score_correction_bias.copy_(torch.randn(spec.num_experts, generator=torch.Generator().manual_seed(i)))
            biases.append(owner.e_score_correction_bias)
    for (_, router), bias in zip(moe_routers(model), biases):
        assert layer_spec(spec, router).e_score_correction_bias is bias
    ids, mask = prompts()
    seq0, logits0 = greedy(model, ids, mask)
    with apply(model, "native", phase="all"):
        seq1, logits1 = greedy(model, ids, mask)
    assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1)
    with torch.no_grad():  # the same model without its bias routes otherwise: the bias mattered here
        for b in biases:
            b.zero_()
    assert not torch.equal(greedy(model, ids, mask)[1], logits0)


def test_qwen3_5_multimodal_model_is_routed_through_its_language_model():
    """Qwen3.5's multimodal class (model.model.language_model.layers, a qwen3_5_moe config): `apply` finds
    its MoE layers, `native` keeps its text generation identical, and `oea` lowers U on a decode batch."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeConfig

    from tiny_models import tiny_configs

    torch.manual_seed(0)
    config = Qwen3_5MoeConfig(text_config=tiny_configs()["qwen3_5_moe_text"].to_dict(),
                              vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16,
                                                 out_hidden_size=32))
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
    assert [i for i, _ in moe_routers(model)] == [0, 1]
    ids, mask = prompts(B=4)
    seq0, logits0 = greedy(model, ids, mask)
    with apply(model, "native", phase="all"):
        seq1, logits1 = greedy(model, ids, mask)
    assert torch.equal(seq0, seq1) and torch.equal(logits0, logits1)
    with apply(model, "oea", k0=1), Recorder(model) as rec:
        greedy(model, ids, mask)
    u, native = rec.unique_per_layer(decode_only=True), rec.unique_per_layer(native=True, decode_only=True)
    assert all((u[layer] <= native[layer]).all() for layer in u)
    assert sum(int((u[layer] < native[layer]).sum()) for layer in u) > 0
