"""`cap`: static top-k' (k' < K) by the model's own scores, uniform or per layer (arXiv 2505.03531).

A per-layer schedule (b, h, e, p) gives layer 1 b experts, layer p h experts, the last layer e,
interpolating linearly in between (layers counted from 1 as in the paper; the policy's layer index is
0-based, so schedule layer 1 is layer index 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..contract import Routing
from ..scoring import finish, pack, rank, scores, weights_for
from .base import Policy, PolicyConfig, need_at_most, need_int, per_layer

MAX_LAYERS = 4096  # far above any model's depth; a bound on the schedule's size


def cap_schedule(b: int, h: int, e: int, p: int, num_layers: int) -> list[int]:
    """k' per layer for the schedule (b, h, e, p) over `num_layers` layers (list indexed from 0)."""
    for name, v in (("b", b), ("h", h), ("e", e), ("num_layers", num_layers)):
        need_int(f"cap schedule {name}", v)
    if num_layers > MAX_LAYERS:
        raise ValueError(f"cap num_layers={num_layers} is more than {MAX_LAYERS}; give the model's number of MoE layers")
    if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= num_layers:
        raise ValueError(f"cap schedule p must be a layer number in 1..num_layers={num_layers}, got {p!r}")
    out = []
    for layer in range(1, num_layers + 1):
        if layer <= p:
            x = b + (h - b) * (layer - 1) / (p - 1) if p > 1 else h
        else:
            x = h + (e - h) * (layer - p) / (num_layers - p)
        out.append(int(x + 0.5))  # round half up: deterministic on every platform
    return out


@dataclass(frozen=True)
class CapConfig(PolicyConfig):
    """k: experts per token (int, or per layer). Or `schedule=(b, h, e, p)` with `num_layers`.

    renormalize: None follows the model (its RouterSpec); True/False forces it.
    """

    k: Any = per_layer(None)
    renormalize: bool | None = None
    schedule: tuple[int, int, int, int] | None = field(default=None, metadata={"sequence": True})
    num_layers: int | None = None

    def __post_init__(self) -> None:
        if self.schedule is not None:
            if self.k is not None:
                raise ValueError("cap: give either k or schedule=(b, h, e, p), not both")
            if self.num_layers is None:
                raise ValueError("cap: schedule=(b, h, e, p) needs num_layers=<number of MoE layers>")
            if not isinstance(self.schedule, (list, tuple)) or len(self.schedule) != 4:
                raise ValueError(f"cap: schedule must be 4 ints (b, h, e, p): [2, 4, 8, 3] in JSON, (2,4,8,3) in a "
                                 f"spec; got {self.schedule!r}")
            object.__setattr__(self, "k", cap_schedule(*self.schedule, num_layers=self.num_layers))
        elif self.k is None:
            raise ValueError("cap needs k=<experts per token> (e.g. cap:k=4) or schedule=(b, h, e, p)")
        super().__post_init__()

    def check(self, name: str, value: Any) -> None:
        if name == "k":
            need_int("cap k", value)
        elif name == "renormalize" and value not in (None, True, False):
            raise ValueError(f"cap renormalize must be None, True or False, got {value!r}")


class Cap(Policy):
    name = "cap"
    Config = CapConfig

    def route(self, router_logits, spec, valid, config, layer) -> Routing:
        need_at_most("cap k", config.k, spec.top_k, "the model's K")
        choice, gate = scores(router_logits, spec)
        _, order = rank(choice)
        keep_sorted = torch.arange(spec.num_experts, device=order.device) < config.k  # [E]
        ids, keep = pack(order, keep_sorted.expand_as(order), spec.top_k)
        renorm = spec.renormalize if config.renormalize is None else config.renormalize
        return finish(ids, weights_for(gate, ids, keep, spec, renorm), valid)
