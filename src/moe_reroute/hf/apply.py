"""Apply a routing policy to a transformers MoE model, in place, by hooking only its router modules.

The experts, shared experts and the experts implementation are untouched: each MoE block's router
(`mlp.gate`, or `mlp.router` for GPT-OSS) still computes its logits, and a forward hook replaces its
(weights, ids) with the policy's. A pre-hook on the decoder model reads each forward's token layout
(batch B, new tokens S, attention mask, finished sequences) so the router hooks know what a batch is.

Layer numbering: the policy is called with each layer's MoE-layer index (the n-th MoE layer of the model
is layer n, dense layers not counted), which is what per-layer values are indexed by. Where this module
names layers to people (`apply(layers=...)`, `Applied.layers`, error messages) it uses decoder-layer
indices, as the modules are named (`model.layers.3.mlp.gate` is decoder layer 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..contract import SUPPORTED_ARCHITECTURES, RouterSpec, layer_name
from ..policies import Policy, make_policy

# model_type -> (attribute of the MoE block holding the router, the router's class name)
ROUTERS = {
    "qwen3_moe": ("gate", "Qwen3MoeTopKRouter"),
    "qwen2_moe": ("gate", "Qwen2MoeTopKRouter"),
    "olmoe": ("gate", "OlmoeTopKRouter"),
    "mixtral": ("gate", "MixtralTopKRouter"),
    "deepseek_v3": ("gate", "DeepseekV3TopkRouter"),
    "gpt_oss": ("router", "GptOssTopKRouter"),
}
PHASES = ("decode", "all", "decode-sim")
APPLIED_ATTR = "_moe_reroute_applied"  # the model's Applied handle while a policy is on it


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (the module with `.layers`) of a CausalLM or base model."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise TypeError(f"{type(model).__name__} has no decoder layers (expected model.model.layers)")
    return inner


def moe_routers(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """(decoder-layer index, router module) of every MoE layer, in order; dense layers (DeepSeek-V3's
    first ones) are skipped, so the n-th pair is MoE layer n (see `moe_layer_indices`)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ROUTERS:
        raise ValueError(
            f"unsupported model {type(model).__name__} (model_type {model_type!r}); moe_reroute.hf supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    attr, cls_name = ROUTERS[model_type]
    for i, layer in enumerate(decoder(model).layers):
        router = getattr(getattr(layer, "mlp", None), attr, None)
        if router is not None and type(router).__name__ == cls_name:
            yield i, router


def moe_layer_indices(routers: list[tuple[int, nn.Module]]) -> dict[int, int]:
    """{decoder-layer index: MoE-layer index} of `moe_routers(model)`'s pairs: the n-th is MoE layer n."""
    return {i: n for n, (i, _) in enumerate(routers)}


def layer_spec(spec: RouterSpec, router: nn.Module) -> RouterSpec:
    bias = getattr(router, "e_score_correction_bias", None)
    return spec.with_bias(bias) if bias is not None else spec


@dataclass
class StepLayout:
    """The token layout of the forward pass in flight: B sequences of S new tokens each."""

    batch: int
    new_tokens: int
    valid: torch.Tensor  # [B, S] bool: real tokens of sequences still generating


class LayoutTracker:
    """Pre-hook on the decoder model: records each forward's layout for the router hooks."""

    def __init__(self, model: nn.Module, on_forward=None) -> None:
        self.layout: StepLayout | None = None
        self.on_forward = on_forward
        self.model = model
        self.handle = decoder(model).register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module, args, kwargs):
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
        self.layout = StepLayout(B, S, valid)
        if self.on_forward is not None:
            self.on_forward(self.layout)

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
        self.handle.remove()


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

    def __init__(self, model, policy, spec, routers, phase, tracker) -> None:
        self.model = model
        self.policy = policy
        self.spec = spec
        self.phase = phase
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
            if self.phase == "decode" and layout.new_tokens != 1:
                return output
            if self.phase == "decode-sim":
                B, S = layout.batch, layout.new_tokens
                per_pos = logits.view(B, S, -1)
                ids, weights = [], []
                for s in range(S):  # each position's B tokens form one decode batch
                    r = self.policy(per_pos[:, s], spec, layout.valid[:, s], layer=layer)
                    ids.append(r.ids)
                    weights.append(r.weights)
                ids = torch.stack(ids, dim=1).reshape(B * S, -1)
                weights = torch.stack(weights, dim=1).reshape(B * S, -1)
            else:
                r = self.policy(logits, spec, layout.valid.reshape(-1), layer=layer)
                ids, weights = r.ids, r.weights
            return (logits, weights.to(spec.model_weights_dtype(logits.dtype)), ids.to(output[2].dtype))

        return hook

    def __repr__(self) -> str:
        return f"Applied({self.policy!r}, phase={self.phase!r}, layers={self.layers})"


def apply(
    model: nn.Module,
    policy: Policy | str,
    *,
    layers: list[int] | None = None,
    phase: str = "decode",
    replace: bool = False,
    **params,
) -> Applied:
    """Make `model` route with `policy` (in place); returns a handle whose `.remove()` undoes it.

    Args:
      policy: a Policy, or a name with its parameters as keyword arguments (`apply(model, "oea", k0=3)`).
      layers: decoder-layer indices to change, as the modules are numbered (default: every MoE layer).
        Per-layer values of the policy are still indexed by MoE layer: on a model with one dense first
        layer, `layers=[1]` re-routes decoder layer 1 with the policy's values for MoE layer 0.
      phase: "decode" (default): only forwards of one new token per sequence; prefill routes natively.
        "all": every forward, all its tokens as one batch. "decode-sim": a teacher-forced forward over
        [B, L] tokens where each position's B tokens form one decode batch.
      replace: a model that already routes with a policy from `apply` raises unless this is True,
        which removes that policy first (hooks are never stacked).
    Padding (attention mask) and sequences generate() already finished are marked invalid, so they
    never enlarge a batch's expert set.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
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
    _dry_run(policy, spec, routers)
    if current is not None:
        current.remove()
    applied = Applied(model, policy, spec, routers, phase, LayoutTracker(model))
    object.__setattr__(model, APPLIED_ATTR, applied)  # a plain attribute, not a submodule or buffer
    return applied


def _dry_run(policy: Policy, spec: RouterSpec, routers) -> None:
    """Call the policy once per layer on dummy logits, so that a mismatch (E, K, a per-layer list too
    short, a similarity of the wrong size) fails before any hook is installed."""
    for i, n, router in routers:
        w = router.weight
        logits = torch.linspace(-1, 1, spec.num_experts, device=w.device, dtype=torch.float32)[None, :].repeat(2, 1)
        try:
            policy(logits, layer_spec(spec, router), layer=n)
        except (ValueError, TypeError) as e:
            raise type(e)(f"policy {policy!r} does not fit {layer_name(i, n)} of this model: {e}") from None
