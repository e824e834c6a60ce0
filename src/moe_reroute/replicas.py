"""Redundant experts (EPLB): a placement where a logical expert may have replicas on several ranks.

Under vLLM's expert-parallel load balancer (EPLB, `enable_eplb=True`) a MoE layer holds P >= E physical
expert slots, P / D on each of the D ranks (slot p on rank p // (P / D)); each slot holds a replica of one
logical expert (`physical_to_logical`, [P]), every logical expert at least one. The router picks logical
experts; then each (token, logical expert) pair goes to one replica, chosen by vLLM 0.32's
`_eplb_map_and_record_i32_kernel` from the token's row t in the layer's input:

    replica = ((t * 2654435769) & 0xFFFFFFFF) % count[e],  physical = logical_to_physical[e, replica]

with `logical_to_physical[e]` the slots of e in increasing order (`compute_logical_maps`). So which slots
a step reads, and on which ranks, follows from the routing and the rows: `Replicas.to_physical`. Under
replicas the unit a rank reads is a physical slot: max-rank U counts distinct slots per rank.

`Replicas` holds one layer's maps ([E, R] and [E]) or one per MoE layer ([L, E, R], [L, E]); it is made
from a physical-to-logical list (`from_physical`: a placement file `{"ranks": D, "physical_to_logical":
[...]}`, or one list per MoE layer), from the engine's own EPLB state (the vLLM plugin, by reference, so a
rearrangement is seen at once), or computed from expert loads as vLLM's default EPLB policy does
(`eplb_replicas`: replicate the experts of highest load per replica, then pack slots onto ranks).

E = logical experts, P = physical slots, R = most replicas of one expert, D = ranks, L = MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .placement import int_lists

KNUTH = 2654435769  # vLLM's replica hash: floor(2^32 / phi)
EXAMPLE = '{"ranks": 2, "physical_to_logical": [0, 1, 2, 3, 0, 3]} (6 slots, 3 per rank; experts 0 and 3 twice)'


def replica_hash(rows: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[T] int64: vLLM's hash of each row index t, (t * 2654435769) & 0xFFFFFFFF."""
    t = torch.arange(rows, dtype=torch.int64, device=device)
    return (t * KNUTH) & 0xFFFFFFFF


@dataclass(frozen=True, eq=False)
class Replicas:
    """A replicated expert placement over `ranks` D ranks (the module docstring).

    logical_to_physical: [E, R] or [L, E, R] int64 slots of each logical expert (-1 past its count);
    replica_count: [E] or [L, E]; num_physical: P (a multiple of D). Checked at construction unless the
    maps come from an engine (`checked=False`, whose maps vLLM keeps valid)."""

    logical_to_physical: torch.Tensor
    replica_count: torch.Tensor
    num_physical: int
    ranks: int
    origin: str = "replicas"
    checked: bool = True
    _on: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.checked:
            check_maps(self.logical_to_physical, self.replica_count, self.num_physical, self.ranks, self.origin)

    @classmethod
    def from_physical(cls, physical_to_logical: Any, ranks: Any, num_experts: int | None = None,
                      origin: str = "replicas") -> "Replicas":
        """From the logical expert of each physical slot ([P], or [L, P] one per MoE layer), D ranks."""
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            raise ValueError(f"{origin}: ranks must be a whole number of ranks >= 1, got {ranks!r}; write e.g. {EXAMPLE}")
        p2l = _int_tensor(physical_to_logical, origin)
        if p2l.dim() not in (1, 2) or p2l.shape[-1] < 1:
            raise ValueError(f"{origin}: physical_to_logical is a list of logical experts, one per physical slot, or "
                             f"one such list per MoE layer; write e.g. {EXAMPLE}")
        P = p2l.shape[-1]
        if P % ranks:
            raise ValueError(f"{origin}: {P} physical slots do not split evenly over {ranks} ranks (each rank holds P / D "
                             "slots); give a multiple of D slots")
        E = int(p2l.max()) + 1 if num_experts is None else num_experts
        if bool((p2l < 0).any()) or bool((p2l >= E).any()):
            raise ValueError(f"{origin}: a physical slot names logical expert {int(p2l[(p2l < 0) | (p2l >= E)][0])}, but "
                             f"the model's experts are 0..{E - 1}")
        l2p, count = logical_maps(p2l, E)
        return cls(l2p, count, P, ranks, origin)

    @property
    def num_experts(self) -> int:
        return int(self.replica_count.shape[-1])

    @property
    def per_layer(self) -> bool:
        return self.replica_count.dim() == 2

    def layer_view(self, layer: int | None) -> "Replicas":
        """The replicas of MoE layer `layer` alone (itself when they are the same in every layer)."""
        if not self.per_layer:
            return self
        l2p, count = self.at(layer, self.replica_count.device)
        return Replicas(l2p, count, self.num_physical, self.ranks, self.origin, checked=False)

    def slot_ranks(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[P] int64: the rank of each physical slot, p // (P / D)."""
        return torch.arange(self.num_physical, device=device) // (self.num_physical // self.ranks)

    def at(self, layer: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(logical_to_physical [E, R], replica_count [E]) of MoE layer `layer`, on `device` (a copy cached
        per device when the maps live elsewhere; an engine's maps are used in place)."""
        l2p, count = self.logical_to_physical, self.replica_count
        if self.per_layer:
            if layer is None:
                raise ValueError(f"{self.origin} is given per MoE layer; call with layer=<MoE-layer index>")
            if not 0 <= layer < count.shape[0]:
                raise ValueError(f"{self.origin} lists {count.shape[0]} MoE layers; MoE layer {layer} is out of range "
                                 "(layers count MoE layers only, from 0)")
            l2p, count = l2p[layer], count[layer]
        if l2p.device != torch.device(device):
            key = (str(device), layer if self.per_layer else None)
            if key not in self._on:
                self._on[key] = (l2p.to(device, torch.int64), count.to(device, torch.int64))
            l2p, count = self._on[key]
        return l2p, count

    def token_slots(self, rows: int, layer: int | None, device: torch.device) -> torch.Tensor:
        """[T, E] int64: the physical slot that row t reaches for each logical expert."""
        l2p, count = self.at(layer, device)
        h = replica_hash(rows, device)  # [T]
        replica = h[:, None] % count.clamp_min(1)[None, :]  # [T, E]
        return l2p.long().gather(-1, replica.T).T  # l2p[e, replica[t, e]]

    def to_physical(self, ids: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Logical ids [..., T, K] -> the physical slots the engine reads ([..., T, K]), row t of each step
        hashed as vLLM does."""
        slots = self.token_slots(ids.shape[-2], layer, ids.device)  # [T, E]
        return slots.expand(*ids.shape[:-2], *slots.shape).gather(-1, ids.long())

    def check_fits(self, num_experts: int, ranks: int | None, layers: int | None = None) -> None:
        """ValueError unless these replicas place E = `num_experts` experts over `ranks` (when given) ranks
        and, when per layer and `layers` is given, list that many MoE layers."""
        if self.num_experts != num_experts:
            raise ValueError(f"{self.origin} places {self.num_experts} logical experts but the model has "
                             f"E={num_experts}; give a slot for every expert 0..{num_experts - 1}")
        if ranks is not None and ranks != self.ranks:
            raise ValueError(f"{self.origin} spreads its slots over {self.ranks} ranks, not {ranks}; give D={self.ranks} "
                             "(or a placement for D ranks)")
        if self.per_layer and layers is not None and self.replica_count.shape[0] != layers:
            raise ValueError(f"{self.origin} gives {self.replica_count.shape[0]} per-layer maps but the model has {layers} "
                             "MoE layers; give one list per MoE layer (dense layers not counted), or one for every layer")

    def to_json(self) -> dict:
        """{"ranks": D, "physical_to_logical": [...] or [[...], ...]}: what `from_physical` reads."""
        return {"ranks": self.ranks, "physical_to_logical": physical_to_logical(self).tolist()}


class EngineReplicas(Replicas):
    """One MoE layer's replicas as a running vLLM engine keeps them: its router's `EplbLayerState`, read at
    every call (EPLB's rearrangement replaces or rewrites the maps, and this sees the new ones at once).
    Before vLLM fills the state in (while the model is built), vLLM's initial arrangement: slots 0..E-1
    hold experts 0..E-1 and slot E + i holds expert i mod E."""

    def __init__(self, source: Any, num_experts: int, num_physical: int, ranks: int, origin: str = "engine (eplb)"):
        initial = torch.cat([torch.arange(num_experts), torch.arange(num_physical - num_experts) % num_experts])
        l2p, count = logical_maps(initial, num_experts)
        super().__init__(l2p, count, num_physical, ranks, origin)
        object.__setattr__(self, "source", source)

    def at(self, layer: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        l2p = getattr(self.source, "logical_to_physical_map", None)
        count = getattr(self.source, "logical_replica_count", None)
        if l2p is None or count is None:
            return Replicas.at(self, None, device)
        if l2p.device != torch.device(device):
            l2p, count = l2p.to(device), count.to(device)
        return l2p, count


def logical_maps(physical_to_logical: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's `compute_logical_maps`: ([..., E, R] slots of each logical expert in increasing slot order,
    -1 past its count; [..., E] replica counts) from [..., P] logical expert of each slot."""
    p2l = physical_to_logical.long()
    count = torch.zeros(*p2l.shape[:-1], num_experts, dtype=torch.int64).scatter_add_(-1, p2l, torch.ones_like(p2l))
    R = max(int(count.max()), 1)
    # replica index of slot p: how many earlier slots hold the same expert
    same = p2l[..., :, None] == p2l[..., None, :]  # [..., P, P]
    earlier = torch.ones(p2l.shape[-1], p2l.shape[-1], dtype=torch.bool).tril(-1)
    index = (same & earlier).sum(dim=-1)  # [..., P]
    l2p = torch.full((*p2l.shape[:-1], num_experts * R), -1, dtype=torch.int64)
    slots = torch.arange(p2l.shape[-1]).expand(p2l.shape)
    l2p.scatter_(-1, p2l * R + index, slots)
    return l2p.view(*p2l.shape[:-1], num_experts, R), count


def physical_to_logical(replicas: Replicas) -> torch.Tensor:
    """[P] or [L, P]: the logical expert of each slot."""
    count = replicas.replica_count.cpu().long()
    E, R = replicas.logical_to_physical.shape[-2:]
    l2p = replicas.logical_to_physical.cpu().long().reshape(-1, E, R)
    out = torch.full((l2p.shape[0], replicas.num_physical), -1, dtype=torch.int64)
    expert = torch.arange(E)[:, None].expand(E, R)
    for i, c in enumerate(count.reshape(-1, E)):
        live = torch.arange(R) < c[:, None]  # [E, R]
        out[i, l2p[i][live]] = expert[live]
    return out.view(*count.shape[:-1], replicas.num_physical)


def check_maps(l2p: torch.Tensor, count: torch.Tensor, num_physical: int, ranks: int, origin: str) -> None:
    """ValueError unless the maps are a replicated placement: every logical expert has >= 1 replica, its
    first `count` slots are distinct slots in 0..P-1, every slot holds exactly one expert, D divides P."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1 or num_physical % ranks:
        raise ValueError(f"{origin}: {num_physical} physical slots must split evenly over D={ranks!r} ranks")
    if l2p.dim() not in (2, 3) or count.shape != l2p.shape[:-1]:
        raise ValueError(f"{origin}: logical_to_physical must be [E, R] or [L, E, R] with replica_count [E] or [L, E], "
                         f"got {tuple(l2p.shape)} and {tuple(count.shape)}")
    l2p, count = l2p.cpu().long(), count.cpu().long()
    if bool((count < 1).any()):
        raise ValueError(f"{origin}: logical expert {int((count < 1).nonzero()[0][-1])} has no replica (the slots name "
                         f"experts up to {count.shape[-1] - 1}); every expert 0..E-1 needs a physical slot")
    live = torch.arange(l2p.shape[-1]) < count[..., None]  # [..., E, R]
    slots = l2p[live]
    if bool((slots < 0).any()) or bool((slots >= num_physical).any()):
        raise ValueError(f"{origin}: a replica names a slot outside 0..{num_physical - 1}")
    per = live.view(-1, *live.shape[-2:]).sum(dim=(-1, -2))
    if bool((per != num_physical).any()):
        raise ValueError(f"{origin}: the replicas fill {int(per[0])} slots, but there are {num_physical}; every "
                         "physical slot holds one expert")
    for m, s in zip(live.view(-1, *live.shape[-2:]), l2p.view(-1, *l2p.shape[-2:])):
        if torch.unique(s[m]).numel() != num_physical:
            raise ValueError(f"{origin}: a physical slot holds two replicas; every slot holds one expert")


def eplb_replicas(load: torch.Tensor, ranks: int, redundant: int, origin: str = "eplb") -> Replicas:
    """vLLM's default EPLB rearrangement (`DefaultEplbPolicy.rebalance_experts` with one expert group and
    one node) of [E] or [L, E] expert loads onto E + `redundant` slots over D ranks: add a replica, one at a
    time, to the expert of highest load per replica; then pack the slots (each of load / its expert's
    replicas) onto the ranks, heaviest first onto the lightest rank with room, P / D slots a rank; a rank's
    slots in the order they were packed."""
    import numpy as np

    if not isinstance(load, torch.Tensor) or load.dim() not in (1, 2) or load.shape[-1] < 1:
        raise ValueError("expert load must be an [E] or [L, E] tensor")
    x = load.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
        raise ValueError("expert load must be finite and >= 0 (e.g. tokens routed to each expert)")
    if isinstance(redundant, bool) or not isinstance(redundant, int) or redundant < 0:
        raise ValueError(f"redundant experts must be an int >= 0, got {redundant!r}")
    w = x.numpy().reshape(-1, x.shape[-1])
    L, E = w.shape
    P = E + redundant
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1 or P % ranks:
        raise ValueError(f"E + redundant = {P} physical slots must split evenly over D={ranks!r} ranks; choose the "
                         f"redundant experts so that D divides E + redundant (e.g. {(-E) % ranks or ranks})")
    phy2log = np.tile(np.arange(P, dtype=np.int64), (L, 1))
    logcnt = np.ones((L, E), dtype=np.int64)
    rows = np.arange(L)
    for i in range(E, P):
        hot = np.argmax(w / logcnt, axis=-1)
        phy2log[:, i] = hot
        logcnt[rows, hot] += 1
    per_slot = np.take_along_axis(w / logcnt, phy2log, axis=1)  # [L, P]
    per_rank = P // ranks
    out = np.empty_like(phy2log)
    for layer in range(L):
        if per_rank == 1:
            out[layer] = phy2log[layer]
            continue
        weights = np.zeros(ranks)
        items = np.zeros(ranks, dtype=np.int64)
        for slot in np.argsort(-per_slot[layer], kind="quicksort"):
            pack = int(np.argmin(weights))
            out[layer, pack * per_rank + items[pack]] = phy2log[layer, slot]
            weights[pack] += per_slot[layer, slot]
            items[pack] += 1
            if items[pack] == per_rank:
                weights[pack] = np.inf
    p2l = torch.from_numpy(out if load.dim() == 2 else out[0])
    return Replicas.from_physical(p2l, ranks, E, origin=origin)


def parse_replicas(obj: Any, num_experts: int | None, origin: str) -> Replicas | None:
    """A placement JSON object {"ranks": D, "physical_to_logical": [...]} as `Replicas`; None when `obj`
    is not such an object (a list of ranks is an ordinary placement)."""
    if not isinstance(obj, dict):
        return None
    unknown = set(obj) - {"ranks", "physical_to_logical"}
    if unknown or "physical_to_logical" not in obj or "ranks" not in obj:
        raise ValueError(f"{origin}: a placement with redundant experts is an object with exactly the keys "
                         f"\"ranks\" and \"physical_to_logical\"; write e.g. {EXAMPLE}")
    return Replicas.from_physical(obj["physical_to_logical"], obj["ranks"], num_experts, origin=origin)


def load_placement_file(path: str, num_experts: int, ranks: int | None,
                        layers: int | None = None) -> "torch.Tensor | Replicas":
    """A placement file, read once: `Replicas` for `{"ranks": D, "physical_to_logical": [...]}` (checked
    against E, `ranks` when given, and L), else the [E] or [L, E] ranks `placement.load_placement` reads."""
    from .placement import check_placement, read_placement_json

    obj = read_placement_json(path)
    replicas = parse_replicas(obj, num_experts, str(path))
    if replicas is not None:
        replicas.check_fits(num_experts, ranks, layers)
        return replicas
    return check_placement(obj, num_experts, ranks, origin=str(path), layers=layers)


def _int_tensor(obj: Any, origin: str) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        if obj.dtype.is_floating_point or obj.dtype == torch.bool or obj.is_complex():
            raise ValueError(f"{origin}: physical_to_logical must hold integers, got a {obj.dtype} tensor")
        return obj.detach().to("cpu", torch.int64)

    out = int_lists(obj, f"{origin}: the per-layer physical_to_logical lists differ in length; every MoE layer has "
                         "the same P slots", origin)
    if out is not None:
        return out
    raise ValueError(f"{origin}: physical_to_logical is a non-empty list of logical expert ids, one per physical slot, "
                     f"or one such list per MoE layer; write e.g. {EXAMPLE}")
