"""The SGLang plugin, by contract tests: SGLang has no CPU build, so no engine runs here.

The signatures below were read from SGLang 0.5.23 (`sglang/srt/layers/moe/topk.py`,
`sglang/srt/model_executor/forward_context.py` and `forward_batch_info.py`,
`sglang/srt/managers/schedule_batch.py`, `sglang/srt/plugins/`). The hook is driven through a plain-torch
stand-in of `select_experts` with exactly that signature, on the paths the hook uses, and reads its step
from stand-ins of `ForwardMode` and `ForwardBatch`; ids are compared with `make_policy(...)` applied
directly (with `fixed` for a mixed step's prefill rows), and native routing with SGLang's own top-k.
When SGLang's source is installed, `test_installed_sglang_matches_the_recorded_contract` checks the
recorded contract against it (by reading the files: its modules need a GPU build to import).
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import enum
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from moe_reroute.contract import RouterSpec
from moe_reroute.policies import make_policy
from moe_reroute.sglang import plugin
from moe_reroute.serving import config as plugin_config
from moe_reroute.serving.distinct import distinct_ids

# --- the contract, as read from SGLang 0.5.23 ---

# def select_experts(hidden_states, router_logits, topk_config, *, layer_id=None, num_token_non_padded=None,
#                    expert_location_dispatch_info=None, dynamic_expert_bias=None, router_logits_partials=None)
SELECT_EXPERTS_POSITIONAL = ["hidden_states", "router_logits", "topk_config"]
SELECT_EXPERTS_KEYWORD = [
    "layer_id",
    "num_token_non_padded",
    "expert_location_dispatch_info",
    "dynamic_expert_bias",
    "router_logits_partials",
]
# select_experts calls custom_routing_function(hidden_states=..., gating_output=..., topk=..., renormalize=...)
CUSTOM_ROUTING_KEYWORDS = ["hidden_states", "gating_output", "topk", "renormalize"]
OUTPUT_FIELDS = ["topk_weights", "topk_ids", "router_logits"]  # StandardTopKOutput(NamedTuple)
PLUGIN_GROUP = "sglang.srt.plugins"
RENORMALIZE_EPS = 1e-20  # topk.py: _RENORMALIZE_SUM_EPSILON


@dataclasses.dataclass
class TopKConfig:
    """The fields of SGLang 0.5.23's TopKConfig the hook reads (the rest it copies untouched)."""

    top_k: int
    use_grouped_topk: bool = False
    topk_group: int | None = None
    num_expert_group: int | None = None
    renormalize: bool = True
    custom_routing_function: Callable | None = None
    correction_bias: torch.Tensor | None = None
    torch_native: bool = False
    routed_scaling_factor: float | None = None
    apply_routed_scaling_factor_on_output: bool = False
    scoring_func: str = "softmax"
    sqrtsoftplus_log1p: bool = False
    fused_gate_packed_ids: bool = False
    layer_id: int | None = None
    shared_slots: int = 0

    @property
    def num_shared_topk_slots(self) -> int:
        return self.shared_slots


StandardTopKOutput = collections.namedtuple("StandardTopKOutput", OUTPUT_FIELDS)


@dataclasses.dataclass(frozen=True)
class ForwardContext:
    attn_backend: Any
    moe_num_token_non_padded: Callable | None = None


CALLS: list[dict] = []  # keyword arguments each custom_routing_function call received


def select_experts(
    hidden_states,
    router_logits,
    topk_config,
    *,
    layer_id=None,
    num_token_non_padded=None,
    expert_location_dispatch_info=None,
    dynamic_expert_bias=None,
    router_logits_partials=None,
):
    """Stand-in for SGLang 0.5.23's select_experts on the paths the hook meets (CUDA, no shared experts).

    Algorithm:
    1. Grouped with a bias (biased_grouped_topk): sigmoid scores; choose by score + bias within the
       topk_group groups of best top-2 sum; weights are the unbiased scores. Otherwise, without a custom
       function (fused_topk): softmax (or sigmoid) in float32, top-k. Otherwise the custom function,
       called by keyword.
    2. Renormalise (built-in paths): w / (sum(w) + 1e-20).
    3. Times routed_scaling_factor when apply_routed_scaling_factor_on_output.
    4. Logical -> physical ids through the EPLB table (`info.log2phy`), then rows >= num_token_non_padded
       get id -1.
    5. StandardTopKOutput(float32 weights, int32 ids, router_logits).
    """
    cfg, K = topk_config, topk_config.top_k
    x = router_logits.float()  # [T, E]
    if cfg.use_grouped_topk and cfg.correction_bias is not None:
        T, E = x.shape
        scores = x.sigmoid()
        choice = scores + cfg.correction_bias.float()
        group = choice.view(T, cfg.num_expert_group, -1).topk(2, dim=-1)[0].sum(-1)  # [T, G]
        keep = torch.zeros_like(group).scatter_(1, group.topk(cfg.topk_group, dim=-1)[1], 1)
        mask = keep.unsqueeze(-1).expand(T, cfg.num_expert_group, E // cfg.num_expert_group).reshape(T, E)
        ids = choice.masked_fill(~mask.bool(), float("-inf")).topk(K, dim=-1)[1]
        weights = scores.gather(1, ids)
    elif cfg.custom_routing_function is None:
        scores = x.softmax(-1) if cfg.scoring_func == "softmax" else x.sigmoid()
        weights, ids = scores.topk(K, dim=-1)
    else:
        CALLS.append({})
        weights, ids = cfg.custom_routing_function(
            hidden_states=hidden_states, gating_output=router_logits, topk=K, renormalize=cfg.renormalize
        )
        CALLS[-1] = {"weights": weights, "ids": ids}
    if cfg.custom_routing_function is None and cfg.renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + RENORMALIZE_EPS)
    if cfg.apply_routed_scaling_factor_on_output and cfg.routed_scaling_factor is not None:
        weights = weights * cfg.routed_scaling_factor
    ids = ids.to(torch.int32)
    if expert_location_dispatch_info is not None:
        ids = expert_location_dispatch_info.log2phy[ids.long()].to(torch.int32)
    if num_token_non_padded is not None:
        rows = torch.arange(ids.shape[0])
        ids = ids.masked_fill((rows >= num_token_non_padded)[:, None], -1)
    return StandardTopKOutput(weights.to(torch.float32), ids, router_logits)


def hook_for(policy: str, step: tuple = ("decode", None), model_config: Any = None) -> plugin.SelectExpertsHook:
    """The hook on a step of the given (kind, fixed rows), with `model_config` standing for the served
    model's transformers config (None: unreadable)."""
    return plugin.SelectExpertsHook(plugin_config.parse(policy), step=lambda T, device: step,
                                    model_config=lambda: model_config)


# A DeepSeek-V3 whose decoder layer 0 is dense: decoder layers 1, 2, 3 are MoE layers 0, 1, 2.
DENSE_FIRST = types.SimpleNamespace(model_type="deepseek_v3", num_hidden_layers=4, first_k_dense_replace=1,
                                    moe_layer_freq=1, n_routed_experts=16)


def call(hook, logits, cfg, **kw):
    """As SGLang's TopK.forward_cuda calls it: everything by keyword."""
    hidden = torch.zeros(logits.shape[0], 8)
    return hook(select_experts, hidden_states=hidden, layer_id=kw.pop("layer_id", 3), router_logits=logits,
                topk_config=cfg, **kw)


def deepseek_config(E=32, K=4, seed=0):
    bias = torch.randn(E, generator=torch.Generator().manual_seed(seed)) * 0.1
    return TopKConfig(top_k=K, use_grouped_topk=True, num_expert_group=4, topk_group=2, correction_bias=bias,
                      scoring_func="sigmoid", routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True)


def assert_same_routing(a, b):
    sa, ia = a.topk_ids.sort(-1)
    sb, ib = b.topk_ids.sort(-1)
    assert torch.equal(sa, sb)
    torch.testing.assert_close(a.topk_weights.gather(1, ia), b.topk_weights.gather(1, ib), rtol=1e-6, atol=1e-7)


# --- the recorded contract and the plugin agree ---


def test_plugin_expects_the_recorded_signatures():
    assert plugin.SELECT_EXPERTS_PARAMS == tuple(SELECT_EXPERTS_POSITIONAL + SELECT_EXPERTS_KEYWORD)
    assert plugin.CUSTOM_ROUTING_PARAMS == tuple(CUSTOM_ROUTING_KEYWORDS)
    assert plugin.OUTPUT_FIELDS == tuple(OUTPUT_FIELDS)
    assert plugin.TARGET == "sglang.srt.layers.moe.topk.select_experts"
    assert plugin.check_seams(select_experts, TopKConfig, StandardTopKOutput, ForwardContext) == []

    def other(hidden_states, router_logits, topk_config, *, layer_id=None, num_token_non_padded=None):
        pass

    Out = collections.namedtuple("Out", ["topk_weights", "topk_ids"])
    problems = plugin.check_seams(other, TopKConfig, Out, ForwardContext)
    assert len(problems) == 2 and "select_experts" in problems[0] and "StandardTopKOutput" in problems[1]


def test_entry_point_is_registered_under_sglangs_plugin_group():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"][PLUGIN_GROUP] == {"moe_reroute": "moe_reroute.sglang.plugin:register"}


# --- routing through the hook ---


@pytest.mark.parametrize("renormalize", [True, False])
def test_native_policy_gives_sglangs_softmax_topk(renormalize, logits_factory):
    logits = logits_factory(12, 16, torch.bfloat16)
    cfg = TopKConfig(top_k=4, renormalize=renormalize)
    out = call(hook_for("native"), logits, cfg)
    ref = select_experts(torch.zeros(12, 8), logits, cfg, layer_id=3)
    assert type(out) is StandardTopKOutput and out.router_logits is logits
    assert out.topk_weights.dtype == torch.float32 and out.topk_ids.dtype == torch.int32
    assert_same_routing(out, ref)
    assert cfg.custom_routing_function is None and not cfg.use_grouped_topk  # the layer's config is untouched


def test_native_policy_gives_sglangs_deepseek_v3_routing(logits_factory):
    logits = logits_factory(10, 32, torch.bfloat16, seed=4)
    cfg = deepseek_config()
    out = call(hook_for("native"), logits, cfg)
    assert_same_routing(out, select_experts(torch.zeros(10, 8), logits, cfg))
    assert cfg.use_grouped_topk  # the hook routed a copy


@pytest.mark.parametrize("policy, name, params", [("oea:k0=1", "oea", {"k0": 1}), ("cap:k=2", "cap", {"k": 2}),
                                                  ("budget:budget=6", "budget", {"budget": 6})])
@pytest.mark.parametrize("deepseek", [False, True])
def test_policy_ids_with_padding_and_eplb(policy, name, params, deepseek, logits_factory):
    T, E, K = 16, 32, 4
    logits = logits_factory(T, E, torch.float32, seed=7)
    cfg = deepseek_config(E, K) if deepseek else TopKConfig(top_k=K)
    n_real = torch.tensor([13])  # rows 13..15 are CUDA-graph padding
    log2phy = torch.randperm(E, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    info = types.SimpleNamespace(ep_dispatch_algorithm="static", log2phy=log2phy)
    out = call(hook_for(policy), logits, cfg, num_token_non_padded=n_real, expert_location_dispatch_info=info)

    spec = (RouterSpec(E, K, "sigmoid", True, n_group=4, topk_group=2, e_score_correction_bias=cfg.correction_bias,
                       weights_in_logits_dtype=False) if deepseek else RouterSpec(E, K))
    valid = torch.arange(T) < 13
    expected = distinct_ids(make_policy(name, **params)(logits, spec, valid, layer=3), E)  # dropped slots made distinct for SGLang's MoE
    scale = 2.5 if deepseek else 1.0
    assert torch.equal(out.topk_ids[:13], log2phy[expected.ids[:13]])  # the policy's ids, then SGLang's EPLB map
    assert (out.topk_ids[13:] == -1).all()  # SGLang's padded-row mask
    torch.testing.assert_close(out.topk_weights[:13], expected.weights[:13] * scale)
    native = select_experts(torch.zeros(T, 8), logits, cfg, num_token_non_padded=n_real,
                            expert_location_dispatch_info=info)
    assert out.topk_ids[:13].unique().numel() < native.topk_ids[:13].unique().numel()


def test_padding_rows_never_add_an_expert(logits_factory):
    T, E, K = 12, 16, 4
    logits = logits_factory(T, E, seed=2)
    out_all = call(hook_for("oea:k0=1"), logits[:8], TopKConfig(top_k=K))
    out_pad = call(hook_for("oea:k0=1"), logits, TopKConfig(top_k=K), num_token_non_padded=torch.tensor([8]))
    assert torch.equal(out_pad.topk_ids[:8], out_all.topk_ids) and (out_pad.topk_ids[8:] == -1).all()


def test_positional_call_is_accepted(logits_factory):
    logits = logits_factory(6, 16)
    hook = hook_for("cap:k=2")
    out = hook(select_experts, torch.zeros(6, 8), logits, TopKConfig(top_k=4), layer_id=0)
    assert (out.topk_weights[:, 2:] == 0).all()


def test_custom_routing_function_gets_exactly_sglangs_arguments(logits_factory):
    CALLS.clear()
    logits = logits_factory(5, 16)
    call(hook_for("oea:k0=2"), logits, TopKConfig(top_k=4))
    # The stand-in calls it with exactly the recorded keywords (a function wanting others would raise).
    assert len(CALLS) == 1 and CALLS[0]["ids"].dtype == torch.int32 and CALLS[0]["weights"].dtype == torch.float32


def test_extend_steps_route_natively_and_phase_all_does_not(logits_factory):
    logits = logits_factory(9, 16, seed=3)
    cfg = TopKConfig(top_k=4)
    native = select_experts(torch.zeros(9, 8), logits, cfg)
    assert_same_routing(call(hook_for("oea:k0=1", step=("prefill", None)), logits, cfg), native)
    every = plugin.SelectExpertsHook(plugin_config.parse('{"name": "oea", "k0": 1, "phase": "all"}'),
                                     step=lambda T, device: ("prefill", None))
    expected = distinct_ids(make_policy("oea", k0=1)(logits, RouterSpec(16, 4), layer=3), 16)  # dropped slots made distinct for SGLang's MoE
    assert torch.equal(call(every, logits, cfg).topk_ids, expected.ids.to(torch.int32))


@pytest.mark.parametrize(
    "cfg, kw, why",
    [
        (TopKConfig(top_k=4, custom_routing_function=lambda **kw: None), {}, "custom_routing_function"),
        (TopKConfig(top_k=4, shared_slots=1), {}, "shared experts"),
        (TopKConfig(top_k=4, use_grouped_topk=True, num_expert_group=4, topk_group=2), {}, "group-limited"),
        (TopKConfig(top_k=4, scoring_func="sqrtsoftplus"), {}, "sqrtsoftplus"),
        (TopKConfig(top_k=4, fused_gate_packed_ids=True), {}, "packed"),
        (TopKConfig(top_k=4), {"dynamic_expert_bias": torch.zeros(16)}, None),
        (TopKConfig(top_k=4), {"router_logits_partials": torch.zeros(2, 16)}, None),
    ],
)
def test_unsupported_layers_and_calls_are_passed_through(cfg, kw, why, logits_factory):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["topk_config"])
        return "sglang's own"

    hook = hook_for("oea:k0=1")
    assert hook(spy, hidden_states=torch.zeros(4, 8), router_logits=logits_factory(4, 16), topk_config=cfg,
                layer_id=1, **kw) == "sglang's own"
    assert seen == [cfg] and seen[0] is cfg
    if why:
        assert why in plugin.topk_spec(cfg, 16)[1]


def test_policy_that_does_not_fit_fails_on_the_first_forward(logits_factory):
    with pytest.raises(ValueError, match=r"does not fit MoE layer 2 \(decoder layer 3\) \(E=16, K=4\)"):
        call(hook_for("oea:k0=9", model_config=DENSE_FIRST), logits_factory(4, 16), TopKConfig(top_k=4))
    with pytest.raises(ValueError, match=r"does not fit MoE layer 2 \(decoder layer 3\).*lists 2 layers"):
        call(hook_for("oea:k0=[1,2]", model_config=DENSE_FIRST), logits_factory(4, 16), TopKConfig(top_k=4))
    # a list for a model with more MoE layers than this one's 3: its values would land on the wrong layers
    with pytest.raises(ValueError, match=r"oea k0 lists 4 layers, but the model has 3 MoE layers \(0..2\)"):
        call(hook_for("oea:k0=[1,2,3,4]", model_config=DENSE_FIRST), logits_factory(4, 16), TopKConfig(top_k=4))


@pytest.mark.parametrize("layer_id, k", [(1, 4), (2, 1), (3, 2)])
def test_the_policy_gets_the_moe_layer_index(layer_id, k, logits_factory):
    """SGLang's layer_id is the decoder layer; a per-layer k is read at its MoE-layer index."""
    logits = logits_factory(8, 16, seed=layer_id)
    out = call(hook_for("cap:k=[4,1,2]", model_config=DENSE_FIRST), logits, TopKConfig(top_k=4), layer_id=layer_id)
    expected = distinct_ids(make_policy("cap", k=k)(logits, RouterSpec(16, 4)), 16)  # dropped slots made distinct for SGLang's MoE
    assert torch.equal(out.topk_ids, expected.ids.to(torch.int32))


def test_layers_without_a_moe_layer_index_take_only_uniform_policies(logits_factory):
    logits = logits_factory(8, 16)
    for config, why in [(None, "the model's config could not be read"),
                        (types.SimpleNamespace(model_type="llama4", num_hidden_layers=4),
                         "which decoder layers of model_type 'llama4'"),
                        (DENSE_FIRST, "decoder layer 0 is not a MoE layer of the model's config")]:
        out = call(hook_for("cap:k=2", model_config=config), logits, TopKConfig(top_k=4), layer_id=0)
        assert torch.equal(out.topk_ids, distinct_ids(make_policy("cap", k=2)(logits, RouterSpec(16, 4)), 16).ids.to(torch.int32))
        with pytest.raises(ValueError, match=f"decoder layer 0 has no MoE-layer index: {why}"):
            call(hook_for("cap:k=[4,1]", model_config=config), logits, TopKConfig(top_k=4), layer_id=0)


def test_served_model_config_is_read_as_sglang_reads_it(monkeypatch):
    """From SGLang's global server args, through its own get_config (overrides applied) and text config."""
    seen = {}

    def get_config(model, trust_remote_code, revision=None, model_override_args=None):
        seen.update(model=model, trust=trust_remote_code, revision=revision, overrides=model_override_args)
        return types.SimpleNamespace(text_config=DENSE_FIRST)

    args = types.SimpleNamespace(model_path="/models/dsv3", trust_remote_code=True, revision="main",
                                 json_model_override_args='{"first_k_dense_replace": 1}')
    server_args = types.ModuleType("sglang.srt.server_args")
    server_args.get_global_server_args = lambda: args
    hf_utils = types.ModuleType("sglang.srt.utils.hf_transformers_utils")
    hf_utils.get_config, hf_utils.get_hf_text_config = get_config, lambda c: c.text_config
    for name in ("sglang", "sglang.srt", "sglang.srt.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.server_args", server_args)
    monkeypatch.setitem(sys.modules, "sglang.srt.utils.hf_transformers_utils", hf_utils)
    monkeypatch.setitem(sys.modules, "sglang.srt.runtime_context", None)  # before 0.5.23: not there
    assert plugin.served_model_config() is DENSE_FIRST
    assert seen == {"model": "/models/dsv3", "trust": True, "revision": "main",
                    "overrides": {"first_k_dense_replace": 1}}
    server_args.get_global_server_args = lambda: (_ for _ in ()).throw(ValueError("not set yet"))
    assert plugin.served_model_config() is None  # unreadable: layers get no MoE-layer index
    # 0.5.23: the operator's arguments from runtime_context.get_server_args()
    runtime_context = types.ModuleType("sglang.srt.runtime_context")
    runtime_context.get_server_args = lambda: args
    monkeypatch.setitem(sys.modules, "sglang.srt.runtime_context", runtime_context)
    seen.clear()
    assert plugin.served_model_config() is DENSE_FIRST and seen["model"] == "/models/dsv3"


# --- the step's kind and rows, from SGLang's forward context ---


class ForwardMode(enum.IntEnum):
    """SGLang 0.5.x's ForwardMode (`model_executor/forward_batch_info.py`), with the predicates the plugin asks."""

    EXTEND = enum.auto()
    DECODE = enum.auto()
    MIXED = enum.auto()
    IDLE = enum.auto()
    TARGET_VERIFY = enum.auto()
    DRAFT_EXTEND_V2 = enum.auto()
    PREBUILT = enum.auto()
    SPLIT_PREFILL = enum.auto()
    DLLM_EXTEND = enum.auto()

    def is_extend(self, include_draft_extend_v2: bool = False):
        return self in (ForwardMode.EXTEND, ForwardMode.MIXED, ForwardMode.TARGET_VERIFY, ForwardMode.SPLIT_PREFILL,
                        ForwardMode.DLLM_EXTEND) or (include_draft_extend_v2 and self == ForwardMode.DRAFT_EXTEND_V2)

    def is_decode(self):
        return self == ForwardMode.DECODE

    def is_mixed(self):
        return self == ForwardMode.MIXED

    def is_idle(self):
        return self == ForwardMode.IDLE

    def is_target_verify(self):
        return self == ForwardMode.TARGET_VERIFY


# ForwardBatch fields the plugin reads for a step's layout, as SGLang names them
BATCH_FIELDS = ["forward_mode", "batch_size", "extend_num_tokens", "extend_seq_lens_cpu"]


@dataclasses.dataclass
class ForwardBatch:
    """The fields of SGLang's ForwardBatch the plugin reads; `mixed` lays a step out as
    `ScheduleBatch.mix_with_running` does."""

    forward_mode: ForwardMode
    batch_size: int = 0
    extend_num_tokens: int | None = None
    extend_seq_lens_cpu: list | None = None
    attn_cp_metadata: Any = None
    attn_tp_sequence_sharded: bool = False
    num_token_non_padded: torch.Tensor | None = None

    @classmethod
    def mixed(cls, prefill_lens: list[int], running_bs: int, pad: int = 0) -> "ForwardBatch":
        """The extend requests first, then `running_bs` decodes of one token; `pad` rows of DP padding after
        them (`prepare_mlp_sync_batch` sets extend_num_tokens to the padded count)."""
        lens = list(prefill_lens) + [1] * running_bs
        return cls(ForwardMode.MIXED, len(lens), sum(lens) + pad, lens)

    def moe_num_token_non_padded(self):
        return self.num_token_non_padded


def context_of(batch: ForwardBatch) -> ForwardContext:
    return ForwardContext(attn_backend=None, moe_num_token_non_padded=batch.moe_num_token_non_padded)


@pytest.mark.parametrize("mode, kind", [
    (ForwardMode.DECODE, "decode"), (ForwardMode.TARGET_VERIFY, "verify"), (ForwardMode.MIXED, "mixed"),
    (ForwardMode.EXTEND, "prefill"), (ForwardMode.SPLIT_PREFILL, "prefill"), (ForwardMode.IDLE, "unknown"),
    (ForwardMode.DRAFT_EXTEND_V2, "unknown"), (ForwardMode.PREBUILT, "unknown")])
def test_step_kind_comes_from_the_batch_behind_the_forward_context(mode, kind):
    batch = ForwardBatch(mode)
    assert plugin.batch_of(context_of(batch)) is batch
    assert plugin.step_kind(plugin.batch_of(context_of(batch))) == kind
    assert plugin.batch_of(ForwardContext(attn_backend=None)) is None
    assert plugin.step_kind(None) == "unknown"  # no batch: routed natively


def test_prefill_rows_follow_the_mixed_layout():
    # two prompts (4 and 3 tokens), a one-token prefill, two decodes; then two rows of padding
    fixed = plugin.prefill_rows([4, 1, 3, 1, 1], 12)
    assert fixed.tolist() == [True] * 4 + [False] + [True] * 3 + [False, False] + [True, True]
    assert plugin.prefill_rows([0, 2, 1], 3).tolist() == [True, True, False]  # empty requests hold no row


@pytest.mark.parametrize("batch, T, why", [
    (ForwardBatch(ForwardMode.MIXED, 3, 5, None), 5, "no host list"),
    (ForwardBatch(ForwardMode.MIXED, 3, 5, [3, 1, "1"]), 5, "no host list"),
    (ForwardBatch(ForwardMode.MIXED, 4, 5, [3, 1, 1]), 5, "not one per request: 3 for batch_size=4"),
    (ForwardBatch.mixed([3], 2), 6, "the layer sees 6 rows, the step has 5 tokens"),  # a DP-gathered MoE input
    (ForwardBatch.mixed([3], 2), 4, "the layer sees 4 rows"),  # a sequence-sharded slice
    (ForwardBatch(ForwardMode.MIXED, 3, 5, [3, 1, 2]), 5, "the step has 6 tokens"),
    (dataclasses.replace(ForwardBatch.mixed([3], 2), attn_tp_sequence_sharded=True), 5, "attention-TP ranks"),
    (dataclasses.replace(ForwardBatch.mixed([3], 2), attn_cp_metadata=object()), 5, "context-parallel"),
])
def test_a_mixed_layout_that_does_not_match_the_rows_is_not_read(batch, T, why):
    lens, reason = plugin.mixed_lens(batch, T)
    assert lens is None and why in reason
    assert plugin.StepRows(lambda: batch)(T, torch.device("cpu")) == ("unknown", None)


def test_an_unreadable_mixed_layout_is_logged_once_per_reason(caplog):
    step = plugin.StepRows(lambda: ForwardBatch.mixed([3], 2))
    with caplog.at_level("INFO", logger="sglang.moe_reroute"):
        for T in (6, 7, 8):
            assert step(T, torch.device("cpu")) == ("unknown", None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "the layer sees 6 rows, the step has 5 tokens" in lines[0]


def test_mixed_layout_is_read_from_host_fields():
    assert plugin.mixed_lens(ForwardBatch.mixed([3, 2], 3), 8) == ((3, 2, 1, 1, 1), "")
    assert plugin.mixed_lens(ForwardBatch.mixed([3], 2, pad=3), 8) == ((3, 1, 1), "")  # DP padding after
    no_total = ForwardBatch(ForwardMode.MIXED, 2, None, torch.tensor([4, 1]))  # a host tensor is read too
    assert plugin.mixed_lens(no_total, 5) == ((4, 1), "")


def test_step_rows_builds_the_mask_once_per_layout():
    in_flight = [ForwardBatch.mixed([3, 2], 3)]
    step = plugin.StepRows(lambda: in_flight[0])
    kind, fixed = step(8, torch.device("cpu"))
    assert kind == "mixed" and fixed.tolist() == [True] * 5 + [False] * 3
    assert step(8, torch.device("cpu"))[1] is fixed  # the next layer of the step reuses it
    in_flight[0] = ForwardBatch.mixed([3, 2], 3)
    assert step(8, torch.device("cpu"))[1] is fixed  # so does the next step of the same layout
    in_flight[0] = ForwardBatch.mixed([2], 6)
    assert step(8, torch.device("cpu"))[1].tolist() == [True] * 2 + [False] * 6
    assert plugin.StepRows(lambda: ForwardBatch(ForwardMode.DECODE))(8, torch.device("cpu")) == ("decode", None)


def step_hook(policy: str, batch: ForwardBatch) -> plugin.SelectExpertsHook:
    """The hook reading its step from `batch`, as it reads SGLang's ForwardBatch in flight."""
    return plugin.SelectExpertsHook(plugin_config.parse(policy), step=plugin.StepRows(lambda: batch),
                                    model_config=lambda: None)


def native_out(logits, cfg, **kw):
    return select_experts(torch.zeros(logits.shape[0], 8), logits, cfg, layer_id=3, **kw)


def deepseek_spec(cfg, E=32, K=4):
    return RouterSpec(E, K, "sigmoid", True, n_group=4, topk_group=2, e_score_correction_bias=cfg.correction_bias,
                      weights_in_logits_dtype=False)


@pytest.mark.parametrize("deepseek", [False, True])
def test_mixed_step_reroutes_its_decode_rows_with_the_prefill_rows_fixed(deepseek, logits_factory):
    """Prompts of 5 and 4 tokens, then 7 decodes, then 2 rows of DP padding: the decode rows are the
    policy's routing called with the prefill rows fixed; the prefill rows are exactly SGLang's top-k."""
    T, E, K = 18, 32, 4
    logits = logits_factory(T, E, torch.float32, seed=11)
    cfg = deepseek_config(E, K) if deepseek else TopKConfig(top_k=K)
    spec = deepseek_spec(cfg) if deepseek else RouterSpec(E, K)
    batch = ForwardBatch.mixed([5, 4], 7, pad=2)
    n_real = torch.tensor([16])
    log2phy = torch.randperm(E, generator=torch.Generator().manual_seed(5)).to(torch.int32)
    info = types.SimpleNamespace(ep_dispatch_algorithm="static", log2phy=log2phy)
    out = call(step_hook("oea:k0=1", batch), logits, cfg, num_token_non_padded=n_real,
               expert_location_dispatch_info=info)

    prefill = torch.tensor([True] * 9 + [False] * 7 + [True] * 2)  # written out by hand
    valid = torch.arange(T) < 16
    expected = distinct_ids(make_policy("oea", k0=1)(logits, spec, valid, layer=3, fixed=prefill), spec.num_experts)  # dropped slots made distinct for SGLang's MoE
    scale = 2.5 if deepseek else 1.0
    assert torch.equal(out.topk_ids[:16], log2phy[expected.ids[:16]])
    torch.testing.assert_close(out.topk_weights[:16], expected.weights[:16] * scale)
    assert (out.topk_ids[16:] == -1).all()
    native = native_out(logits, cfg, num_token_non_padded=n_real, expert_location_dispatch_info=info)
    rows = slice(0, 9)
    assert_same_routing(StandardTopKOutput(out.topk_weights[rows], out.topk_ids[rows], None),
                        StandardTopKOutput(native.topk_weights[rows], native.topk_ids[rows], None))
    decode = slice(9, 16)
    assert not torch.equal(out.topk_ids[decode].sort(-1)[0], native.topk_ids[decode].sort(-1)[0])
    # the decode rows may use the prefill rows' experts: fewer experts than the decode rows alone would take
    alone = make_policy("oea", k0=1)(logits[decode], spec)
    assert out.topk_ids[:16].unique().numel() <= log2phy[torch.cat([native.topk_ids[rows].long().flatten(),
                                                                    alone.ids.flatten()])].unique().numel()


def test_mixed_step_under_phase_all_reroutes_every_row(logits_factory):
    logits = logits_factory(8, 16, seed=12)
    out = call(step_hook('{"name": "oea", "k0": 1, "phase": "all"}', ForwardBatch.mixed([5], 3)), logits,
               TopKConfig(top_k=4))
    assert torch.equal(out.topk_ids, make_policy("oea", k0=1)(logits, RouterSpec(16, 4), layer=3).ids.to(torch.int32))


@pytest.mark.parametrize("verify", [True, False])
def test_verification_step_is_rerouted_unless_verify_is_false(verify, logits_factory):
    """TARGET_VERIFY: every row is a decode token being verified (bs x draft tokens), padding masked."""
    T, E = 12, 16
    logits = logits_factory(T, E, seed=13)
    cfg = TopKConfig(top_k=4)
    batch = ForwardBatch(ForwardMode.TARGET_VERIFY, batch_size=3)
    policy = '{"name": "oea", "k0": 1, "verify": %s}' % ("true" if verify else "false")
    n_real = torch.tensor([10])
    out = call(step_hook(policy, batch), logits, cfg, num_token_non_padded=n_real)
    native = native_out(logits, cfg, num_token_non_padded=n_real)
    if not verify:
        assert_same_routing(out, native)
        return
    expected = distinct_ids(make_policy("oea", k0=1)(logits, RouterSpec(E, 4), torch.arange(T) < 10, layer=3), E)  # dropped slots made distinct for SGLang's MoE
    assert torch.equal(out.topk_ids[:10], expected.ids[:10].to(torch.int32)) and (out.topk_ids[10:] == -1).all()
    assert out.topk_ids[:10].unique().numel() < native.topk_ids[:10].unique().numel()


@pytest.mark.parametrize("batch", [ForwardBatch.mixed([5], 3), ForwardBatch(ForwardMode.TARGET_VERIFY, 2)])
def test_pure_decode_keeps_mixed_and_verification_steps_native(batch, logits_factory):
    logits = logits_factory(8, 16, seed=14)
    cfg = TopKConfig(top_k=4)
    hook = step_hook('{"name": "oea", "k0": 1, "phase": "pure-decode"}', batch)
    assert_same_routing(call(hook, logits, cfg), native_out(logits, cfg))
    batch.forward_mode = ForwardMode.DECODE  # a pure decode step is still re-routed
    expected = distinct_ids(make_policy("oea", k0=1)(logits, RouterSpec(16, 4), layer=3), 16)  # dropped slots made distinct for SGLang's MoE
    assert torch.equal(call(hook, logits, cfg).topk_ids, expected.ids.to(torch.int32))


@pytest.mark.parametrize("batch", [
    ForwardBatch(ForwardMode.MIXED, 3, 8, None),  # counts only on the device
    ForwardBatch(ForwardMode.MIXED, 3, 9, [6, 1, 1]),  # the layer sees fewer rows than the step
    ForwardBatch(ForwardMode.MIXED, 3, 8, [6, 1, 2]),  # counts that do not add up
    ForwardBatch(ForwardMode.EXTEND, 1, 8, [8]), ForwardBatch(ForwardMode.IDLE),
    ForwardBatch(ForwardMode.DRAFT_EXTEND_V2, 2, 8, [4, 4])])
def test_steps_whose_rows_cannot_be_told_route_natively(batch, logits_factory):
    logits = logits_factory(8, 16, seed=15)
    cfg = TopKConfig(top_k=4)
    CALLS.clear()
    assert_same_routing(call(step_hook("oea:k0=1", batch), logits, cfg), native_out(logits, cfg))
    assert CALLS == []  # SGLang's own top-k, no policy


def test_a_mixed_step_without_its_prefill_rows_routes_natively(logits_factory):
    logits = logits_factory(8, 16, seed=16)
    cfg = TopKConfig(top_k=4)
    assert_same_routing(call(hook_for("oea:k0=1", step=("mixed", None)), logits, cfg), native_out(logits, cfg))


# --- start-up ---


def test_register_does_nothing_without_a_policy(monkeypatch):
    monkeypatch.delenv("MOE_REROUTE_POLICY", raising=False)
    monkeypatch.delenv("MOE_REROUTE_POLICY_FILE", raising=False)
    monkeypatch.setattr(plugin, "STATE", plugin.State())
    assert plugin.register() is None and plugin.STATE.hook is None


def test_without_a_policy_the_dumper_route_says_the_plugin_is_not_active(monkeypatch):
    """A server started with DUMPER_SERVER_PORT=reuse and no policy: `register` adds the route's hook alone (no
    routing hook), and the plugin's methods there answer how to make it active; where the hook cannot be added
    the server starts anyway (natively), with a warning. SGLang's HookRegistry is a stand-in here."""
    monkeypatch.delenv("MOE_REROUTE_POLICY", raising=False)
    monkeypatch.delenv("MOE_REROUTE_POLICY_FILE", raising=False)
    monkeypatch.setenv("DUMPER_SERVER_PORT", "reuse")
    monkeypatch.setattr(plugin, "STATE", plugin.State())
    registered = []
    hook_registry = types.ModuleType("sglang.srt.plugins.hook_registry")
    hook_registry.HookType = types.SimpleNamespace(AROUND="around")
    hook_registry.HookRegistry = types.SimpleNamespace(register=lambda *a: registered.append(a))
    for name in ("sglang", "sglang.srt", "sglang.srt.plugins"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.plugins.hook_registry", hook_registry)
    assert plugin.register() is None and plugin.register() is None
    assert registered == [(plugin.DUMPER, plugin.http_control, "around")] and plugin.STATE.hook is None
    for method in ("moe_reroute_set_policy", "moe_reroute_counters"):
        with pytest.raises(RuntimeError, match="not active in this server.*start it with MOE_REROUTE_POLICY=native"):
            plugin.http_call(None, method, {"policy": "cap:k=2"} if "set" in method else {})
    monkeypatch.setattr(plugin, "STATE", plugin.State())
    monkeypatch.setitem(sys.modules, "sglang.srt.plugins.hook_registry", None)  # not importable
    warned = []  # read off the plugin's logger: an imported SGLang may keep its loggers' records to itself
    monkeypatch.setattr(plugin.logger, "warning", lambda msg, *args: warned.append(msg % args))
    assert plugin.register() is None and not plugin.STATE.route
    assert len(warned) == 1 and "cannot answer on SGLang's /dumper/ route (ModuleNotFoundError" in warned[0]
    monkeypatch.delenv("DUMPER_SERVER_PORT")
    monkeypatch.setattr(plugin, "STATE", plugin.State())
    registered.clear()
    monkeypatch.setitem(sys.modules, "sglang.srt.plugins.hook_registry", hook_registry)
    assert plugin.register() is None and registered == []  # no route asked for: nothing at all


def test_register_without_sglang_says_so(monkeypatch):
    monkeypatch.setenv("MOE_REROUTE_POLICY", "oea:k0=3")
    monkeypatch.setattr(plugin, "sglang_version", lambda: None)
    with pytest.raises(RuntimeError, match=r"needs SGLang 0\.5\.x, which is not installed.*unset MOE_REROUTE_POLICY"):
        plugin.register()


@pytest.mark.parametrize("version", ["0.4.10", "0.6.0", "dev"])
def test_other_sglang_versions_are_refused(version):
    with pytest.raises(RuntimeError, match=f"SGLang {version} is not supported"):
        plugin.check_version(version)


def test_bad_policy_fails_at_register(monkeypatch):
    monkeypatch.setenv("MOE_REROUTE_POLICY", "nope:k=1")
    with pytest.raises(ValueError, match="unknown policy"):
        plugin.register()


# --- against an installed SGLang's source, when there is one ---


def _sglang_root() -> Path | None:
    spec = importlib.util.find_spec("sglang")  # finds the package without importing it
    return Path(spec.origin).parent if spec and spec.origin else None


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def _fields(cls: ast.ClassDef) -> list[str]:
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]


@pytest.mark.skipif(_sglang_root() is None, reason="SGLang is not installed (its source is read, not imported)")
def test_installed_sglang_matches_the_recorded_contract():
    from importlib.metadata import version

    root = _sglang_root()
    assert version("sglang").startswith("0.5.")
    topk = ast.parse((root / "srt/layers/moe/topk.py").read_text())
    sel = _function(topk, "select_experts")
    assert [a.arg for a in sel.args.args] == SELECT_EXPERTS_POSITIONAL
    assert [a.arg for a in sel.args.kwonlyargs] == SELECT_EXPERTS_KEYWORD
    crf_calls = [n for n in ast.walk(sel) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id == "custom_routing_function"]
    assert crf_calls and all([k.arg for k in c.keywords] == CUSTOM_ROUTING_KEYWORDS and not c.args for c in crf_calls)
    assert _fields(_class(topk, "StandardTopKOutput")) == OUTPUT_FIELDS
    assert set(plugin.TOPK_CONFIG_FIELDS) <= set(_fields(_class(topk, "TopKConfig")))
    config_body = _class(topk, "TopKConfig").body
    assert any(isinstance(n, ast.FunctionDef) and n.name == "num_shared_topk_slots" for n in config_body)
    ctx = ast.parse((root / "srt/model_executor/forward_context.py").read_text())
    assert "moe_num_token_non_padded" in _fields(_class(ctx, "ForwardContext"))
    batch = ast.parse((root / "srt/model_executor/forward_batch_info.py").read_text())
    fb = _class(batch, "ForwardBatch")
    assert set(BATCH_FIELDS) <= set(_fields(fb))  # a step's kind and a mixed step's layout
    assert any(isinstance(n, ast.FunctionDef) and n.name == "moe_num_token_non_padded" for n in fb.body)
    modes = _class(batch, "ForwardMode")
    assert {"EXTEND", "DECODE", "MIXED", "IDLE", "TARGET_VERIFY"} <= {
        t.id for n in modes.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert {"is_decode", "is_mixed", "is_target_verify", "is_extend"} <= {
        n.name for n in modes.body if isinstance(n, ast.FunctionDef)}
    # a mixed step: the extend requests, then every running decode with one token (extend_lens += [1] * running_bs)
    schedule = (root / "srt/managers/schedule_batch.py").read_text()
    mix = ast.get_source_segment(schedule, next(
        n for n in _class(ast.parse(schedule), "ScheduleBatch").body
        if isinstance(n, ast.FunctionDef) and n.name == "mix_with_running"))
    assert "ForwardMode.MIXED" in mix and "[1] * running_bs" in mix
    plugins = (root / "srt/plugins/__init__.py").read_text()
    assert f'GENERAL_PLUGINS_GROUP = "{PLUGIN_GROUP}"' in plugins
    # served_model_config: the global server args, SGLang's get_config and get_hf_text_config
    assert "get_global_server_args" in {n.name for n in ast.parse((root / "srt/server_args.py").read_text()).body
                                        if isinstance(n, ast.FunctionDef)}
    # the HTTP route of a running server (`http_control`): /dumper/{method} when DUMPER_SERVER_PORT=reuse, answered
    # by Scheduler.handle_dumper_control(self, recv_req) with a DumperControlReqOutput through send_to_tokenizer
    http = (root / "srt/entrypoints/http_server.py").read_text()
    assert 'os.environ.get("DUMPER_SERVER_PORT") == "reuse"' in http and '"/dumper/{method}"' in http
    scheduler = ast.parse((root / "srt/managers/scheduler.py").read_text())
    dumper = next(n for n in _class(scheduler, "Scheduler").body
                  if isinstance(n, ast.FunctionDef) and n.name == "handle_dumper_control")
    assert [a.arg for a in dumper.args.args] == ["self", "recv_req"]
    assert "self.ipc_channels.send_to_tokenizer.send_output(" in ast.unparse(dumper)
    io_struct = ast.parse((root / "srt/managers/io_struct.py").read_text())
    assert _fields(_class(io_struct, "DumperControlReqInput")) == ["method", "body"]
    assert _fields(_class(io_struct, "DumperControlReqOutput")) == ["success", "response", "error"]
    # (0.5.23 defines them in srt/utils/hf_transformers/ and re-exports them from hf_transformers_utils)
    utils = [root / "srt/utils/hf_transformers/config.py", root / "srt/utils/hf_transformers/common.py",
             root / "srt/utils/hf_transformers_utils.py", root / "srt/hf_transformers_utils.py"]
    defined = {n.name: n for f in utils if f.exists() for n in ast.parse(f.read_text()).body
               if isinstance(n, ast.FunctionDef)}
    assert [a.arg for a in defined["get_config"].args.args][:4] == [
        "model", "trust_remote_code", "revision", "model_override_args"]
    assert "get_hf_text_config" in defined


@pytest.mark.skipif(_sglang_root() is None, reason="SGLang is not installed (its source is read, not imported)")
def test_installed_hook_registry_wraps_select_experts_with_the_hook(monkeypatch, logits_factory):
    """SGLang's own HookRegistry (stdlib only, loaded from its file) applies the AROUND hook."""
    spec = importlib.util.spec_from_file_location("_sgl_hook_registry", _sglang_root() / "srt/plugins/hook_registry.py")
    registry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(registry)
    target = types.ModuleType("_sgl_fake_topk")

    def fake_select_experts(*args, **kwargs):  # a function of its own: the registry re-binds every alias
        return select_experts(*args, **kwargs)

    target.select_experts = fake_select_experts
    monkeypatch.setitem(sys.modules, "_sgl_fake_topk", target)
    registry.HookRegistry.reset()
    try:
        registry.HookRegistry.register("_sgl_fake_topk.select_experts", hook_for("cap:k=2"), registry.HookType.AROUND)
        registry.HookRegistry.apply_hooks()
        logits = logits_factory(6, 16)
        out = target.select_experts(hidden_states=torch.zeros(6, 8), router_logits=logits,
                                    topk_config=TopKConfig(top_k=4), layer_id=0)
    finally:
        registry.HookRegistry.reset()
    expected = distinct_ids(make_policy("cap", k=2)(logits, RouterSpec(16, 4), layer=0), 16)  # dropped slots made distinct for SGLang's MoE
    assert torch.equal(out.topk_ids, expected.ids.to(torch.int32))


# --- A/B in the scheduler: a plan of one policy per decode step (serve-bench --engine sglang) ---


def test_ab_plan_routes_each_decode_step_with_its_policy_and_restores_the_policy_after(monkeypatch, tmp_path,
                                                                                      logits_factory):
    import json

    batch = [ForwardBatch(ForwardMode.EXTEND, 6)]
    hook = plugin.SelectExpertsHook(plugin_config.parse("native"), step=plugin.StepRows(lambda: batch[0]),
                                    model_config=lambda: None)
    start = hook.config
    monkeypatch.setattr(plugin.STATE, "hook", hook)
    monkeypatch.setattr(plugin.STATE, "ab", None)
    fits = collections.Counter()
    real_check = plugin.check_fits

    def counted(cfg, *args, **kw):
        fits[cfg.source] += 1
        return real_check(cfg, *args, **kw)

    monkeypatch.setattr(plugin, "check_fits", counted)
    plan = [[0, "oea:k0=1"], [0, "cap:k=2"], [1, "cap:k=2"], [1, "oea:k0=1"]]
    plugin._rpc_ab_plan(None, policies=["oea:k0=1", "cap:k=2"], plan=plan)
    layers = {0: TopKConfig(top_k=4, renormalize=True), 1: TopKConfig(top_k=4, renormalize=True)}
    spec = RouterSpec(16, 4)
    # one prefill step, five decode steps: the last is past the plan and runs native
    modes = [ForwardMode.EXTEND] + [ForwardMode.DECODE] * 5
    want_policy = ["native", "oea:k0=1", "cap:k=2", "cap:k=2", "oea:k0=1", "native"]
    for i, (mode, name) in enumerate(zip(modes, want_policy)):
        batch[0] = ForwardBatch(mode, 6)
        logits = logits_factory(6, 16, torch.float32, seed=i)

        def execute(runner, forward_batch):  # the model's forward: two MoE layers read the step's routing
            return [call(hook, logits, cfg, layer_id=layer) for layer, cfg in layers.items()]

        outs = plugin.note_mode(execute, None, batch[0])
        fn = make_policy(name.split(":")[0], **({} if name == "native" else
                                               {name.split(":")[1].split("=")[0]: int(name.split("=")[1])}))
        want = distinct_ids(fn(logits, spec), 16)
        for out in outs:
            assert torch.equal(out.topk_ids.sort(-1).values, want.ids.to(torch.int32).sort(-1).values), (i, name)
    path = tmp_path / "ab.json"
    plugin._rpc_ab_save(None, path=str(path))
    steps = json.loads(path.read_text())["steps"]
    assert [s["kind"] for s in steps] == ["prefill"] + ["decode"] * 5
    assert [s["policy"] for s in steps] == want_policy
    assert [s["round"] for s in steps] == [None, 0, 0, 1, 1, None]
    assert all(s["batch"] == 6 and s["forward_s"] >= 0 for s in steps)
    assert all(a["t"] <= b["t"] for a, b in zip(steps, steps[1:]))
    assert plugin.STATE.ab is None and hook.config is start  # the policy from before the plan routes again
    assert fits == {"native": 2, "oea:k0=1": 2, "cap:k=2": 2}  # each policy's fit checked once per layer


def test_switching_is_refused_once_a_cuda_graph_holds_the_policy(monkeypatch, logits_factory):
    """SGLang captures its decode steps in CUDA graphs with the hook inside: once a routed call ran during a
    capture, a switch or an A/B plan would reach only the steps run eagerly, so both are refused, naming the
    policy the graphs hold and the way out. The CPU captures nothing: the capture is a stand-in here."""
    hook = hook_for("oea:k0=1")
    monkeypatch.setattr(plugin.STATE, "hook", hook)
    monkeypatch.setattr(plugin.STATE, "ab", None)
    monkeypatch.setattr(plugin.STATE, "captured", None)
    call(hook, logits_factory(6, 16), TopKConfig(top_k=4))  # eager: nothing captured
    plugin._rpc_set_policy(None, "cap:k=2")  # switching is fine
    monkeypatch.setattr(plugin, "tracing", lambda: True)
    call(hook, logits_factory(6, 16), TopKConfig(top_k=4))  # a routed call inside a capture
    monkeypatch.setattr(plugin, "tracing", lambda: False)
    with pytest.raises(RuntimeError, match=r"cannot switch policy: .*captured with policy cap:k=2.*--disable-cuda-graph"):
        plugin._rpc_set_policy(None, "native")
    with pytest.raises(RuntimeError, match="cannot run an A/B plan"):
        plugin._rpc_ab_plan(None, policies=["cap:k=2"], plan=[[0, "cap:k=2"]])
    assert hook.config.describe().startswith("cap:k=2") and plugin.STATE.ab is None


def test_http_route_switches_and_reads_the_policy_and_passes_other_methods_to_sglang(monkeypatch, logits_factory):
    """`POST /dumper/moe_reroute_*` in a running server: the AROUND hook on the scheduler's dumper handler answers
    the plugin's methods (each scheduler sends its DumperControlReqOutput) and hands every other method to SGLang's
    dumper. SGLang's message types are stand-ins here (the real server: tests/test_sglang_engine.py)."""
    @dataclasses.dataclass
    class Output:  # SGLang's DumperControlReqOutput
        success: bool
        response: list
        error: str = ""

    io_struct = types.ModuleType("sglang.srt.managers.io_struct")
    io_struct.DumperControlReqOutput = Output
    for name in ("sglang", "sglang.srt", "sglang.srt.managers"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.managers.io_struct", io_struct)
    sent = []
    scheduler = types.SimpleNamespace(dp_rank=0, ipc_channels=types.SimpleNamespace(
        send_to_tokenizer=types.SimpleNamespace(send_output=lambda out, req: sent.append((out, req)))))
    hook = plugin.SelectExpertsHook(plugin_config.parse("native", counters=True),
                                    step=lambda T, device: ("decode", None), model_config=lambda: None)
    monkeypatch.setattr(plugin.STATE, "hook", hook)
    monkeypatch.setattr(plugin.STATE, "captured", None)
    sglangs = []

    def handle(sched, req):  # SGLang's own handler
        sglangs.append(req.method)
        return "sglang's"

    def post(method, body):
        req = types.SimpleNamespace(method=method, body=body)
        sent.clear()
        assert plugin.http_control(handle, scheduler, req) is None
        assert len(sent) == 1 and sent[0][1] is req
        return sent[0][0]

    assert post("moe_reroute_set_policy", {"policy": "cap:k=2"}) == Output(True, [{"policy": "cap:k=2"}])
    assert hook.config.source == "cap:k=2"
    call(hook, logits_factory(6, 16, torch.float32), TopKConfig(top_k=4))
    out = post("moe_reroute_counters", {})
    assert out.success and out.response[0]["policy"] == "cap:k=2" and out.response[0]["dp_rank"] == 0
    assert list(out.response[0]["counters"]) == ["3"] and out.response[0]["counters"]["3"]["steps"] == 1
    assert post("moe_reroute_reset_counters", None) == Output(True, [])
    assert post("moe_reroute_counters", {}).response[0]["counters"]["3"]["steps"] == 0
    for method, body, message in [
            ("moe_reroute_set_policy", {"policy": "oea:k0=banana"}, "moe_reroute_set_policy"),
            ("moe_reroute_set_policy", {}, 'takes the JSON object {"policy": ...}, not {}'),
            ("moe_reroute_set_policy", {"policy": "cap:k=1", "x": 1}, 'takes the JSON object {"policy": ...}'),
            ("moe_reroute_counters", {"layer": 1}, "takes the JSON object {}"),
            ("moe_reroute_save", {"path": "/tmp/x"}, "no method 'moe_reroute_save' on this route; there are "
                                                    "moe_reroute_set_policy, moe_reroute_reset_counters")]:
        out = post(method, body)
        assert not out.success and out.response == [] and message in out.error, (method, out)
    assert hook.config.source == "cap:k=2"  # a refused switch leaves the policy as it was
    sent.clear()
    assert plugin.http_control(handle, scheduler, types.SimpleNamespace(method="get_state", body={})) == "sglang's"
    assert sglangs == ["get_state"] and not sent


def test_ab_plan_naming_a_policy_it_was_not_given_is_refused(monkeypatch):
    hook = hook_for("native")
    monkeypatch.setattr(plugin.STATE, "hook", hook)
    monkeypatch.setattr(plugin.STATE, "ab", None)
    with pytest.raises(ValueError, match="not given"):
        plugin._rpc_ab_plan(None, policies=["cap:k=2"], plan=[[0, "oea:k0=1"]])
    with pytest.raises(ValueError, match="moe_reroute_ab_plan"):
        plugin._rpc_ab_plan(None, policies=["oea:k0=banana"], plan=[])
    assert plugin.STATE.ab is None


def test_counters_give_the_experts_sglang_computes_beside_the_policys(logits_factory):
    """One token at a time, cap:k=2 of K=4 keeps 2 experts, but SGLang's MoE needs 4 distinct ids: the two
    dropped slots name two more experts (weight 0) that it computes, so the engine's U is 4 where the
    policy's is 2; with a batch whose kept experts fill every row, both are the same."""
    hook = plugin.SelectExpertsHook(plugin_config.parse("cap:k=2", counters=True), step=lambda T, device: ("decode", None),
                                    model_config=lambda: None)
    cfg = TopKConfig(top_k=4, renormalize=True)
    call(hook, logits_factory(1, 16, torch.float32, seed=1), cfg)
    one = hook.read_counters()[3]
    assert one["unique"] == 2.0 and one["unique_engine"] == 4.0 and one["unique_native"] == 4.0
    hook.set_config(plugin_config.parse("cap:k=2", counters=True))  # counters restart
    logits = logits_factory(12, 16, torch.float32, seed=2)
    call(hook, logits, cfg)
    many = hook.read_counters()[3]
    kept = make_policy("cap", k=2)(logits, RouterSpec(16, 4))
    u = len(set(kept.ids[:, :2].flatten().tolist()))  # the experts the 12 tokens keep, counted by hand
    assert u >= 4 and many["unique"] == many["unique_engine"] == u


def test_a_mixed_step_under_a_capture_or_trace_is_not_read(monkeypatch):
    """Inside a CUDA-graph capture or a compile trace the host-built mask would be frozen into what replays: the
    mixed step routes natively (read through `contract.tracing`, as every other capture test of the plugin)."""
    step = plugin.StepRows(lambda: ForwardBatch.mixed([3, 2], 3))
    monkeypatch.setattr(plugin, "tracing", lambda: True)
    assert step(8, torch.device("cpu")) == ("unknown", None)
    monkeypatch.setattr(plugin, "tracing", lambda: False)
    assert step(8, torch.device("cpu"))[0] == "mixed"
