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

import re
from typing import Any

import torch

from ..contract import RouterSpec, Routing, engine_spec, layer_name, moe_index
from ..policies.native import Native, NativeConfig
from .config import PluginConfig

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(prefix: str | None) -> int | None:
    """The decoder-layer index in a vLLM module prefix (`model.layers.3.mlp.experts` -> 3)."""
    m = _LAYER.search(prefix or "")
    return int(m.group(1)) if m else None


def moe_layer_of(decoder_layer: int | None) -> tuple[int | None, str]:
    """(MoE-layer index, "") of a decoder layer of the model vLLM is building, from its config
    (`model_config.hf_text_config`: the language model's, for multimodal models), or (None, why not)."""
    from vllm.config import get_current_vllm_config

    model_config = getattr(get_current_vllm_config(), "model_config", None)
    config = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    return moe_index(config, decoder_layer)


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
    if n_group <= 1 and topk_group <= 1:
        grouped = False
    extra = {}
    if scoring == "sigmoid":  # FusedTopKRouter never scales its weights; the others carry routed_scaling_factor
        extra["routed_scaling_factor"] = (float(getattr(router, "routed_scaling_factor", 1.0))
                                          if name != "FusedTopKRouter" else 1.0)
    return engine_spec(num_experts, K, scoring, renorm, has_bias=bias is not None, grouped=grouped, n_group=n_group,
                       topk_group=topk_group, arch="vllm", **extra)


def is_decode_step() -> bool:
    """Whether every sequence of the step in flight decodes one token, from vLLM's forward context.

    The attention metadata says whether the step holds prefill: `num_prefills` (FlashInfer, MLA) or
    `max_query_len` (CPU, FlashAttention, Triton). No metadata (profiling, a dummy step) counts as prefill.
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return False
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):  # dual-batch overlap: one dict per micro-batch
        meta = meta[0] if meta else None
    if not isinstance(meta, dict) or not meta:
        return False
    m = next(iter(meta.values()))
    if getattr(m, "num_prefills", None) is not None:
        return m.num_prefills == 0 and getattr(m, "num_decodes", 1) > 0
    if getattr(m, "max_query_len", None) is not None:
        return m.max_query_len == 1
    return False


def step_padding() -> torch.Tensor | None:
    """[T] bool, True for rows vLLM added as padding. It is the runner's persistent buffer, so a CUDA
    graph reads each replay's value."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return get_forward_context().is_padding if is_forward_context_available() else None


class LayerCounter:
    """Per layer, kept on the device (no host synchronisation until read): the steps the policy ran, U of
    the policy and of native routing summed over them, their valid tokens; and every MoE step the layer
    saw (re-routed or not) with its tokens."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # steps re-routed, U, native U, tokens re-routed, steps seen, tokens seen
        self.sums = torch.zeros(6, dtype=torch.int64, device=device)

    def _on(self, device: torch.device) -> None:
        if self.sums.device != device:
            self.sums = self.sums.to(device)

    def add(self, routing: Routing, native: Routing, valid: torch.Tensor, num_experts: int) -> None:
        from ..metrics import unique_experts

        self._on(valid.device)
        u = unique_experts(routing, num_experts)
        un = unique_experts(native, num_experts)
        one = torch.ones((), dtype=torch.int64, device=u.device)
        n = valid.sum()
        self.sums += torch.stack([one, u.long(), un.long(), n, one, n])

    def add_native(self, tokens: torch.Tensor) -> None:
        """A step the policy did not run on (prefill, a mixed step): `tokens` [] int64, its valid tokens."""
        self._on(tokens.device)
        self.sums[4] += 1
        self.sums[5] += tokens

    def reset(self) -> None:
        self.sums.zero_()

    def read(self) -> dict[str, float]:
        steps, u, un, tokens, seen, tokens_seen = self.sums.tolist()
        d = max(steps, 1.0)
        return {"steps": int(steps), "unique": u / d, "unique_native": un / d, "tokens": tokens / d,
                "steps_seen": int(seen), "tokens_rerouted": int(tokens), "tokens_seen": int(tokens_seen)}


class Rerouter:
    """Replaces one router's `_compute_routing`: the policy on decode steps, vLLM's own otherwise."""

    def __init__(self, router: Any, config: PluginConfig, layer: int | None, state: Any, num_experts: int,
                 moe_layer: tuple[int | None, str] = (None, "no MoE-layer index was given")) -> None:
        self.router = router
        self.config = config
        self.layer = layer  # decoder-layer index: counters and messages
        self.moe_layer, self.moe_why = moe_layer  # MoE-layer index: the policy's `layer`, or None and why
        self.state = state  # the plugin's shared state: start-up log, counters
        self.native_compute = router._compute_routing
        self.native_policy = Native(NativeConfig(), check_inputs=False)
        self.is_native = isinstance(config.policy, Native)  # the plugin's "native" policy: vLLM's own routing
        self.spec: RouterSpec | None = None
        self.reason = ""
        self.counter: LayerCounter | None = None
        self._bias_key: tuple | None = None
        self.layer_spec(num_experts)

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

    def check(self) -> None:
        """Run the policy once on this layer's shape, so a policy that does not fit the model (k0 > K, a
        per-layer list too short, a similarity of the wrong size) fails while vLLM builds the model. A layer
        without a MoE-layer index takes only a policy that gives one value for every layer."""
        if self.spec is None:
            return
        if self.moe_layer is None and self.config.policy.config.varies_by_layer():
            raise ValueError(f"moe-reroute: policy {self.config.source} gives values per MoE layer, but decoder layer "
                             f"{self.layer} has no MoE-layer index: {self.moe_why}. Give one value for every layer "
                             "(e.g. cap:k=4), or unset the policy for this model")
        spec = self.spec.with_bias(None) if self.spec.e_score_correction_bias is not None else self.spec
        logits = torch.linspace(-1, 1, 2 * spec.num_experts, device="cpu").view(2, -1)  # [2, E], no ties
        try:
            self.config.policy(logits, spec, layer=self.moe_layer)
        except (TypeError, ValueError) as e:
            raise ValueError(f"moe-reroute: policy {self.config.source} does not fit "
                             f"{layer_name(self.layer, self.moe_layer)} (E={spec.num_experts}, K={spec.top_k}): {e}"
                             ) from None

    def __call__(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,  # [T, E]
        indices_type: torch.dtype | None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # vLLM on CPU compiles through the router, where a step's phase cannot be read: stay native
            # (the plugin warned when the model was built).
            return self.native_compute(hidden_states, router_logits, indices_type, input_ids=input_ids)
        self.state.on_step()
        counter = self.counter if self.state.counting else None
        spec = self.layer_spec(router_logits.shape[-1])
        if spec is None or router_logits.shape[0] == 0 or not (self.config.phase == "all" or is_decode_step()):
            if counter is not None:
                counter.add_native(self._valid_tokens(router_logits.shape[0], router_logits.device))
            return self.native_compute(hidden_states, router_logits, indices_type, input_ids=input_ids)
        if self.is_native and counter is None:
            # exactly vLLM's routing (tests check the native policy gives it), without the policy's ops
            return self.native_compute(hidden_states, router_logits, indices_type, input_ids=input_ids)
        T = router_logits.shape[0]
        padding = step_padding()
        # is_padding covers the step's tokens; a layer that sees another slice of them (sequence-parallel
        # MoE) cannot tell its padding, and counts every row.
        valid = ~padding if padding is not None and padding.shape[0] == T else None
        policy = self.config.policy
        native_topk = None
        if not policy.uses_kernels(router_logits):
            # ranks 1..K are vLLM's own top-K, ties as vLLM breaks them (the fused kernels' ties go to the
            # lower id, as vLLM's CUDA top-k)
            native_topk = self.native_compute(hidden_states, router_logits, indices_type, input_ids=input_ids)
        routing = policy(router_logits, spec, valid, layer=self.moe_layer, native=native_topk)
        if counter is not None:
            v = valid if valid is not None else torch.ones(T, dtype=torch.bool, device=router_logits.device)
            native = self.native_policy(router_logits, spec, v, layer=self.layer)
            counter.add(routing, native, v, spec.num_experts)
        weights = routing.weights.to(torch.float32).contiguous()  # [T, K]
        ids = routing.ids.to(indices_type or torch.int32).contiguous()  # [T, K]
        return weights, ids

    @staticmethod
    def _valid_tokens(T: int, device: torch.device) -> torch.Tensor:
        padding = step_padding()
        if padding is not None and padding.shape[0] == T:
            return (~padding).sum()
        return torch.tensor(T, dtype=torch.int64, device=device)
