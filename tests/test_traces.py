"""Traces: record, save, load, replay (same U as live), concatenate, re-batch; calibration on a model."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_reroute import make_policy, traces  # noqa: E402
from moe_reroute.hf import Recorder, apply, calibrate_similarity, load_similarity, save_similarity  # noqa: E402
from moe_reroute.traces import Trace  # noqa: E402
from tiny_models import ARCHS, tiny_model  # noqa: E402


def teacher_forced_trace(model, B=4, L=6, seed=0, policy=None):
    ids = torch.randint(2, 64, (B, L), generator=torch.Generator().manual_seed(seed))
    with Recorder(model, keep="logits") as rec, torch.no_grad():
        if policy is None:
            model(input_ids=ids)
        else:
            with apply(model, policy, phase="decode-sim"):
                model(input_ids=ids)
    return rec


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_replay_on_saved_trace_equals_live(arch, tmp_path):
    model = tiny_model(arch, seed=1)
    policy = make_policy("oea", k0=1)
    rec = teacher_forced_trace(model, policy=policy)
    path = rec.to_trace().save(tmp_path / "t.safetensors")
    trace = traces.load(path)
    assert (trace.steps, trace.batch_size) == (6, 4)
    assert trace.meta["model"]
    trace.check_compatible(model)
    replayed = trace.replay(policy)
    live = rec.unique_per_layer()
    assert replayed.keys() == live.keys()
    for layer in live:
        assert torch.equal(replayed[layer], live[layer]), layer
    native = trace.replay(make_policy("native"))
    for layer in live:
        assert torch.equal(native[layer], rec.unique_per_layer(native=True)[layer])


def test_generate_trace_replays_decode_steps():
    model = tiny_model("qwen3_moe", seed=2)
    ids = torch.randint(2, 64, (3, 4), generator=torch.Generator().manual_seed(0))
    policy = make_policy("budget", budget=6)
    with apply(model, policy), Recorder(model, keep="logits") as rec:
        model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, suppress_tokens=[0])
    trace = rec.to_trace(decode_only=True)
    assert trace.steps == 4
    assert torch.equal(trace.replay(policy)[1], rec.unique_per_layer(decode_only=True)[1])


def test_concat_and_rebatch_against_hand_layout():
    model = tiny_model("olmoe", seed=3)
    singles = [teacher_forced_trace(model, B=1, L=5 + i % 2, seed=i).to_trace() for i in range(6)]
    big = Trace.concat(singles)
    assert (big.steps, big.batch_size) == (6, 6)
    assert big.valid[5].tolist() == [i % 2 == 1 for i in range(6)]  # the 5-step sequences are padded
    b2 = big.rebatch(2)
    assert (b2.steps, b2.batch_size) == (18, 2)
    for layer in big.layers:
        for g in range(3):  # group g holds sequences 2g, 2g+1; its steps follow group g-1's
            for s in range(6):
                assert torch.equal(b2.logits[layer][g * 6 + s], big.logits[layer][s, 2 * g : 2 * g + 2])
    # U of batch-of-one replay equals each single trace's own replay
    policy = make_policy("oea", k0=2)
    one = big.rebatch(1).replay(policy)
    for i, t in enumerate(singles):
        for layer, u in t.replay(policy).items():
            assert torch.equal(one[layer][i * 6 : i * 6 + t.steps], u)
    with pytest.raises(ValueError, match="batch size 7 needs 1 <= it <= the trace's 6 sequences"):
        big.rebatch(7)


def test_trace_errors(tmp_path):
    qwen = tiny_model("qwen3_moe")
    trace = teacher_forced_trace(qwen).to_trace()
    with pytest.raises(ValueError, match="routes as"):
        trace.check_compatible(tiny_model("olmoe"))
    with pytest.raises(ValueError, match="different batch sizes"):
        with Recorder(qwen, keep="logits") as rec, torch.no_grad():
            qwen(input_ids=torch.ones(2, 3, dtype=torch.long))
            qwen(input_ids=torch.ones(3, 3, dtype=torch.long))
        rec.to_trace()
    with Recorder(qwen) as counts_only, pytest.raises(ValueError, match='keep="logits"'):
        counts_only.to_trace()
    other = tmp_path / "x.safetensors"
    save_similarity({0: torch.eye(4)}, other)
    with pytest.raises(ValueError, match="not a moe-reroute trace"):
        traces.load(other)
    with pytest.raises(FileNotFoundError):
        traces.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("arch", ARCHS)
def test_calibrate_similarity_matches_direct_expert_outputs(arch, tmp_path):
    """The similarity equals the formula applied to each expert's output computed by hand."""
    from moe_reroute.calibration import expert_similarity
    from moe_reroute.hf.apply import decoder, moe_routers

    model = tiny_model(arch, seed=4)
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    sims = calibrate_similarity(model, ids, method="cosine", experts_per_chunk=3, progress=False)
    layers = [i for i, _ in moe_routers(model)]
    assert sorted(sims) == list(range(len(layers)))  # keyed by MoE-layer index (DeepSeek-V3: layer 0 is dense)
    layer, moe = layers[-1], len(layers) - 1
    captured = {}

    def grab(module, args):
        captured.setdefault("x", args[0].detach())

    handle = decoder(model).layers[layer].mlp.experts.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = captured["x"]
    experts = decoder(model).layers[layer].mlp.experts
    E = sims[moe].shape[0]
    with torch.no_grad():  # expert e alone: route every token to e with weight 1
        outs = torch.stack([
            experts(x, torch.full((x.shape[0], 1), e), torch.ones(x.shape[0], 1)) for e in range(E)
        ])
    torch.testing.assert_close(sims[moe], expert_similarity(outs, "cosine"))
    path = save_similarity(sims, tmp_path / "sim.safetensors")
    loaded = load_similarity(path, num_experts=E)
    policy = make_policy("sere", similarity=loaded)
    with apply(model, policy, phase="decode-sim"), torch.no_grad():
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"expected \[7, 7\]"):
        load_similarity(path, num_experts=7)


def test_save_copies_tensors_that_share_memory(tmp_path):
    """Layers given one bias tensor, and logits sliced from one stacked tensor, save and load back."""
    from moe_reroute import RouterSpec

    bias = torch.linspace(-1, 1, 8)
    spec = RouterSpec(num_experts=8, top_k=2, scoring="sigmoid", renormalize=True).with_bias(bias)
    stacked = torch.randn(2, 5, 3, 8)  # [layers, S, B, E]
    trace = Trace({0: stacked[0], 1: stacked[1]}, torch.ones(5, 3, dtype=torch.bool), {0: spec, 1: spec})
    back = traces.load(trace.save(tmp_path / "t.safetensors"))
    assert torch.equal(back.logits[0], stacked[0]) and torch.equal(back.logits[1], stacked[1])
    assert all(torch.equal(back.specs[k].e_score_correction_bias, bias) for k in (0, 1))
    assert torch.equal(back.replay(make_policy("oea", k0=1))[1], trace.replay(make_policy("oea", k0=1))[1])
