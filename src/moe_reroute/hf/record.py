"""Record what routing did during generate() or a teacher-forced forward, layer by layer, step by step.

The recorder reads the routing the experts actually receive (a pre-hook on each `mlp.experts`), so it
sees a policy applied with `moe_reroute.hf.apply` whichever was installed first, and the router logits
(a hook on the router) to know the native routing.

Records are keyed by decoder-layer index, as the modules are numbered (`model.layers.3` is layer 3), so
on DeepSeek-V3 they start at 3. A trace made from them keeps that numbering; replaying a policy on it
gives the policy each layer's MoE-layer index (see `moe_reroute.traces`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..contract import RouterSpec
from ..policies.native import native_topk
from .apply import HookSet, LayoutTracker, decoder, layer_spec, moe_routers

KEEP = ("counts", "routing", "logits")


@dataclass
class LayerRecord:
    """One MoE layer in one forward pass of B sequences x S new tokens (N = B*S rows).

    unique / native_unique: [S] int64, U of each position's B tokens (a decode step has S = 1). A
    verification forward is re-routed as one batch of all its B*S tokens; its U is that of `ids` (keep
    "routing"), not a sum over positions.
    """

    unique: torch.Tensor
    native_unique: torch.Tensor
    valid: torch.Tensor  # [B, S] bool
    ids: torch.Tensor | None = None  # [N, K] what the experts computed
    weights: torch.Tensor | None = None  # [N, K]
    native_ids: torch.Tensor | None = None  # [N, K]
    logits: torch.Tensor | None = None  # [N, E]


@dataclass
class StepRecord:
    """One forward pass: its layout, its kind ("decode", "verify", "prefill" or "unknown", as
    `moe_reroute.hf.apply.LayoutTracker` tells them) and what each MoE layer did."""

    batch: int
    new_tokens: int
    kind: str
    layers: dict[int, LayerRecord] = field(default_factory=dict)  # by decoder-layer index


class Recorder(HookSet):
    """Collects a `StepRecord` per forward pass into `.steps`; `.remove()` detaches (context manager too).

    keep: "counts" (U per layer and position, cheap enough to leave on), "routing" (also ids and weights,
    policy and native), "logits" (also the router logits, on CPU).
    """

    def __init__(self, model: nn.Module, keep: str = "counts") -> None:
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
        self.keep = keep
        self.spec = RouterSpec.from_config(model.config)
        self.steps: list[StepRecord] = []
        self._tracker = LayoutTracker(model, on_forward=self._new_step)
        self._logits: dict[int, torch.Tensor] = {}
        self._handles = []
        self._specs: dict[int, RouterSpec] = {}
        self.model_name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        layers = decoder(model).layers
        for i, router in moe_routers(model):
            self._specs[i] = layer_spec(self.spec, router)
            self._handles.append(router.register_forward_hook(self._router_hook(i)))
            self._handles.append(layers[i].mlp.experts.register_forward_pre_hook(self._experts_hook(i, router)))

    def _new_step(self, layout) -> None:
        if layout is not None:
            self.steps.append(StepRecord(layout.batch, layout.new_tokens, layout.kind))

    def _router_hook(self, layer: int):
        def hook(module, args, output):
            self._logits[layer] = output[0].detach()

        return hook

    def _experts_hook(self, layer: int, router: nn.Module):
        def hook(module, args):
            layout = self._tracker.layout
            logits = self._logits.pop(layer, None)
            if layout is None or logits is None or not self.steps:
                return
            ids = args[1].detach()  # [N, K]
            B, S = layout.batch, layout.new_tokens
            if ids.shape[0] != B * S:
                return
            spec = layer_spec(self.spec, router)
            native = native_topk(logits, spec)[1]
            E = spec.num_experts

            def per_position(x):  # [N, K] -> [S]: U of each position's valid tokens
                used = torch.zeros(B, S, E, dtype=torch.bool, device=x.device).scatter_(2, x.view(B, S, -1), True)
                return (used & layout.valid[..., None]).any(dim=0).sum(dim=-1)

            rec = LayerRecord(per_position(ids), per_position(native), layout.valid.clone())
            if self.keep in ("routing", "logits"):
                rec.ids, rec.weights, rec.native_ids = ids.clone(), args[2].detach().float().clone(), native
            if self.keep == "logits":
                rec.logits = logits.float().cpu()
            self.steps[-1].layers[layer] = rec

        return hook

    def unique_per_layer(self, native: bool = False, decode_only: bool = False) -> dict[int, torch.Tensor]:
        """{decoder layer: U of every recorded position group}, concatenated over steps (a decode step is
        one group; a forward over S new tokens gives S). decode_only: only decode steps (kind "decode": one
        new token per sequence, outside generate()'s prefill)."""
        out: dict[int, list[torch.Tensor]] = {}
        for step in self.steps:
            if decode_only and step.kind != "decode":
                continue
            for layer, rec in step.layers.items():
                out.setdefault(layer, []).append(rec.native_unique if native else rec.unique)
        return {k: torch.cat(v) for k, v in out.items()}

    def to_trace(self, decode_only: bool = False):
        """The recorded router logits as a `moe_reroute.traces.Trace` (needs keep="logits"): each
        position group of each forward is one step of B tokens; layers keyed by decoder-layer index."""
        from ..traces import Trace

        if self.keep != "logits":
            raise ValueError('to_trace() needs the router logits: record with Recorder(model, keep="logits")')
        steps = [s for s in self.steps if s.layers and (s.kind == "decode" or not decode_only)]
        if not steps:
            raise ValueError("nothing recorded: run generate() or a forward pass inside the Recorder first")
        B = steps[0].batch
        if any(s.batch != B for s in steps):
            raise ValueError(f"the recorded forwards have different batch sizes {sorted({s.batch for s in steps})}")
        logits: dict[int, list[torch.Tensor]] = {}
        valid = []
        for s in steps:
            valid.append(next(iter(s.layers.values())).valid.T.cpu())  # [S, B]
            for layer, rec in s.layers.items():
                logits.setdefault(layer, []).append(rec.logits.view(B, s.new_tokens, -1).transpose(0, 1))
        first = steps[0].layers
        specs = {layer: self._specs[layer] for layer in first}
        meta = {"model": self.model_name, "source": "moe_reroute.hf.Recorder", "decode_only": decode_only}
        return Trace({k: torch.cat(v) for k, v in logits.items()}, torch.cat(valid), specs, meta)

