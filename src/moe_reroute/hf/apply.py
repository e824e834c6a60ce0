"""Apply a routing policy to a transformers MoE model, in place, by hooking only its router modules.

The experts, shared experts and the experts implementation are untouched: each MoE block's router
(`mlp.gate`, or `mlp.router` for GPT-OSS) still computes its logits, and a forward hook replaces its
(weights, ids) with the policy's. A pre-hook on the decoder model reads each forward's token layout
(batch B, new tokens S, attention mask, finished sequences) and its kind (see `LayoutTracker`) so the
router hooks know what a batch is and whether it holds decode tokens.

Layer numbering: the policy is called with each layer's MoE-layer index (the n-th MoE layer of the model
is layer n, dense layers not counted), which is what per-layer values are indexed by. Where this module
names layers to people (`apply(layers=...)`, `Applied.layers`, error messages) it uses decoder-layer
indices, as the modules are named (`model.layers.3.mlp.gate` is decoder layer 3).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from types import MethodType

import torch
from torch import nn

from ..contract import SUPPORTED_ARCHITECTURES, RouterSpec, layer_name, text_config
from ..policies import Policy, make_policy

# model_type -> (attribute of the MoE block holding the router, the router's class name). The language
# model's model_type: a multimodal model (Qwen3.5's qwen3_5_moe) is found by its text config's.
ROUTERS = {
    "qwen3_moe": ("gate", "Qwen3MoeTopKRouter"),
    "qwen2_moe": ("gate", "Qwen2MoeTopKRouter"),
    "olmoe": ("gate", "OlmoeTopKRouter"),
    "mixtral": ("gate", "MixtralTopKRouter"),
    "deepseek_v3": ("gate", "DeepseekV3TopkRouter"),
    "gpt_oss": ("router", "GptOssTopKRouter"),
    "qwen3_next": ("gate", "Qwen3NextTopKRouter"),
    "qwen3_5_moe_text": ("gate", "Qwen3_5MoeTopKRouter"),
    "glm4_moe": ("gate", "Glm4MoeTopkRouter"),
    "dots1": ("gate", "Dots1TopkRouter"),
    "minimax_m2": ("gate", "MiniMaxM2TopKRouter"),
}
# model_types whose MoE block, not its router, holds the correction bias (and passes it to the router)
BIAS_ON_BLOCK = ("minimax_m2",)
_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # such a router -> a weak reference to its block
PHASES = ("decode", "all", "decode-sim")
KINDS = ("decode", "verify", "prefill", "unknown")
APPLIED_ATTR = "_moe_reroute_applied"  # the model's Applied handle while a policy is on it
PREFILL_ATTR = "_moe_reroute_prefill"  # the model's PrefillWatch while a tracker needs it


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (the module with `.layers`) of a CausalLM or base model, or of a multimodal model's
    language model (`model.model.language_model`)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers") and hasattr(getattr(inner, "language_model", None), "layers"):
        inner = inner.language_model
    if not hasattr(inner, "layers"):
        raise TypeError(f"{type(model).__name__} has no decoder layers (expected model.model.layers, or "
                        "model.model.language_model.layers)")
    return inner


def moe_routers(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """(decoder-layer index, router module) of every MoE layer, in order; dense layers (DeepSeek-V3's
    first ones) are skipped, so the n-th pair is MoE layer n (see `moe_layer_indices`)."""
    config = getattr(model, "config", None)
    model_type = getattr(text_config(config), "model_type", None)
    if model_type not in ROUTERS:
        raise ValueError(
            f"unsupported model {type(model).__name__} (model_type {getattr(config, 'model_type', None)!r}); "
            f"moe_reroute.hf supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    attr, cls_name = ROUTERS[model_type]
    for i, layer in enumerate(decoder(model).layers):
        block = getattr(layer, "mlp", None)
        router = getattr(block, attr, None)
        if router is not None and type(router).__name__ == cls_name:
            if model_type in BIAS_ON_BLOCK:
                _BLOCKS[router] = weakref.ref(block)  # (a strong value would keep the router alive)
            yield i, router


def moe_layer_indices(routers: list[tuple[int, nn.Module]]) -> dict[int, int]:
    """{decoder-layer index: MoE-layer index} of `moe_routers(model)`'s pairs: the n-th is MoE layer n."""
    return {i: n for n, (i, _) in enumerate(routers)}


def layer_spec(spec: RouterSpec, router: nn.Module) -> RouterSpec:
    """`spec` with the layer's correction bias, read now (model.to() replaces buffers): the router's, or its
    MoE block's (MiniMax-M2)."""
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None and router in _BLOCKS:
        bias = getattr(_BLOCKS[router](), "e_score_correction_bias", None)
    return spec.with_bias(bias) if bias is not None else spec


@dataclass
class StepLayout:
    """The token layout of the forward pass in flight: B sequences of S new tokens each, and its kind
    (one of KINDS, see `LayoutTracker`)."""

    batch: int
    new_tokens: int
    valid: torch.Tensor  # [B, S] bool: real tokens of sequences still generating
    kind: str


class PrefillWatch:
    """Counts the calls in flight of generate()'s prefill (`GenerationMixin._prefill`, which makes the
    prompt forward and, with `prefill_chunk_size`, every chunk's forward), so that a tracker knows those
    forwards are prefill even when one looks like a decode step (a last chunk of one token).

    One per model, shared by the trackers on it (`acquire` / `release`); it shadows `_prefill` on the
    instance with a method bound to the model, which the class's own `_prefill` then runs.
    """

    def __init__(self) -> None:
        self.depth = 0  # prefill calls in flight
        self.users = 0

    @classmethod
    def acquire(cls, model: nn.Module) -> PrefillWatch | None:
        """The model's watch, installed on first use; None for a model without generate()'s `_prefill`."""
        if not callable(getattr(type(model), "_prefill", None)):
            return None
        watch = model.__dict__.get(PREFILL_ATTR)
        if watch is None:
            watch = cls()
            object.__setattr__(model, PREFILL_ATTR, watch)
            object.__setattr__(model, "_prefill", MethodType(_counted_prefill, model))
        watch.users += 1
        return watch

    def release(self, model: nn.Module) -> None:
        self.users -= 1
        if self.users == 0 and model.__dict__.get(PREFILL_ATTR) is self:
            del model.__dict__[PREFILL_ATTR]
            if getattr(model.__dict__.get("_prefill"), "__func__", None) is _counted_prefill:
                del model.__dict__["_prefill"]


def _counted_prefill(model, *args, **kwargs):
    """generate()'s prefill, counted by the model's PrefillWatch while it runs."""
    watch = model.__dict__.get(PREFILL_ATTR)
    if watch is not None:
        watch.depth += 1
    try:
        return type(model)._prefill(model, *args, **kwargs)
    finally:
        if watch is not None:
            watch.depth -= 1


def _past_length(kwargs: dict) -> int | None:
    """Tokens already in the forward's KV cache; None without a cache."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    get = getattr(cache, "get_seq_length", None)
    return None if get is None else int(get())


class LayoutTracker:
    """Pre-hooks on the model and its decoder: record each forward's layout and kind for the router hooks.

    Kinds, from the forward's inputs and whether generate() is prefilling:
      "prefill": a forward made inside generate()'s prefill (the prompt, or one `prefill_chunk_size` chunk,
        whatever its length), or one of S > 1 tokens on an empty cache or without one (assisted
        generation's first forward, prompt plus first candidates, is one);
      "decode": any other forward of one new token per sequence;
      "verify": S > 1 new tokens per sequence on a non-empty cache with `logits_to_keep == S`, the
        forward assisted generation (`assistant_model=`, `prompt_lookup_num_tokens=`) makes to check the
        last token and its candidates: it needs every position's logits, where a prefill chunk keeps 1;
      "unknown": anything else (S > 1 on a cache without logits_to_keep == S).
    `logits_to_keep` is an argument of the CausalLM's forward, not of the decoder's, hence the second
    pre-hook; a decoder called on its own never sees it, so its multi-token forwards are never "verify".

    Why these signals: generate() passes no phase to the forward, and inside `_prefill` a chunk of
    `prefill_chunk_size` tokens on a non-empty cache has the inputs a verification forward has, except
    that it keeps 1 logit (generate() sets `logits_to_keep=1`; assisted decoding resets it to the
    candidates + 1 before each verification forward). A last chunk of one token is shaped like a decode
    step in every input, so only knowing that `_prefill` is running tells it apart (`PrefillWatch`).
    Marking the assisted-decoding loop instead would not work on one model: generate() looks its
    decoding method up on the class. Should a transformers release drop `_prefill`, the watch is not
    installed and the input rules still keep chunks of S > 1 native.
    """

    def __init__(self, model: nn.Module, on_forward=None) -> None:
        self.layout: StepLayout | None = None
        self.on_forward = on_forward
        self.model = model
        self._logits_to_keep = None
        inner = decoder(model)
        self.handles = [inner.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        if inner is not model:
            self.handles.append(model.register_forward_pre_hook(self._outer_pre_hook, with_kwargs=True))
        self.prefill = PrefillWatch.acquire(model)

    def _outer_pre_hook(self, module, args, kwargs):
        self._logits_to_keep = kwargs.get("logits_to_keep")

    def _pre_hook(self, module, args, kwargs):
        keep, self._logits_to_keep = self._logits_to_keep, None  # this forward's only
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            self.layout = None
            if self.on_forward is not None:
                self.on_forward(None)
            return
        B, S = ref.shape[0], ref.shape[1]
        valid = torch.ones(B, S, dtype=torch.bool, device=ref.device)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= S:
            valid &= mask[:, -S:].to(torch.bool)
        if S == 1 and ids is not None:
            for token in self.finished_tokens():
                valid &= ids != token
        self.layout = StepLayout(B, S, valid, self._kind(S, kwargs, keep))
        if self.on_forward is not None:
            self.on_forward(self.layout)

    def _kind(self, S: int, kwargs: dict, logits_to_keep) -> str:
        if self.prefill is not None and self.prefill.depth > 0:
            return "prefill"
        if S == 1:
            return "decode"
        if not _past_length(kwargs):
            return "prefill"
        if type(logits_to_keep) is int and logits_to_keep == S:
            return "verify"
        return "unknown"

    def finished_tokens(self) -> list[int]:
        """Token ids that, fed at a decode step, mean the sequence already finished: generate() feeds the
        pad token to finished sequences. Read from `model.generation_config` (else `model.config`) at
        every forward; a pad id passed only as `generate(pad_token_id=...)` is not seen."""
        for cfg in (getattr(self.model, "generation_config", None), self.model.config):
            pad = getattr(cfg, "pad_token_id", None)
            if pad is not None:
                return [int(pad)]
        return []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.prefill is not None:
            self.prefill.release(self.model)
            self.prefill = None


class HookSet:
    """Hooks installed on a model together: `.remove()` takes them all off; also a context manager."""

    _handles: list
    _tracker: LayoutTracker

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._tracker.remove()
        if getattr(getattr(self, "model", None), APPLIED_ATTR, None) is self:
            delattr(self.model, APPLIED_ATTR)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class Applied(HookSet):
    """Handle returned by `apply`: `.remove()` restores the model; also a context manager.

    `layers`: the decoder-layer indices re-routed; `moe_layers`: {decoder layer: the MoE-layer index the
    policy is called with}.
    """

    def __init__(self, model, policy, spec, routers, phase, verify, tracker) -> None:
        self.model = model
        self.policy = policy
        self.spec = spec
        self.phase = phase
        self.verify = verify
        self.layers = [i for i, _, _ in routers]
        self.moe_layers = {i: n for i, n, _ in routers}
        self._tracker = tracker
        self._handles = [r.register_forward_hook(self._make_hook(n)) for _, n, r in routers]

    def _make_hook(self, layer: int):
        """The forward hook of the router of MoE layer `layer`."""
        def hook(module, args, output):
            logits = output[0]  # [N, E]
            spec = layer_spec(self.spec, module)  # read the bias now: model.to() replaces buffers
            layout = self._tracker.layout
            if layout is None or layout.batch * layout.new_tokens != logits.shape[0]:
                return output  # a forward whose layout we do not know: leave it native
            if self.phase == "decode" and not (layout.kind == "decode" or (layout.kind == "verify" and self.verify)):
                return output
            if self.phase == "decode-sim":
                B, S = layout.batch, layout.new_tokens
                per_pos = logits.view(B, S, -1).transpose(0, 1)  # [S, B, E]: each position one decode batch
                r = self.policy(per_pos, spec, layout.valid.transpose(0, 1), layer=layer)  # [S, B, K]
                ids = r.ids.transpose(0, 1).reshape(B * S, -1)
                weights = r.weights.transpose(0, 1).reshape(B * S, -1)
            else:  # a decode step, a verification forward (phase "decode") or any forward ("all"): one batch
                r = self.policy(logits, spec, layout.valid.reshape(-1), layer=layer)
                ids, weights = r.ids, r.weights
            return (logits, weights.to(spec.model_weights_dtype(logits.dtype)), ids.to(output[2].dtype))

        return hook

    def __repr__(self) -> str:
        verify = "" if self.verify else ", verify=False"
        return f"Applied({self.policy!r}, phase={self.phase!r}{verify}, layers={self.layers})"


def apply(
    model: nn.Module,
    policy: Policy | str,
    *,
    layers: list[int] | None = None,
    phase: str = "decode",
    verify: bool = True,
    replace: bool = False,
    **params,
) -> Applied:
    """Make `model` route with `policy` (in place); returns a handle whose `.remove()` undoes it.

    Args:
      policy: a Policy, or a name with its parameters as keyword arguments (`apply(model, "oea", k0=3)`).
      layers: decoder-layer indices to change, as the modules are numbered (default: every MoE layer).
        Per-layer values of the policy are still indexed by MoE layer: on a model with one dense first
        layer, `layers=[1]` re-routes decoder layer 1 with the policy's values for MoE layer 0.
      phase: "decode" (default): forwards of one new token per sequence, and the verification forwards of
        assisted generation (`generate(assistant_model=...)` or `prompt_lookup_num_tokens=`), all valid
        tokens of one as one batch; prefill, prefill chunks and any forward not recognised route natively
        (see `LayoutTracker`). "all": every forward, all its tokens as one batch. "decode-sim": a
        teacher-forced forward over [B, L] tokens where each position's B tokens form one decode batch.
      verify: with phase "decode", re-route verification forwards (default); False keeps them native.
      replace: a model that already routes with a policy from `apply` raises unless this is True,
        which removes that policy first (hooks are never stacked).
    Padding (attention mask) and sequences generate() already finished are marked invalid, so they
    never enlarge a batch's expert set.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True (re-route assisted generation's verification forwards) or False, "
                        f"got {verify!r}")
    if isinstance(policy, str):
        policy = make_policy(policy, **params)
    elif params:
        raise TypeError("parameters go to make_policy(name, ...) or into the Policy you pass, not to apply()")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a Policy or a policy name, got {type(policy).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers MoE model (an nn.Module), got {type(model).__name__}")
    found = list(moe_routers(model))  # checks the model type before its config is read
    if not found:
        raise ValueError(f"{type(model).__name__} has no MoE router modules to re-route")
    moe = moe_layer_indices(found)
    routers = [(i, moe[i], r) for i, r in found]  # (decoder layer, MoE layer, router)
    spec = RouterSpec.from_config(model.config)
    current = getattr(model, APPLIED_ATTR, None)
    if current is not None and not replace:
        raise ValueError(f"this model already routes with {current.policy!r}; call .remove() on the handle "
                         "apply returned (or leave its `with` block) first, or pass replace=True")
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise TypeError(f"layers must be a list of layer indices (ints), got {layers!r}")
        unknown = sorted(set(layers) - set(moe))
        if unknown:
            raise ValueError(f"layers {unknown} are not MoE layers of this model; give decoder-layer indices of "
                             f"its MoE layers: {sorted(moe)}")
        routers = [(i, n, r) for i, n, r in routers if i in set(layers)]
    try:
        policy.check_layers(len(found))  # per-layer values meant for a model with more MoE layers
    except ValueError as e:
        raise ValueError(f"policy {policy!r} does not fit this model: {e}") from None
    _dry_run(policy, spec, routers)
    if current is not None:
        current.remove()
    applied = Applied(model, policy, spec, routers, phase, verify, LayoutTracker(model))
    object.__setattr__(model, APPLIED_ATTR, applied)  # a plain attribute, not a submodule or buffer
    return applied


def _dry_run(policy: Policy, spec: RouterSpec, routers) -> None:
    """Call the policy once per layer on dummy logits, so that a mismatch (E, K, a per-layer list too
    short, a similarity of the wrong size) fails before any hook is installed."""
    for i, n, router in routers:
        w = router.weight
        logits = torch.linspace(-1, 1, spec.num_experts, device=w.device, dtype=torch.float32)[None, :].repeat(2, 1)
        try:
            policy.check_model(layer_spec(spec, router), n)  # every by_batch bucket
            policy(logits, layer_spec(spec, router), layer=n)
        except (ValueError, TypeError) as e:
            raise type(e)(f"policy {policy!r} does not fit {layer_name(i, n)} of this model: {e}") from None
