"""`cap`: static top-k' (k' < K) by the model's own scores, uniform or per layer (arXiv 2505.03531).

A per-layer schedule (b, h, e, p) gives layer 1 b experts, layer p h experts, the last layer e,
interpolating linearly in between (MoE layers counted from 1 as in the paper; the policy's layer index
is the 0-based MoE-layer index, so schedule layer 1 is layer index 0; dense layers are not counted).

Weights (one rule for every scoring): renormalize=False keeps, for each kept expert, exactly the weight
the model gives it (native weights cut to k'); True rescales the kept weights to the total the model's
top-K weights have (1, or DeepSeek-V3's scaling factor). Either way `cap:k=K` is native routing.

Fixed rows (`fixed`) keep all K native experts with their native weights; cap has no batch-wide set, so
they change nothing for the other rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..contract import Routing
from ..scoring import finish, native_where_fixed, native_where_unchanged, ranked_native, sanitize, score
from .base import MAX_LAYERS, Policy, PolicyConfig, is_int, layer_values, need_at_most, need_int, per_layer
from .unique import head_union


def cap_schedule(b: int, h: int, e: int, p: int, num_layers: int) -> list[int]:
    """k' per MoE layer for the schedule (b, h, e, p) over `num_layers` MoE layers (list indexed from 0).

    Layer 1 takes b and the last layer e; p (counted from 1) is an interior layer, 1 < p < num_layers,
    that takes h; values in between are linear, rounded half up.
    """
    for name, v in (("b", b), ("h", h), ("e", e), ("num_layers", num_layers)):
        need_int(f"cap schedule {name}", v)
    if num_layers > MAX_LAYERS:
        raise ValueError(f"cap num_layers={num_layers} is more than {MAX_LAYERS}; give the model's number of MoE layers")
    if num_layers < 3:
        raise ValueError(f"cap schedule (b, h, e, p) needs at least 3 MoE layers, got num_layers={num_layers}; "
                         "give k per layer instead, e.g. cap:k=[4,6]")
    if not is_int(p) or not 1 < p < num_layers:
        raise ValueError(f"cap schedule p must be an interior layer number 2..{num_layers - 1} "
                         f"(layer 1 takes b, layer {num_layers} takes e), got {p!r}")
    out = []
    for layer in range(1, num_layers + 1):
        if layer <= p:
            x = b + (h - b) * (layer - 1) / (p - 1)
        else:
            x = h + (e - h) * (layer - p) / (num_layers - p)
        out.append(int(x + 0.5))  # round half up: deterministic on every platform
    return out


@dataclass(frozen=True)
class CapConfig(PolicyConfig):
    """k: experts per token (int, or per MoE layer). Or `schedule=(b, h, e, p)` with `num_layers`, the
    model's number of MoE layers (dense layers not counted: 58 on DeepSeek-V3).

    renormalize: None follows the model (its RouterSpec); True/False forces it.
    """

    k: Any = per_layer(None)
    renormalize: bool | None = None
    schedule: tuple[int, int, int, int] | None = field(default=None, metadata={"sequence": True})
    num_layers: int | None = None

    def __post_init__(self) -> None:
        if self.schedule is not None:
            if self.num_layers is None:
                raise ValueError("cap: schedule=(b, h, e, p) needs num_layers=<number of MoE layers>")
            k = self._from_schedule()
            # dataclasses.replace() passes the k a schedule produced back in: accept that one
            if self.k is not None and list(layer_values(self.k)) != k:
                raise ValueError("cap: give either k or schedule=(b, h, e, p), not both")
            object.__setattr__(self, "k", k)
        elif self.k is None:
            raise ValueError("cap needs k=<experts per token> (e.g. cap:k=4) or schedule=(b, h, e, p)")
        elif self.num_layers is not None:
            raise ValueError("cap: num_layers goes with schedule=(b, h, e, p), the layers it spreads over; with k, "
                             "drop num_layers (a per-layer k lists one value per MoE layer)")
        super().__post_init__()

    def layers_note(self, name: str) -> str:
        if name == "k" and self.schedule is not None:
            return f" (schedule={tuple(self.schedule)} over num_layers={self.num_layers})"
        return ""

    def _from_schedule(self) -> list[int]:
        sched = self.schedule
        if not isinstance(sched, (list, tuple)) or len(sched) != 4:
            raise ValueError(f"cap: schedule must be 4 ints (b, h, e, p): [2, 4, 8, 3] in JSON, (2,4,8,3) in a "
                             f"spec; got {sched!r}")
        return cap_schedule(*sched, num_layers=self.num_layers)

    def check(self, name: str, value: Any) -> None:
        if name == "k":
            need_int("cap k", value)
        elif name == "renormalize" and value not in (None, True, False):
            raise ValueError(f"cap renormalize must be None, True or False, got {value!r}")


class Cap(Policy):
    name = "cap"
    Config = CapConfig

    def check_fit(self, spec, config, layer) -> None:
        need_at_most("cap k", config.k, spec.top_k, "the model's K")

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None) -> Routing:
        K = spec.top_k
        s = score(sanitize(router_logits, valid), spec, self.ties, native)
        ids_r, w_r = ranked_native(s)  # [T, K] each, best first
        keep = (torch.arange(K, device=ids_r.device) < config.k).expand_as(ids_r)  # [T, K]
        ids = torch.where(keep, ids_r, ids_r[..., :1])
        w = torch.where(keep, w_r, torch.zeros_like(w_r))
        renorm = spec.renormalize if config.renormalize is None else config.renormalize
        if renorm:  # back to the total of the model's top-K weights
            w = w * (w_r.sum(dim=-1, keepdim=True) / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny))
        ids, w = native_where_unchanged(s, ids, keep, w)
        return finish(*native_where_fixed(s, ids, w, fixed, valid), valid, s)

    def count_unique(self, router_logits, spec, valid, config, layer, fixed=None) -> torch.Tensor:
        """U: a token uses exactly its first k ranks (a fixed token its native top-K)."""
        return head_union(router_logits, spec, valid, self.ties, config.k, fixed=fixed)
