"""Hook SGLang's `select_experts` so the decode tokens of its MoE layers route with the configured policy.

SGLang 0.5.x calls `register` in each of its processes through the `sglang.srt.plugins` entry point.
`register` adds an AROUND hook on `sglang.srt.layers.moe.topk.select_experts` to SGLang's HookRegistry.
On a step with decode tokens, at a supported layer, the hook calls SGLang's own `select_experts` with a
copy of the layer's TopKConfig whose `custom_routing_function` is the policy. SGLang then does
everything it does after its own top-k: the routed scaling factor, the logical-to-physical expert map
(EPLB), the padded-row mask, the routed-experts capture and the expert-distribution recorder, and it
returns its own StandardTopKOutput. Every other call is passed through unchanged.
T = tokens in the step, E = routed experts, K = experts per token.

Steps, by the `forward_mode` of the step's ForwardBatch (`step_kind`), under the default phase "decode":
- DECODE ("decode"; a speculative draft model's decode steps too): every row re-routed.
- TARGET_VERIFY ("verify"): every row is a decode token being verified, re-routed; native with
  `"verify": false`.
- MIXED ("mixed", chunked prefill with the running decodes appended): the rows of one-token requests
  are re-routed, the prefill rows keep native routing and count as loaded experts (`fixed`). The layout
  is read from host-side fields (`extend_seq_lens_cpu`, `extend_num_tokens`); a step whose layout cannot
  be read, or does not cover the layer's T rows exactly, routes natively ("unknown").
- EXTEND and other extend-like steps ("prefill"), IDLE, DRAFT_EXTEND_V2 and anything else ("unknown"):
  native.
"pure-decode" re-routes DECODE steps only; "all" re-routes every row of every step.

Layers: SGLang passes the decoder-layer index (`layer_id`); the policy is called with that layer's
MoE-layer index (dense layers not counted), read from the served model's config by
`moe_reroute.contract.moe_index`. Messages keep the decoder-layer index.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import numbers
import os
import time
from collections.abc import Sequence
from typing import Any, Callable

import torch

from ..contract import RouterSpec, engine_spec, layer_name, moe_count, moe_index, tracing
from ..policies.native import Native, NativeConfig
from ..serving import config as _config
from ..serving.distinct import distinct_ids
from ..serving.steps import DECODE, MIXED, PREFILL, UNKNOWN, VERIFY, LayerCounter

logger = logging.getLogger("sglang.moe_reroute")

SUPPORTED_SGLANG = ((0, 5),)  # read against 0.5.23
TARGET = "sglang.srt.layers.moe.topk.select_experts"
NATIVE_SPEC = "native"
# SGLang 0.5.23's eager runner turns a MIXED step into EXTEND before its forward ("a mixed batch is
# extend-shaped"); an AROUND hook on it keeps the step's own mode for `step_kind` (`note_mode`).
EXECUTE = "sglang.srt.model_executor.runner.eager_runner.EagerRunner.execute"
# Where SGLang decides whether a layer's top-k runs inside its MoE kernel (`TopK.bind_runner_backend`): the
# FlashInfer TRT-LLM kernels route from the logits themselves unless `_can_bypass_trtllm_routing` says no.
CAN_BYPASS = "sglang.srt.layers.moe.topk._can_bypass_trtllm_routing"
BIND = "sglang.srt.layers.moe.topk.TopK.bind_runner_backend"
# select_experts(hidden_states, router_logits, topk_config, *, layer_id, num_token_non_padded,
#                expert_location_dispatch_info, dynamic_expert_bias, router_logits_partials)
SELECT_EXPERTS_PARAMS = (
    "hidden_states",
    "router_logits",
    "topk_config",
    "layer_id",
    "num_token_non_padded",
    "expert_location_dispatch_info",
    "dynamic_expert_bias",
    "router_logits_partials",
)
# How select_experts calls topk_config.custom_routing_function (all by keyword).
CUSTOM_ROUTING_PARAMS = ("hidden_states", "gating_output", "topk", "renormalize")
TOPK_CONFIG_FIELDS = (
    "top_k",
    "use_grouped_topk",
    "topk_group",
    "num_expert_group",
    "renormalize",
    "custom_routing_function",
    "correction_bias",
    "routed_scaling_factor",
    "apply_routed_scaling_factor_on_output",
    "scoring_func",
    "sqrtsoftplus_log1p",
    "fused_gate_packed_ids",
)
OUTPUT_FIELDS = ("topk_weights", "topk_ids", "router_logits")  # StandardTopKOutput


def topk_spec(cfg: Any, num_experts: int) -> tuple[RouterSpec | None, str]:
    """The RouterSpec a SGLang TopKConfig routes by, or (None, why it is not supported).

    Supported: softmax top-K (renormalised or not) and sigmoid top-K, with or without DeepSeek-V3's
    correction bias and group-limited selection (groups scored by the sum of their top-2, as SGLang's
    biased_grouped_topk does). The routed scaling factor stays SGLang's: it applies it after a custom
    routing function exactly when it would after its own.
    """
    if cfg.custom_routing_function is not None:
        return None, "the model's own custom_routing_function"
    if cfg.num_shared_topk_slots:
        return None, "shared experts fused into the routed top-k"
    if getattr(cfg, "fused_gate_packed_ids", False):
        return None, "packed top-k ids (FlashInfer MXFP4)"
    scoring = cfg.scoring_func
    if scoring not in ("softmax", "sigmoid") or getattr(cfg, "sqrtsoftplus_log1p", False):
        return None, f"scoring {scoring!r}"
    bias = cfg.correction_bias
    grouped = bool(cfg.use_grouped_topk)
    n_group = int(cfg.num_expert_group or 1) if grouped else 1
    topk_group = int(cfg.topk_group or 1) if grouped else 1
    K, renorm = int(cfg.top_k), bool(cfg.renormalize)
    if scoring == "softmax":
        return engine_spec(num_experts, K, scoring, renorm, has_bias=bias is not None, grouped=grouped,
                           n_group=n_group, topk_group=topk_group, arch="sglang")
    data = bias.data if isinstance(bias, torch.nn.Parameter) else bias
    return engine_spec(num_experts, K, scoring, renorm, has_bias=bias is not None, grouped=grouped, n_group=n_group,
                       topk_group=topk_group, e_score_correction_bias=data, arch="sglang")


def batch_of(ctx: Any) -> Any:
    """The ForwardBatch of SGLang's ForwardContext `ctx`, or None.

    The context carries the step's ForwardBatch only as the bound method it lends for the MoE padding
    bound (`moe_num_token_non_padded`); its `__self__` is the batch.
    """
    return getattr(getattr(ctx, "moe_num_token_non_padded", None), "__self__", None)


def current_batch() -> Any:
    """`batch_of` the step in flight, from SGLang's forward context (None outside a forward)."""
    from sglang.srt.model_executor.forward_context import get_forward_context, has_forward_context

    return batch_of(get_forward_context()) if has_forward_context() else None


class _Executing:
    """The forward mode of the step the eager runner is executing (None outside `EagerRunner.execute`)."""

    mode: Any = None


EXECUTING = _Executing()


def note_mode(execute: Callable, runner: Any, forward_batch: Any = None, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on `EXECUTE`: keep the step's forward mode, as the scheduler made it, while it runs (SGLang
    rewrites MIXED to EXTEND inside, and the forward context may carry another ForwardBatch object). Under an
    A/B plan (`moe_reroute_ab_plan`) it also picks the step's policy and times the step."""
    outer, EXECUTING.mode = EXECUTING.mode, getattr(forward_batch, "forward_mode", None)
    ab = STATE.ab
    if ab is not None and outer is None:
        ab.begin(forward_batch)
    try:
        return execute(runner, forward_batch, *args, **kwargs)
    finally:
        EXECUTING.mode = outer
        if ab is not None and outer is None:
            ab.end()


class ABPlan:
    """A/B timing inside SGLang's scheduler (`moe_reroute_ab_plan`): the policy of each decode step of the
    next generation, switched at step boundaries, and each step's start and forward time.

    `plan[i]` is (round, policy) of the i-th decode step (0-based) from the plan's start; prefill and mixed
    steps, and decode steps past the plan, run `native`. Every policy's configuration is built once, with
    counters off, so a switch only swaps the hook's configuration (each policy's fit is checked once per
    layer, on its first step). `steps` holds, per step the runner executes: its kind, batch size, round,
    policy, start (perf_counter seconds) and forward seconds.
    """

    def __init__(self, hook: SelectExpertsHook, configs: dict[str, _config.PluginConfig],
                 plan: Sequence[tuple[int | None, str]]) -> None:
        missing = sorted({p for _, p in plan} - set(configs))
        if missing or NATIVE_SPEC not in configs:
            raise ValueError(f"moe_reroute_ab_plan: the plan names policies it was not given ({missing or NATIVE_SPEC})")
        self.hook, self.configs, self.plan = hook, configs, [(r, p) for r, p in plan]
        self.restore = hook.config
        hook.fitted.clear()  # an earlier plan's configurations are gone: their ids may be reused
        self.decode = 0
        self.steps: list[dict[str, Any]] = []

    def begin(self, forward_batch: Any) -> None:
        kind = step_kind(forward_batch)
        rnd, policy = None, NATIVE_SPEC
        if kind == DECODE:
            if self.decode < len(self.plan):
                rnd, policy = self.plan[self.decode]
            self.decode += 1
        self.hook.use(self.configs[policy])
        bs = getattr(forward_batch, "batch_size", None)
        self.steps.append({"kind": kind, "batch": int(bs) if _is_count(bs) else None, "round": rnd,
                           "policy": policy, "t": time.perf_counter()})

    def end(self) -> None:
        self.steps[-1]["forward_s"] = time.perf_counter() - self.steps[-1]["t"]

    def finish(self) -> list[dict[str, Any]]:
        """The steps recorded; the hook routes with its configuration from before the plan again."""
        self.hook.use(self.restore)
        return self.steps


def _mode_is(mode: Any, name: str) -> bool:
    test = getattr(mode, name, None)
    return bool(test()) if callable(test) else False


def step_kind(batch: Any) -> str:
    """What a ForwardBatch's step holds, from its `forward_mode`: DECODE -> "decode" (a speculative draft
    model's decode steps are DECODE steps too), TARGET_VERIFY -> "verify", MIXED -> "mixed", other extend
    modes (EXTEND, SPLIT_PREFILL, ...) -> "prefill", anything else (IDLE, DRAFT_EXTEND_V2, no batch) ->
    "unknown". TARGET_VERIFY and MIXED are extend modes to SGLang, so they are asked first."""
    mode = getattr(batch, "forward_mode", None)
    if batch is not None and _mode_is(EXECUTING.mode, "is_mixed") and _mode_is(mode, "is_extend"):
        mode = EXECUTING.mode  # a mixed step SGLang's eager runner runs as EXTEND
    if _mode_is(mode, "is_decode"):
        return DECODE
    if _mode_is(mode, "is_target_verify"):
        return VERIFY
    if _mode_is(mode, "is_mixed"):
        return MIXED
    if _mode_is(mode, "is_extend"):
        return PREFILL
    return UNKNOWN


def _is_count(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0


def mixed_lens(batch: Any, T: int) -> tuple[tuple[int, ...] | None, str]:
    """(tokens of each request, "") of a MIXED step whose layout covers the layer's T rows, or (None, why
    not: a reason, then ": " and this step's numbers).

    SGLang's `ScheduleBatch.mix_with_running` puts the new extend (prefill) requests first, then every
    running decode request with one token, and `ForwardBatch.init_new` hands the per-request counts on as
    the host list `extend_seq_lens_cpu`. With DP attention, `prepare_mlp_sync_batch` may pad the step:
    `extend_num_tokens` becomes the padded count and the pad rows follow the requests' rows. Read on the
    host only. Refused: counts missing or not on the host, a count per request that does not match
    `batch_size`, a layer that sees another number of rows than the step (a DP-gathered or
    sequence-sharded MoE input), context-parallel or attention-TP-sharded steps.
    """
    lens = getattr(batch, "extend_seq_lens_cpu", None)
    if isinstance(lens, torch.Tensor):
        if lens.device.type != "cpu":
            return None, f"per-request token counts not on the host: extend_seq_lens_cpu on {lens.device}"
        lens = lens.tolist()
    if not isinstance(lens, Sequence) or not all(_is_count(n) for n in lens):
        return None, f"no host list of per-request token counts: extend_seq_lens_cpu={type(lens).__name__}"
    bs = getattr(batch, "batch_size", None)
    if _is_count(bs) and bs != len(lens):
        return None, f"per-request token counts not one per request: {len(lens)} for batch_size={bs}"
    if getattr(batch, "attn_cp_metadata", None) is not None or getattr(batch, "attn_tp_sequence_sharded", False):
        return None, "tokens split over context-parallel or attention-TP ranks: a shard of the step per rank"
    n = sum(lens)
    total = getattr(batch, "extend_num_tokens", None)
    total = total if _is_count(total) else n
    if total != T or n > T:
        return None, (f"MoE rows that are not the step's tokens: the layer sees {T} rows, the step has {n} "
                      f"tokens (extend_num_tokens={total})")
    return tuple(int(x) for x in lens), ""


def prefill_rows(lens: Sequence[int], T: int) -> torch.Tensor:
    """[T] bool on the host, True on the rows of requests with more than one token and on the rows past
    the requests' tokens (padding), in the order SGLang lays a mixed step out (requests one after another).

    A request of one token is a decode row: SGLang's ForwardBatch does not say how many decode requests it
    appended, and a prefill request that extends by one token only (all of its prompt but the last token
    found in the prefix cache) is computed exactly as a decode token is; vLLM's backends, and so the vLLM
    plugin, split them by the same rule.
    """
    counts = torch.tensor(list(lens), dtype=torch.long)  # [R]
    fixed = torch.ones(T, dtype=torch.bool)  # [T]
    n = int(counts.sum())
    fixed[:n] = torch.repeat_interleave(counts > 1, counts)
    return fixed


def reroutes(kind: str, fixed: torch.Tensor | None, cfg: _config.PluginConfig) -> bool:
    """Whether a step of `kind` runs the policy under `cfg`: "all" every step; "pure-decode" decode steps;
    "decode" decode steps, verification steps unless `cfg.verify` is False, and mixed steps whose prefill
    rows are known (`fixed`)."""
    if cfg.phase == "all" or kind == DECODE:
        return True
    if cfg.phase != "decode":
        return False
    return (kind == VERIFY and cfg.verify) or (kind == MIXED and fixed is not None)


class StepRows:
    """`step(T, device) -> (kind, fixed)`: `step_kind` of the step in flight and, for a mixed step, its
    `prefill_rows` on `device` (else None); a mixed step whose layout cannot be read is "unknown".

    Every MoE layer of a step asks: the mask is built and copied to the device once per layout (pinned
    memory, no synchronisation) and kept until the layout changes. `batch` returns the ForwardBatch in
    flight (`current_batch`; tests pass their own).
    """

    def __init__(self, batch: Callable[[], Any] = current_batch) -> None:
        self.batch = batch
        self._key: tuple | None = None
        self._fixed: torch.Tensor | None = None
        self.unread: set[str] = set()

    def __call__(self, T: int, device: torch.device) -> tuple[str, torch.Tensor | None]:
        batch = self.batch()
        kind = step_kind(batch)
        if kind != MIXED:
            return kind, None
        device = torch.device(device)
        if tracing():
            return self._unread("CUDA-graph capture or compile trace: a copied mask would replay stale rows")
        lens, why = mixed_lens(batch, T)
        if lens is None:
            return self._unread(why)
        key = (lens, T, device)
        if key != self._key:
            fixed = prefill_rows(lens, T)  # [T]
            if device.type == "cuda":
                fixed = fixed.pin_memory()
            self._fixed, self._key = fixed.to(device, non_blocking=True), key
        return MIXED, self._fixed

    def _unread(self, why: str) -> tuple[str, None]:
        reason = why.split(": ")[0]  # logged once per reason, not once per step
        if reason not in self.unread:
            self.unread.add(reason)
            logger.info("moe-reroute: a mixed step routes natively (%s); so will others for this reason", why)
        return UNKNOWN, None


def valid_rows(T: int, num_token_non_padded: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """[T] bool, False on the padding rows SGLang adds (rows >= num_token_non_padded). The bound is a
    device tensor (a persistent buffer under CUDA graphs), so this needs no host synchronisation."""
    if num_token_non_padded is None:
        return None
    bound = num_token_non_padded.to(device).reshape(-1)[:1]
    return torch.arange(T, device=device) < bound


def served_model_config() -> Any:
    """The transformers config of the model this SGLang process serves (its language model's, for a
    multimodal one), read as SGLang reads it from its global server args; None when it cannot be read."""
    try:
        from sglang.srt import server_args as _server_args

        try:
            from sglang.srt.utils.hf_transformers_utils import get_config, get_hf_text_config
        except ImportError:  # its place before SGLang moved it under utils/
            from sglang.srt.hf_transformers_utils import get_config, get_hf_text_config

        # the operator's arguments: runtime_context.get_server_args() in 0.5.23 (get_global_server_args()
        # there only raises); get_global_server_args() before
        try:
            from sglang.srt.runtime_context import get_server_args as read
        except ImportError:
            read = _server_args.get_global_server_args
        args = read()
        overrides = json.loads(getattr(args, "json_model_override_args", None) or "{}")
        config = get_config(args.model_path, trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
                            revision=getattr(args, "revision", None), model_override_args=overrides or None)
        return get_hf_text_config(config)
    except Exception as e:  # noqa: BLE001 - a layer without a MoE-layer index still takes a uniform policy
        logger.info("moe-reroute: cannot read the served model's config (%s: %s)", type(e).__name__, e)
        return None


def check_fits(cfg: _config.PluginConfig, spec: RouterSpec, layer: int | None,
               moe_layer: tuple[int | None, str] = (None, "no MoE-layer index was given"),
               moe_layers: int | None = None) -> None:
    """Run the policy once on this layer's shape, so a policy that does not fit the model (k0 > K, a
    per-layer list too short or too long) fails on SGLang's first forward (its warm-up) with a message.
    `layer` is the decoder-layer index, `moe_layer` (its MoE-layer index, "") or (None, why it has none):
    such a layer takes only a policy that gives one value for every layer; `moe_layers` the model's number
    of MoE layers (None: not known)."""
    moe, why = moe_layer
    if moe is None and cfg.policy.config.varies_by_layer():
        raise ValueError(f"moe-reroute: policy {cfg.source} gives values per MoE layer, but decoder layer {layer} "
                         f"has no MoE-layer index: {why}. Give one value for every layer (e.g. cap:k=4), or unset "
                         "the policy for this model")
    try:
        cfg.policy.dry_run(spec, moe, moe_layers)
    except (TypeError, ValueError) as e:
        raise ValueError(f"moe-reroute: policy {cfg.source} does not fit {layer_name(layer, moe)} "
                         f"(E={spec.num_experts}, K={spec.top_k}): {e}") from None


class SelectExpertsHook:
    """The AROUND hook: `hook(select_experts, *args, **kwargs)` -> SGLang's TopKOutput.

    Per layer (one TopKConfig each) the RouterSpec is built on the first call, on the host, and rebuilt
    only if E or the bias tensor changes. `step(T, device)` says what the step in flight holds: (kind,
    [T] bool prefill rows of a mixed step or None), `StepRows()` by default; `model_config` returns the
    served model's transformers config (or None), read once, for the MoE-layer index of each `layer_id`.
    """

    def __init__(self, config: _config.PluginConfig,
                 step: Callable[[int, torch.device], tuple[str, torch.Tensor | None]] | None = None,
                 model_config: Callable[[], Any] = served_model_config) -> None:
        self.config = config
        self.step = StepRows() if step is None else step
        self.model_config = model_config
        self.specs: dict[int, tuple[Any, tuple, RouterSpec | None, str]] = {}  # id(TopKConfig) -> ...
        self.moe_layers: dict[int | None, tuple[int | None, str]] = {}  # layer_id -> (MoE-layer index, why not)
        self._model_config: Any = None
        self._read_config = False
        self.native_reasons: set[str] = set()
        self.counters: dict[int | str, LayerCounter] = {}  # decoder-layer index -> counter (config.counters)
        self.native_policy = Native(NativeConfig(), check_inputs=False)
        self.records: list[dict[str, Any]] | None = None  # every re-routed call, while recording
        self.fitted: set[tuple[int, int]] = set()  # (id(config), id(TopKConfig)) whose fit was checked
        self._rpc_attached = False

    def set_config(self, config: _config.PluginConfig) -> None:
        """Route with `config` from the next step on (layers are checked against it again); counters restart."""
        self.config = config
        self.specs.clear()
        self.fitted.clear()
        self.counters.clear()

    def use(self, config: _config.PluginConfig) -> None:
        """Route with `config` from the next step on, keeping layer specs and counters (an A/B plan's switch:
        the caller keeps `config` alive, and its fit is checked once per layer)."""
        self.config = config

    def counter(self, layer: int | None) -> LayerCounter | None:
        if not self.config.counters:
            return None
        key = layer if layer is not None else "?"
        if key not in self.counters:
            self.counters[key] = LayerCounter(None)
        return self.counters[key]

    def read_counters(self) -> dict[int | str, dict[str, Any]]:
        """Per layer (decoder-layer index), as `moe_reroute.vllm.counters()` reports them."""
        return {k: c.read() for k, c in sorted(self.counters.items(), key=lambda kv: str(kv[0]).zfill(6))}

    def moe_layer(self, layer: int | None) -> tuple[int | None, str]:
        """(MoE-layer index, "") of decoder layer `layer`, or (None, why it has none); computed once."""
        if layer not in self.moe_layers:
            if not self._read_config:
                self._model_config, self._read_config = self.model_config(), True
            self.moe_layers[layer] = moe_index(self._model_config, layer)
        return self.moe_layers[layer]

    def layer_spec(self, topk_config: Any, num_experts: int, layer: int | None) -> RouterSpec | None:
        bias = topk_config.correction_bias
        data = bias.data if isinstance(bias, torch.nn.Parameter) else bias
        key = (num_experts, None if data is None else (data.data_ptr(), data.dtype, data.device, tuple(data.shape)),
               topk_config.custom_routing_function, getattr(topk_config, "fused_gate_packed_ids", False))
        known = self.specs.get(id(topk_config))
        if known is not None and known[0] is topk_config and known[1] == key:
            spec = known[2]
        else:
            spec, reason = topk_spec(topk_config, num_experts)
            if spec is None and reason not in self.native_reasons:
                self.native_reasons.add(reason)
                logger.info("moe-reroute: MoE layers with %s keep SGLang's routing (first: layer %s)", reason, layer)
            self.specs[id(topk_config)] = (topk_config, key, spec, reason)
            self.fitted.discard((id(self.config), id(topk_config)))
        if spec is not None and (id(self.config), id(topk_config)) not in self.fitted:
            check_fits(self.config, spec, layer, self.moe_layer(layer), moe_count(self._model_config))
            self.fitted.add((id(self.config), id(topk_config)))
        return spec

    def __call__(self, select_experts: Callable, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() or len(args) > 3:
            # Under torch.compile (SGLang's --enable-torch-compile) the step's phase cannot be read.
            return select_experts(*args, **kwargs)
        call = dict(zip(SELECT_EXPERTS_PARAMS, args), **kwargs)
        if set(call) - set(SELECT_EXPERTS_PARAMS):
            return select_experts(*args, **kwargs)
        logits, topk_config = call["router_logits"], call["topk_config"]  # [T, E]
        layer = call.get("layer_id")
        info = call.get("expert_location_dispatch_info")
        if (
            call.get("dynamic_expert_bias") is not None
            or call.get("router_logits_partials") is not None
            or getattr(info, "ep_dispatch_algorithm", None) == "fake"  # random logits, for benchmarks
            or logits.dim() != 2
            or logits.shape[0] == 0
        ):
            return select_experts(*args, **kwargs)
        spec = self.layer_spec(topk_config, logits.shape[1], layer)
        if spec is None:
            return select_experts(*args, **kwargs)
        T = logits.shape[0]
        self._attach_rpc()
        if STATE.captured is None and tracing():  # (torch.compile returned above: a CUDA-graph capture)
            STATE.captured = self.config.describe()  # the graph holds this policy: switches cannot reach it
        # fixed [T]: a mixed step's prefill rows keep native routing, and their experts count as loaded
        kind, fixed = (UNKNOWN, None) if self.config.phase == "all" else self.step(T, logits.device)
        valid = valid_rows(T, call.get("num_token_non_padded"), logits.device)
        counter = self.counter(layer)
        if not reroutes(kind, fixed, self.config):
            if counter is not None:
                v = valid if valid is not None else torch.ones(T, dtype=torch.bool, device=logits.device)
                n = v.sum()
                decode = n if kind in (DECODE, VERIFY) else ((~fixed & v).sum() if fixed is not None else 0)
                counter.add_native(n, decode, kind)
            return select_experts(*args, **kwargs)
        policy = self.config.policy
        moe = self.moe_layer(layer)[0]
        records = self.records

        def route(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool):
            if topk != spec.top_k:
                raise ValueError(f"moe-reroute: SGLang asked for {topk} experts per token; "
                                 f"layer {layer} has K={spec.top_k}")
            routing = policy(gating_output, spec, valid, layer=moe, fixed=fixed)
            if counter is not None:
                v = valid if valid is not None else torch.ones(T, dtype=torch.bool, device=gating_output.device)
                native = self.native_policy(gating_output, spec, v, layer=moe)
                if fixed is not None:
                    decode_rows = ~fixed
                elif kind in (DECODE, VERIFY):
                    decode_rows = v
                else:  # "all" on a prefill (or unreadable) step
                    decode_rows = torch.zeros(T, dtype=torch.bool, device=gating_output.device)
            # SGLang's native MoE counts tokens per expert with scatter_ (set, not add): K distinct ids per row
            engine = distinct_ids(routing, spec.num_experts)
            if counter is not None:
                counter.add(routing, native, v, spec.num_experts, kind, decode_rows, engine=engine)
            routing = engine
            if records is not None:
                records.append({"layer": layer, "moe_layer": moe, "kind": kind, "logits": gating_output.detach().cpu().clone(),
                                "ids": routing.ids.cpu().clone(), "weights": routing.weights.cpu().clone(),
                                "fixed": None if fixed is None else fixed.cpu().clone()})
            return routing.weights.to(torch.float32).contiguous(), routing.ids.to(torch.int32).contiguous()  # [T, K]

        rerouted = copy.copy(topk_config)
        rerouted.custom_routing_function = route
        rerouted.use_grouped_topk = False  # select_experts checks grouping before a custom function
        call["topk_config"] = rerouted
        return select_experts(**call)


    def _attach_rpc(self) -> None:
        if not self._rpc_attached:
            self._rpc_attached = attach_rpc()


def attach_rpc() -> bool:
    """Give SGLang's Scheduler the plugin's methods for `Engine.collective_rpc` (see `RPC_METHODS`); True when
    its module is loaded in this process (it is in the scheduler's: SGLang loads plugins from it)."""
    import sys

    scheduler = getattr(sys.modules.get("sglang.srt.managers.scheduler"), "Scheduler", None)
    if scheduler is None:
        return False
    for name, fn in RPC_METHODS.items():
        setattr(scheduler, name, fn)
    return True


def _rpc_save(scheduler: Any, path: str) -> None:
    """`moe_reroute_save(path)`: write {"policy", "counters", "records"} of this scheduler (torch.save). Under
    tensor parallelism every rank's scheduler writes it (their routing and counters are alike), each whole:
    written aside, then moved into place."""
    import os

    hook = STATE.hook
    tmp = f"{path}.{os.getpid()}.partial"
    torch.save({"policy": hook.config.source if hook else None, "counters": hook.read_counters() if hook else {},
                "records": (hook.records or []) if hook else []}, tmp)
    os.replace(tmp, path)


def _rpc_record(scheduler: Any, on: bool = True) -> None:
    """`moe_reroute_record(on)`: record every re-routed call (logits, ids, weights, fixed rows) from now on."""
    if STATE.hook is not None:
        STATE.hook.records = [] if on else None


def local_view(cfg: _config.PluginConfig, origin: str) -> _config.PluginConfig:
    """`cfg`, refused when it asks for a cross-rank view (`dp_view="gather"`), which this plugin does not build."""
    if cfg.dp_view != "local":
        raise ValueError(f"moe-reroute: {origin}: dp_view={cfg.dp_view!r} is built for vLLM's data-parallel "
                         "attention only; the SGLang plugin routes the tokens its MoE layer is given. Leave out "
                         "\"dp_view\" (or give \"local\")")
    return cfg


def refuse_switch_under_graphs(what: str) -> None:
    """A policy switch (or an A/B plan) cannot reach steps that replay CUDA graphs captured with the hook in
    them: say so rather than switch only the steps run eagerly."""
    if STATE.captured is not None:
        raise RuntimeError(f"moe-reroute: {what}: this server replays CUDA graphs captured with policy "
                           f"{STATE.captured}, and a switch would not reach their steps. Start the server without "
                           "CUDA graphs (--disable-cuda-graph, or --cuda-graph-backend-decode=disabled) to switch "
                           "at run time, or start one server per policy (serve-bench --isolate)")


INACTIVE = ("moe-reroute: the plugin is not active in this server (no policy was set at start-up); start it with "
            "MOE_REROUTE_POLICY=native (or a policy) to switch policies and count at run time")


def _rpc_set_policy(scheduler: Any, policy: str) -> None:
    """`moe_reroute_set_policy(policy)`: route with `policy` (a spec or JSON object) from the next step on."""
    if STATE.hook is None:
        raise RuntimeError(INACTIVE)
    refuse_switch_under_graphs("cannot switch policy")
    origin = "moe_reroute_set_policy"
    cfg = local_view(_config.parse_checked(policy, counters=STATE.hook.config.counters, origin=origin), origin)
    STATE.hook.set_config(cfg)


def _rpc_ab_plan(scheduler: Any, policies: list[str], plan: list[list[Any]]) -> None:
    """`moe_reroute_ab_plan(policies, plan)`: from the next step on, decode step i runs plan[i] = [round,
    policy] (policies: every spec the plan names; `native` is added), each step timed, until
    `moe_reroute_ab_save`."""
    if STATE.hook is None:
        raise RuntimeError(INACTIVE)
    refuse_switch_under_graphs("cannot run an A/B plan")
    configs = {p: local_view(_config.parse_checked(p, counters=False, origin="moe_reroute_ab_plan"),
                             "moe_reroute_ab_plan") for p in dict.fromkeys([NATIVE_SPEC, *policies])}
    STATE.ab = ABPlan(STATE.hook, configs, [(r, p) for r, p in plan])


def _rpc_ab_save(scheduler: Any, path: str) -> None:
    """`moe_reroute_ab_save(path)`: end the A/B plan; write its steps to `path` (JSON)."""
    from ..files import write_text_atomic

    ab, STATE.ab = STATE.ab, None
    write_text_atomic(path, json.dumps({"steps": ab.finish() if ab is not None else None}) + "\n")


def _rpc_reset_counters(scheduler: Any) -> None:
    """`moe_reroute_reset_counters()`: zero every counter of this scheduler."""
    if STATE.hook is not None:
        for c in STATE.hook.counters.values():
            c.reset()


# Scheduler methods for `Engine.collective_rpc(name, **kwargs)` (it returns no value: `moe_reroute_save` writes
# the counters and records to a file).
RPC_METHODS = {"moe_reroute_save": _rpc_save, "moe_reroute_record": _rpc_record,
               "moe_reroute_set_policy": _rpc_set_policy, "moe_reroute_reset_counters": _rpc_reset_counters,
               "moe_reroute_ab_plan": _rpc_ab_plan, "moe_reroute_ab_save": _rpc_ab_save}


# A running server's route (`python -m sglang.launch_server`, which has no collective-RPC route): SGLang's
# `POST /dumper/{method}` (served when the server starts with DUMPER_SERVER_PORT=reuse) hands {method, body} to
# every scheduler's `handle_dumper_control`; an AROUND hook on it answers the plugin's methods (`HTTP_METHODS`)
# and passes every other one to SGLang's dumper.
DUMPER = "sglang.srt.managers.scheduler.Scheduler.handle_dumper_control"
DUMPER_ENV = "DUMPER_SERVER_PORT"


def _http_set_policy(scheduler: Any, policy: str) -> list[dict]:
    _rpc_set_policy(scheduler, policy)
    return [{"policy": STATE.hook.config.source}]


def _http_reset_counters(scheduler: Any) -> list[dict]:
    _rpc_reset_counters(scheduler)
    return []


def dp_rank(scheduler: Any) -> int | None:
    """This scheduler's data-parallel rank (None without DP): SGLang 0.5.23 keeps it in its parallel context."""
    try:
        from sglang.srt.runtime_context import get_parallel

        return get_parallel().dp_rank
    except Exception:  # noqa: BLE001 - before 0.5.23, or outside SGLang
        return getattr(scheduler, "dp_rank", None)


def _http_counters(scheduler: Any) -> list[dict]:
    """This scheduler's policy and counters, JSON as it is (layer keys as text), with its DP rank (`http_call`
    runs it only with the plugin active)."""
    return [{"dp_rank": dp_rank(scheduler), "policy": STATE.hook.config.source,
             "counters": {str(k): v for k, v in STATE.hook.read_counters().items()}}]


# what `POST /dumper/<name>` with a JSON object of these arguments does (answers: a list, one entry per DP rank
# for `moe_reroute_counters`)
HTTP_METHODS = {"moe_reroute_set_policy": (_http_set_policy, ("policy",)),
                "moe_reroute_reset_counters": (_http_reset_counters, ()),
                "moe_reroute_counters": (_http_counters, ())}


def http_call(scheduler: Any, method: str, body: Any) -> list[dict]:
    """Run the plugin's `method` with the route's JSON `body` in this scheduler; a ValueError or RuntimeError
    says what is wrong."""
    if method not in HTTP_METHODS:
        raise ValueError(f"moe-reroute: no method {method!r} on this route; there are {', '.join(HTTP_METHODS)}")
    if STATE.hook is None:  # the route alone (`register` without a policy)
        raise RuntimeError(INACTIVE)
    fn, params = HTTP_METHODS[method]
    body = {} if body is None else body
    if not isinstance(body, dict) or set(body) != set(params):
        want = "{" + ", ".join(f'"{p}": ...' for p in params) + "}"
        raise ValueError(f"moe-reroute: {method} takes the JSON object {want}, not {json.dumps(body)[:200]}")
    return fn(scheduler, **body)


def http_control(handle: Callable, scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND `Scheduler.handle_dumper_control`: a `moe_reroute_*` method runs here and answers as SGLang's
    dumper would (`DumperControlReqOutput`; an error as its message, the route's 400); any other is SGLang's."""
    method = getattr(recv_req, "method", None)
    if not (isinstance(method, str) and method.startswith("moe_reroute_")):
        return handle(scheduler, recv_req, *args, **kwargs)
    from sglang.srt.managers.io_struct import DumperControlReqOutput

    try:
        out = DumperControlReqOutput(success=True, response=http_call(scheduler, method, recv_req.body))
    except Exception as e:  # noqa: BLE001 - the caller gets the message, the scheduler goes on serving
        logger.warning("%s", e)
        out = DumperControlReqOutput(success=False, response=[], error=str(e))
    scheduler.ipc_channels.send_to_tokenizer.send_output(out, recv_req)
    return None


class State:
    """Process-wide: whether the hook is registered, and the hook itself (for tests and inspection)."""

    def __init__(self) -> None:
        self.hook: SelectExpertsHook | None = None
        self.ab: ABPlan | None = None  # an A/B plan in progress (`moe_reroute_ab_plan`)
        self.kernel_routed: set[str] = set()  # top-k formats warned about (`note_kernel_routing`)
        self.captured: str | None = None  # the policy a CUDA graph was captured with, once one was
        self.route = False  # whether the `/dumper/` route's hook is registered (`install_route`)


STATE = State()


def sglang_version() -> str | None:
    """The installed SGLang's version, read from its package metadata (importing SGLang is heavy)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def is_supported(version: str) -> bool:
    """Whether an SGLang version string is of a release line the plugin's seams were read against."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in SUPPORTED_SGLANG


def check_version(version: str | None = None) -> None:
    """Raise with a clear message unless SGLang is a 0.5.x release whose seams match this plugin."""
    version = version or sglang_version()
    unset = f"or unset {_config.POLICY_ENV} / {_config.POLICY_FILE_ENV} to run without the plugin"
    if version is None:
        raise RuntimeError(f"moe_reroute.sglang needs SGLang 0.5.x, which is not installed; install it "
                           f"(pip install 'sglang>=0.5,<0.6'), {unset}.")
    if not is_supported(version):
        raise RuntimeError(f"moe-reroute: SGLang {version} is not supported (its select_experts seam was "
                           f"checked for 0.5.x); install SGLang 0.5.x, {unset}.")
    try:
        from sglang.srt.layers.moe import topk
        from sglang.srt.model_executor.forward_context import ForwardContext
    except ImportError as e:
        raise RuntimeError(f"moe-reroute: cannot import SGLang's MoE top-k ({e}); {unset}.") from None
    problems = check_seams(topk.select_experts, topk.TopKConfig, topk.StandardTopKOutput, ForwardContext)
    if problems:
        raise RuntimeError(f"moe-reroute: SGLang {version} differs from what the plugin expects "
                           f"({'; '.join(problems)}); {unset}.")


def check_seams(
    select_experts: Callable, topk_config_cls: type, output_cls: type, forward_context_cls: type
) -> list[str]:
    """What in SGLang's seams differs from what the hook relies on (empty: all as expected)."""
    problems = []
    names = tuple(inspect.signature(select_experts).parameters)
    if names != SELECT_EXPERTS_PARAMS:
        problems.append(f"select_experts{names} is not select_experts{SELECT_EXPERTS_PARAMS}")
    fields = getattr(topk_config_cls, "__dataclass_fields__", {})
    missing = [f for f in TOPK_CONFIG_FIELDS if f not in fields]
    if missing or not hasattr(topk_config_cls, "num_shared_topk_slots"):
        problems.append(f"TopKConfig lacks {', '.join(missing) or 'num_shared_topk_slots'}")
    if tuple(getattr(output_cls, "_fields", ())) != OUTPUT_FIELDS:
        problems.append(f"StandardTopKOutput fields are not {OUTPUT_FIELDS}")
    if "moe_num_token_non_padded" not in getattr(forward_context_cls, "__dataclass_fields__", {}):
        problems.append("ForwardContext lacks moe_num_token_non_padded")
    return problems


def install(cfg: _config.PluginConfig) -> SelectExpertsHook:
    """Register the AROUND hook with SGLang's HookRegistry (once per process); SGLang applies it after
    every plugin has run."""
    if STATE.hook is not None:
        return STATE.hook
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hook = SelectExpertsHook(cfg)
    HookRegistry.register(TARGET, hook, HookType.AROUND)
    HookRegistry.register(EXECUTE, note_mode, HookType.AROUND)
    HookRegistry.register(CAN_BYPASS, route_outside_kernel, HookType.AROUND)
    HookRegistry.register(BIND, note_kernel_routing, HookType.AFTER)
    STATE.hook = hook
    install_route()
    hook._rpc_attached = attach_rpc()
    return hook


def install_route() -> None:
    """Register the `/dumper/` route's hook alone (`http_control`), once per process: a server started without
    a policy answers the plugin's methods with INACTIVE rather than SGLang's dumper's "unknown method"."""
    if STATE.route:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(DUMPER, http_control, HookType.AROUND)
    STATE.route = True


def route_outside_kernel(can_bypass: Callable, config: Any, *args: Any, **kwargs: Any) -> bool:
    """AROUND `_can_bypass_trtllm_routing`: with a policy set, no. SGLang then gives a FlashInfer TRT-LLM
    layer the STANDARD top-k format (its path for routing that kernel cannot express): `select_experts` runs,
    so the policy does, and the kernel takes its ids. Without a policy (no plugin state) SGLang's answer."""
    if STATE.hook is not None:
        return False
    return can_bypass(config, *args, **kwargs)


# top-k formats whose MoE kernels route inside from the logits and never call select_experts
KERNEL_ROUTED = ("BYPASSED", "TRITON_KERNEL")


def note_kernel_routing(result: Any, topk: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER `TopK.bind_runner_backend`: warn, once per format, when a layer's MoE backend still routes inside
    its kernel (the triton-kernels MXFP4 backend, FlashInfer MXFP4 on non-FP4 experts): the policy does not
    apply to that layer, and its counters stay at zero steps."""
    config = getattr(topk, "topk_config", None)
    fmt = getattr(getattr(config, "output_format", None), "name", None)
    if STATE.hook is None or fmt not in KERNEL_ROUTED or fmt in STATE.kernel_routed:
        return None
    STATE.kernel_routed.add(fmt)
    backend = getattr(config, "runner_backend", None)
    logger.warning("moe-reroute: decoder layer %s (and any other layer of this top-k format) runs a MoE backend "
                   "that routes inside its kernel (%s, top-k format %s), so SGLang never calls select_experts "
                   "there and policy %s does not apply (its counters stay at zero steps). Choose another "
                   "--moe-runner-backend, or serve this model without the policy",
                   getattr(topk, "layer_id", "?"), getattr(backend, "name", backend), fmt,
                   STATE.hook.config.describe())
    return None


def register() -> None:
    """The `sglang.srt.plugins` entry point: runs in every SGLang process; does nothing unless
    MOE_REROUTE_POLICY or MOE_REROUTE_POLICY_FILE is set.

    A bad value, an unsupported SGLang or a failure to register the hook raises here. SGLang logs a failing plugin and goes on, so when
    SGLang is importable the plugin also registers a hook that raises the same message on the first
    MoE forward: the server stops at its warm-up instead of serving without the policy asked for. Any
    failure (reading the configuration, registering the hook) does this, whatever its exception.
    """
    try:
        cfg = _config.from_env()
        if cfg is None:
            if os.environ.get(DUMPER_ENV) == "reuse":  # the plugin's methods there say it is not active, and how to fix it
                try:
                    install_route()
                except Exception as e:  # noqa: BLE001 - without a policy the server serves natively anyway
                    logger.warning("moe-reroute: cannot answer on SGLang's /dumper/ route (%s: %s)", type(e).__name__, e)
            return
        local_view(cfg, f"{_config.POLICY_ENV} / {_config.POLICY_FILE_ENV}")
        check_version()
        install(cfg)
    except Exception as e:  # noqa: BLE001 - SGLang would otherwise serve natively
        message = str(e) if isinstance(e, (ValueError, RuntimeError)) else (
            f"moe-reroute: cannot start the SGLang plugin with {_config.POLICY_ENV} / {_config.POLICY_FILE_ENV} "
            f"({type(e).__name__}: {e})")
        _fail_on_first_forward(message)
        raise
    logger.info("moe-reroute: SGLang plugin loaded, policy %s on select_experts", cfg.describe())


def _fail_on_first_forward(message: str) -> None:
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except Exception:  # SGLang missing or not importable here: the raise in register() is all there is
        return

    def refuse(select_experts: Callable, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(message)

    HookRegistry.register(TARGET, refuse, HookType.AROUND)
