"""Route one vLLM MoE layer with a policy: the RouterSpec of a vLLM router, the step's phase and
padding from the forward context, and the replacement for the router's `_compute_routing`.

vLLM's `BaseRouter._select_experts` calls `_compute_routing(hidden_states, router_logits, indices_type)`,
then records the logical ids, maps them to physical experts (EPLB) and casts them. Replacing only
`_compute_routing` on the instance keeps all of that. T = tokens in the step, E = experts, K = top-k.

Layers: vLLM names a router by its decoder layer (`model.layers.3.mlp.experts`); the policy is called
with that layer's MoE-layer index (dense layers not counted), read from the model's config by
`moe_reroute.contract.moe_index`. Counters and messages keep the decoder-layer index.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch

from ..contract import RouterSpec, engine_spec, layer_name, moe_count, moe_index
from ..policies.native import Native, NativeConfig
from ..serving.config import PluginConfig
from ..serving.steps import DECODE, MIXED, PREFILL, STEP_KINDS, UNKNOWN, VERIFY, LayerCounter  # noqa: F401

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(prefix: str | None) -> int | None:
    """The decoder-layer index in a vLLM module prefix (`model.layers.3.mlp.experts` -> 3)."""
    m = _LAYER.search(prefix or "")
    return int(m.group(1)) if m else None


def _model_config() -> Any:
    """The transformers config of the model vLLM is building (`model_config.hf_text_config`: the language
    model's, for multimodal models), or None."""
    from vllm.config import get_current_vllm_config

    model_config = getattr(get_current_vllm_config(), "model_config", None)
    return getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)


def moe_layer_of(decoder_layer: int | None) -> tuple[int | None, str]:
    """(MoE-layer index, "") of a decoder layer of the model vLLM is building, from its config, or (None,
    why not)."""
    return moe_index(_model_config(), decoder_layer)


def moe_layer_count() -> int | None:
    """How many MoE layers the model vLLM is building has, from its config; None where that is not known."""
    return moe_count(_model_config())


def router_spec(router: Any, num_experts: int) -> tuple[RouterSpec | None, str]:
    """The RouterSpec a vLLM router routes by, or (None, why it is not supported).

    Softmax top-K (optionally renormalised), sigmoid top-K with or without DeepSeek-V3's correction
    bias, and DeepSeek-V3's group-limited selection (sigmoid + bias, groups scored by their top-2) are
    supported. Custom routing functions, softmax or unbiased group-limited routing (vLLM scores those
    groups by their max), fused shared experts, hash or sqrt-softplus routing keep vLLM's routing.
    """
    name = type(router).__name__
    if name not in ("CPURouter", "FusedTopKRouter", "GroupedTopKRouter", "FusedTopKBiasRouter"):
        return None, f"router {name} is not supported"
    if getattr(router, "custom_routing_function", None) is not None:
        return None, "a custom routing function"
    if getattr(router, "_hash_indices_table", None) is not None:
        return None, "hash routing"
    if getattr(router, "bias_vl", None) is not None:
        return None, "a second bias for image tokens"
    if getattr(router, "num_fused_shared_experts", 0):
        return None, "shared experts fused into the routed top-k"
    scoring = getattr(router, "scoring_func", "softmax")
    K = int(router.top_k)
    renorm = bool(getattr(router, "renormalize", True))
    bias = getattr(router, "e_score_correction_bias", None)
    grouped = bool(getattr(router, "use_grouped_topk", name == "GroupedTopKRouter"))
    n_group = int(getattr(router, "num_expert_group", None) or 1) if grouped else 1
    topk_group = int(getattr(router, "topk_group", None) or 1) if grouped else 1
    scaled = name == "FusedTopKBiasRouter" or (name in ("GroupedTopKRouter", "CPURouter") and grouped)
    if scoring != "sigmoid" and scaled and float(getattr(router, "routed_scaling_factor", 1.0)) != 1.0:
        # vLLM's grouped top-K scales softmax weights too (a degenerate grouping, n_group = topk_group = 1,
        # keeps that router); the policies scale only sigmoid routers' weights
        return None, "softmax weights scaled by routed_scaling_factor"
    if n_group <= 1 and topk_group <= 1:
        grouped = False
    extra = {}
    if scoring == "sigmoid":  # FusedTopKRouter never scales its weights; the others carry routed_scaling_factor
        extra["routed_scaling_factor"] = (float(getattr(router, "routed_scaling_factor", 1.0))
                                          if name != "FusedTopKRouter" else 1.0)
    return engine_spec(num_experts, K, scoring, renorm, has_bias=bias is not None, grouped=grouped, n_group=n_group,
                       topk_group=topk_group, arch="vllm", **extra)




def _step_metadata():
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):  # dual-batch overlap: one dict per micro-batch
        meta = meta[0] if meta else None
    if not isinstance(meta, dict) or not meta:
        return None
    return next(iter(meta.values()))


def capture_for_any_step() -> bool:
    """Whether the forward running now cannot read its step's kind: it is the capture of a CUDA graph that
    vLLM replays for steps of other kinds than its capture batch. A piecewise graph (mixed and prefill
    steps, in the default FULL_AND_PIECEWISE mode) is replayed for any batch of its token count, yet is
    captured on a dummy batch of one token per request, which reads as decode; a full graph not captured for
    a uniform batch (FULL mode) likewise. A full graph of a uniform batch (decode, or verification of k
    speculative tokens each) is replayed only for batches like it, so its capture reads its kind."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return False
    ctx = get_forward_context()
    mode = getattr(getattr(ctx, "cudagraph_runtime_mode", None), "name", None)
    if mode == "FULL":  # (a uniform batch: "uniform", or "uniform_decode" in releases that named it so)
        d = getattr(ctx, "batch_descriptor", None)
        return not getattr(d, "uniform", getattr(d, "uniform_decode", False))
    return mode == "PIECEWISE"


def step_rows(T: int, decode_threshold: int = 1, device: torch.device | str = "cpu") -> tuple[str, torch.Tensor | None]:
    """What the step in flight holds, from vLLM's attention metadata, and which of its T rows are prefill.

    Returns (kind, prefill): kind is "decode" (every sequence decodes one token), "verify" (every sequence
    has at most `decode_threshold` tokens, some more than one: speculative verification), "mixed" (decode
    and prefill sequences), "prefill" (no decode sequence) or "unknown" (no metadata: profiling, dummy
    steps; or metadata that cannot be read without a host synchronisation). `prefill` is a [T] bool mask
    (True: a prefill row, or a row past the step's tokens) for "mixed" steps, else None.

    A sequence is a decode sequence when its query length is at most `decode_threshold` (1, or 1 + the
    speculative tokens), as vLLM's own backends split them. Counts come from `num_decodes` /
    `num_decode_tokens` / `num_prefills` (FlashInfer, MLA: decodes first) or from `query_start_loc` when it
    lives on the host (CPU); `max_query_len == 1` alone tells a pure decode step on every backend.

    "unknown" too while a CUDA graph that will be replayed for steps of any kind is captured
    (`capture_for_any_step`: what is read then is the capture's dummy batch), and for a mixed step whose
    T rows are not the step's tokens (sequence-parallel MoE: each TP rank routes its slice of the step, whose
    rows the step's counts do not place).
    """
    m = _step_metadata()
    if m is None or capture_for_any_step():
        return UNKNOWN, None
    tokens = step_padding()  # [the step's (padded) tokens] where vLLM marks padding
    sliced = tokens is not None and tokens.shape[0] != T
    if getattr(m, "num_prefills", None) is not None and getattr(m, "num_decode_tokens", None) is not None:
        nd, npf, ndt = int(getattr(m, "num_decodes", 0)), int(m.num_prefills), int(m.num_decode_tokens)
        if npf == 0 and nd > 0:
            return (DECODE if ndt == nd else VERIFY), None
        if nd == 0:
            return PREFILL, None
        if sliced:
            return UNKNOWN, None
        return MIXED, torch.arange(T, device=device) >= ndt  # these backends put the decodes first
    max_q = getattr(m, "max_query_len", None)
    if max_q == 1:
        return DECODE, None
    qsl = getattr(m, "query_start_loc", None)
    if max_q is None or not isinstance(qsl, torch.Tensor) or qsl.device.type != "cpu" or qsl.numel() < 2:
        return UNKNOWN, None
    qlen = qsl[1:] - qsl[:-1]  # [R] tokens per sequence
    is_decode = qlen <= decode_threshold  # [R]
    if bool(is_decode.all()):
        return (DECODE if max_q <= 1 else VERIFY), None
    if not bool(is_decode.any()):
        return PREFILL, None
    if sliced:
        return UNKNOWN, None
    n = int(qsl[-1])
    prefill = torch.ones(T, dtype=torch.bool)
    prefill[: min(n, T)] = torch.repeat_interleave(~is_decode, qlen)[:T]
    return MIXED, prefill.to(device)


def step_padding() -> torch.Tensor | None:
    """[T] bool, True for rows vLLM added as padding. It is the runner's persistent buffer, so a CUDA
    graph reads each replay's value."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return get_forward_context().is_padding if is_forward_context_available() else None


def skipped_rows(native_topk: tuple[torch.Tensor, torch.Tensor] | None, valid: torch.Tensor | None
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None, torch.Tensor | None]:
    """The rows vLLM's own router skipped: it gives padding rows expert id -1 and weight 0, so that the
    experts skip them (`VLLM_MOE_SKIP_PADDING`, on by default, from the step's `is_padding`: the CUDA top-K
    kernels, the grouped router with `skip_padding`; not the CPU router). A policy reads every row's ids, so
    those rows' ids become 0..K-1 and the rows count as padding. Returns (native (weights, ids), valid, [T]
    bool of the skipped rows), or (None, valid, None) without native ids (a fused kernel routes: padding rows
    then point at an expert a real token uses, with weight 0). Tensor ops only: no host synchronisation."""
    if native_topk is None:
        return None, valid, None
    weights, ids = native_topk
    skipped = (ids < 0).any(dim=-1)  # [T]
    slots = torch.arange(ids.shape[-1], device=ids.device, dtype=ids.dtype).expand_as(ids)
    ids = torch.where(skipped[:, None], slots, ids)
    valid = ~skipped if valid is None else valid & ~skipped
    return (weights, ids), valid, skipped


def decode_threshold() -> int:
    """Tokens a decode sequence may have in one step: 1, or 1 + the speculative tokens being verified."""
    try:
        from vllm.config import get_current_vllm_config

        spec = get_current_vllm_config().speculative_config
        return 1 + int(getattr(spec, "num_speculative_tokens", 0) or 0) if spec is not None else 1
    except Exception:  # noqa: BLE001 - no configuration in context (a router built by hand): plain decoding
        return 1


def current_engine() -> Any:
    """A weak reference to the vLLM configuration in context (the engine being built), or None."""
    import weakref

    try:
        from vllm.config import get_current_vllm_config

        return weakref.ref(get_current_vllm_config())
    except Exception:  # noqa: BLE001 - no configuration in context (a router built by hand), or not weak-referable
        return None


def dp_group() -> tuple[Any, int] | None:
    """(vLLM's data-parallel group, this worker's rank in it) when the engine runs more than one DP rank."""
    try:
        from vllm.distributed import get_dp_group

        group = get_dp_group()
    except (ImportError, AssertionError):  # no distributed state (a router built by hand): one rank
        return None
    return (group, group.rank_in_group) if group.world_size > 1 else None


def dp_sizes(T: int, device: torch.device, gather: Any, ranks: int, rank: int) -> list[int]:
    """Every DP rank's rows in this step: vLLM's `dp_metadata` (on the host) where the step has it, else one
    all-gather of the count. Every rank takes the same way (the collectives must match): a layer whose rows
    are not what the metadata counts (a sequence-parallel MoE layer sees a slice) raises instead."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    meta = get_forward_context().dp_metadata if is_forward_context_available() else None
    if meta is not None:
        sizes = [int(n) for n in meta.num_tokens_across_dp_cpu.tolist()]
        if len(sizes) != ranks or sizes[rank] != T:
            raise RuntimeError(f"moe-reroute: dp_view \"gather\": this MoE layer sees {T} rows on DP rank {rank}, but "
                               f"vLLM's data-parallel metadata counts {sizes} (a sequence-parallel MoE layer sees a "
                               "slice of its rank's rows); use \"dp_view\": \"local\" with this engine")
        return sizes
    from ..serving.dp import gather_sizes

    return gather_sizes(T, device, gather)


class Rerouter:
    """Replaces one router's `_compute_routing`: the policy on the decode tokens of every step (phase
    "decode"), on pure decode steps only ("pure-decode"), or on every token ("all"); vLLM's own otherwise."""

    def __init__(self, router: Any, config: PluginConfig, layer: int | None, state: Any, num_experts: int,
                 moe_layer: tuple[int | None, str] = (None, "no MoE-layer index was given"),
                 engine_ep: tuple[torch.Tensor, int, int, str] | None = None,
                 moe_layers: int | None = None) -> None:
        self.router = router
        self.config = config
        self.layer = layer  # decoder-layer index: counters and messages
        self.moe_layer, self.moe_why = moe_layer  # MoE-layer index: the policy's `layer`, or None and why
        self.moe_layers = moe_layers  # the model's number of MoE layers (None: not known)
        self.state = state  # the plugin's shared state: start-up log, counters
        self.native_compute = router._compute_routing
        self.native_policy = Native(NativeConfig(), check_inputs=False)
        self.is_native = isinstance(config.policy, Native)  # the plugin's "native" policy: vLLM's own routing
        self.spec: RouterSpec | None = None
        self.reason = ""
        self.counter: LayerCounter | None = None
        # the engine's own EP layout (placement [E], D, this worker's rank, origin), where it runs EP
        self.engine_ep = engine_ep
        self.policy = config.policy  # the policy as this layer runs it (`placement=engine` filled in: `check`)
        self.frozen = ""  # why the policy cannot be switched at run time (CUDA graphs, compiled); "" when it can
        self._bias_key: tuple | None = None
        self.decode_threshold = decode_threshold()
        self._engine = current_engine()  # the configuration of the engine being built (weak), or None
        self.layer_spec(num_experts)

    def engine_of(self) -> Any:
        """The vLLM configuration of the engine this layer was built in (None if unknown or collected)."""
        return self._engine() if self._engine is not None else None

    def layer_spec(self, num_experts: int) -> RouterSpec | None:
        """The spec, rebuilt when E or the bias tensor changes (vLLM may swap a parameter's `.data`
        after loading, e.g. to cast DeepSeek's bias): a host-side comparison, no synchronisation."""
        bias = getattr(self.router, "e_score_correction_bias", None)
        data = bias.data if isinstance(bias, torch.nn.Parameter) else bias
        key = None if data is None else (data.data_ptr(), data.dtype, data.device, tuple(data.shape))
        if self.spec is None or self.spec.num_experts != num_experts or key != self._bias_key:
            self.spec, self.reason = router_spec(self.router, num_experts)
            self._bias_key = key
            if self.spec is not None and data is not None:
                self.spec = self.spec.with_bias(data)
        return self.spec

    def set_config(self, config: PluginConfig) -> None:
        """Route with `config` from the next call on (check it first with `check(config)`)."""
        self.config = config
        self.is_native = isinstance(config.policy, Native)
        try:
            self.policy = self.layer_policy(config)
        except ValueError:
            if self.spec is not None:  # `check` refused it already, naming the layer
                raise
            self.policy = config.policy  # a layer this policy does not route (it stays native)

    def layer_policy(self, config: PluginConfig):
        """`config`'s policy with its EP options checked against the engine's own EP (`ep` = its ranks) and
        `placement=engine` replaced by the engine's placement (`policies.ep.engine_policy`)."""
        from ..policies.ep import engine_policy

        placement, ranks = (self.engine_ep[0], self.engine_ep[1]) if self.engine_ep is not None else (None, None)
        return engine_policy(config.policy, placement, ranks, origin="this engine")

    def check(self, config: PluginConfig | None = None) -> None:
        """Run the policy (`config`'s, default this layer's own) once on this layer's shape, so a policy that
        does not fit the model (k0 > K, a per-layer list too short, a similarity of the wrong size) fails while
        vLLM builds the model, or before a switch to it. A layer without a MoE-layer index takes only a policy
        that gives one value for every layer."""
        config = self.config if config is None else config
        if self.spec is None:
            return
        if self.moe_layer is None and config.policy.config.varies_by_layer():
            raise ValueError(f"moe-reroute: policy {config.source} gives values per MoE layer, but decoder layer "
                             f"{self.layer} has no MoE-layer index: {self.moe_why}. Give one value for every layer "
                             "(e.g. cap:k=4), or unset the policy for this model")
        try:
            self.layer_policy(config).dry_run(self.spec, self.moe_layer, self.moe_layers)
        except (TypeError, ValueError) as e:
            raise ValueError(f"moe-reroute: policy {config.source} does not fit "
                             f"{layer_name(self.layer, self.moe_layer)} (E={self.spec.num_experts}, "
                             f"K={self.spec.top_k}): {e}") from None

    def __call__(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,  # [T, E]
        indices_type: torch.dtype | None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # A compiled graph would fix this step's layout and policy for every step: refuse while vLLM
            # compiles the model at start-up (on CPU the plugin runs the MoE layer as an opaque op instead).
            from .plugin import COMPILED_REFUSAL

            raise RuntimeError(COMPILED_REFUSAL)
        self.state.on_step()
        counter = self.counter if self.state.counting else None
        spec = self.layer_spec(router_logits.shape[-1])
        T = router_logits.shape[0]
        device = router_logits.device
        phase = self.config.phase
        kind, prefill = step_rows(T, self.decode_threshold, device)
        reroute = spec is not None and T > 0 and (
            phase == "all" or kind == DECODE
            or (phase == "decode" and (kind == MIXED or (kind == VERIFY and self.config.verify))))
        fixed = prefill if phase == "decode" else None  # "all": prefill rows re-routed too
        if self.config.dp_view == "gather" and spec is not None and not self.is_native:
            dp = dp_group()
            if dp is not None:
                return self._route_gathered(dp, hidden_states, router_logits, indices_type, input_ids, spec, kind,
                                            prefill, fixed, reroute, counter)
        if not reroute:
            if counter is not None:
                self._count_native(counter, T, device, kind, prefill)
            return self.native_compute(hidden_states, router_logits, indices_type, input_ids=input_ids)
        if self.is_native and counter is None:
            # exactly vLLM's routing (tests check the native policy gives it), without the policy's ops
            return self.native_compute(hidden_states, router_logits, indices_type, input_ids=input_ids)
        padding = step_padding()
        # is_padding covers the step's tokens; a layer that sees another slice of them (sequence-parallel
        # MoE) cannot tell its padding, and counts every row.
        valid = ~padding if padding is not None and padding.shape[0] == T else None
        native_topk = self._native_topk(hidden_states, router_logits, indices_type, input_ids)
        native_topk, valid, skipped = skipped_rows(native_topk, valid)
        # fixed: a mixed step's prefill rows keep native routing, and their experts count as loaded
        routing = self.policy(router_logits, spec, valid, layer=self.moe_layer, native=native_topk, fixed=fixed)
        if counter is not None:
            v = valid if valid is not None else torch.ones(T, dtype=torch.bool, device=device)
            native = self.native_policy(router_logits, spec, v, layer=self.moe_layer)
            if prefill is not None:
                decode_rows = ~prefill
            elif kind in (DECODE, VERIFY):
                decode_rows = v
            else:  # "all" on a prefill (or unreadable) step
                decode_rows = torch.zeros(T, dtype=torch.bool, device=device)
            counter.add(routing, native, v, spec.num_experts, kind, decode_rows)
        return self._engine_output(routing, indices_type, skipped)

    def _native_topk(self, hidden_states, router_logits, indices_type, input_ids):
        """vLLM's own top-K for ranks 1..K, ties as vLLM breaks them, where the policy runs in torch (the fused
        kernels' ties go to the lower id, as vLLM's CUDA top-k); None where it runs a kernel."""
        if self.policy.uses_kernels(router_logits):
            return None
        return self.native_compute(hidden_states, router_logits, indices_type, input_ids=input_ids)

    @staticmethod
    def _engine_output(routing, indices_type, skipped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's output contract: float32 weights [T, K], ids [T, K] of `indices_type` (default int32); the rows
        vLLM's own router skipped (`skipped_rows`) as it gives them: id -1, weight 0."""
        weights, ids = routing.weights.to(torch.float32), routing.ids.to(indices_type or torch.int32)
        if skipped is not None:
            weights = weights.masked_fill(skipped[:, None], 0.0)
            ids = ids.masked_fill(skipped[:, None], -1)
        return weights.contiguous(), ids.contiguous()

    def _count_native(self, counter: LayerCounter, T: int, device: torch.device, kind: str,
                      prefill: torch.Tensor | None) -> None:
        rows = self._valid_rows(T, device)
        valid_n = rows.sum()
        decode_n = valid_n if kind in (DECODE, VERIFY) else ((~prefill & rows).sum() if prefill is not None else 0)
        counter.add_native(valid_n, decode_n, kind)

    def _route_gathered(self, dp, hidden_states, router_logits, indices_type, input_ids, spec, kind, prefill, fixed,
                        reroute, counter) -> tuple[torch.Tensor, torch.Tensor]:
        """`dp_view="gather"` under data parallelism: the policy routes every DP rank's rows as one batch
        (`serving.dp.route_across_ranks`), and this rank keeps its own. Every rank takes part in every step's
        gathers whatever its own step holds, as the collectives must match: rows this rank does not re-route
        (a step that is not re-routed, a mixed step's prefill rows) go in as fixed rows, native and loaded.
        On the steps this rank re-routes its counters count the whole batch (the same on every DP rank whose
        step is re-routed); its other steps count as not re-routed, its own rows only."""
        from ..serving.dp import route_across_ranks

        group, rank = dp
        gather = functools.partial(group.all_gather, dim=0)
        T, device = router_logits.shape[0], router_logits.device
        valid = self._valid_rows(T, device)
        if not reroute:
            fixed = torch.ones(T, dtype=torch.bool, device=device)
        elif fixed is None:
            fixed = torch.zeros(T, dtype=torch.bool, device=device)
        native_topk = self._native_topk(hidden_states, router_logits, indices_type, input_ids)
        native_topk, valid, skipped = skipped_rows(native_topk, valid)
        sizes = dp_sizes(T, device, gather, group.world_size, rank)
        routing, whole, logits, valid_all, fixed_all = route_across_ranks(
            self.policy, router_logits, spec, rank, sizes, gather, valid, fixed, native_topk, self.moe_layer)
        if counter is not None and reroute:
            native = self.native_policy(logits, spec, valid_all, layer=self.moe_layer)
            counter.add(whole, native, valid_all, spec.num_experts, kind, ~fixed_all)
        elif counter is not None:
            self._count_native(counter, T, device, kind, prefill)
        return self._engine_output(routing, indices_type, skipped)

    @staticmethod
    def _valid_rows(T: int, device: torch.device) -> torch.Tensor:
        padding = step_padding()
        if padding is not None and padding.shape[0] == T:
            return ~padding
        return torch.ones(T, dtype=torch.bool, device=device)

