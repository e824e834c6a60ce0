"""`sere`: similarity-based expert re-routing (arXiv 2602.07616).

Per layer and batch:
1. The model's own top-K (ids and weights), in its order.
2. Primary set P: the experts in slots [0, primary) of any valid token, and every native expert (all K
   slots) of a valid fixed token (`fixed`): its experts are loaded anyway, so they count as primary.
   A fixed token keeps its native routing exactly.
3. Every secondary slot (slot >= primary) whose expert e is not in P goes to p* = argmax_{p in P}
   Sim[e, p] (ties: lowest id), unless Sim[e, p*] < threshold: then e is "critical" and kept.
   threshold <= 0 keeps nothing (critical-expert preservation off).
4. Weights stay the model's top-K weights; a re-routed slot applies its weight to p*.
Where a token ends up with p* twice, the weights are folded into its first slot holding p* (the same
output as running the expert twice) and the freed slot becomes a weight-0 repeat.
Similarity matrices come from `moe_reroute.calibration.expert_similarity`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from dataclasses import dataclass, field
from typing import Any

import torch

from ..contract import Routing
from ..scoring import finish, fixed_members, native_where_fixed, native_where_unchanged, ranked_native, sanitize, score
from .base import COUNTING, Policy, PolicyConfig, need_at_most, need_int, per_layer, resolve


@dataclass(frozen=True)
class SEREConfig(PolicyConfig):
    """similarity: an [E, E] tensor for every layer, an [L, E, E] tensor, or a list/mapping of [E, E]
    by layer; L and the list and mapping count MoE layers only (index 0 = the first MoE layer), as
    `moe_reroute.hf.calibrate_similarity` returns them. primary (S): leading slots that form the primary
    set. threshold (rho): critical-expert cut-off. primary and threshold may be given per layer."""

    similarity: Any = field(default=None, metadata={"sequence": True}, repr=False)
    primary: Any = per_layer(2)
    threshold: Any = per_layer(0.1)

    def __post_init__(self) -> None:
        sim = self.similarity
        if sim is None:
            raise ValueError(
                "sere needs similarity=<[E, E] tensor or one per layer>; "
                "compute it with moe_reroute.calibration.expert_similarity"
            )
        if isinstance(sim, (str, bytes, PathLike)):
            raise ValueError(f"sere similarity={sim!r} is a path, not a tensor: load it with "
                             "moe_reroute.similarity.load_similarity(path, num_experts=E), or name the file in a spec "
                             "(sere:similarity=PATH) or policy file")
        mats = list(sim.values()) if isinstance(sim, Mapping) else (
            list(sim) if isinstance(sim, Sequence) or (isinstance(sim, torch.Tensor) and sim.dim() == 3) else [sim]
        )
        if not mats:
            raise ValueError("sere similarity: an empty list or mapping gives no matrix for any layer")
        for m in mats:
            if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != m.shape[1]:
                got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"sere similarity matrices must be square [E, E] tensors, got {got}")
            if not m.dtype.is_floating_point:
                raise ValueError(f"sere similarity must be floating point, got {m.dtype}")
            if not bool(torch.isfinite(m).all()):
                raise ValueError("sere similarity contains NaN or inf; recalibrate it")
        super().__post_init__()

    def check(self, name: str, value: Any) -> None:
        if name == "primary":
            need_int("sere primary", value)
        elif name == "threshold" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value):
            raise ValueError(f"sere threshold must be a number, got {value!r}")

    def layer_keys(self) -> list[tuple[str, list[int]]]:
        sim = self.similarity
        if isinstance(sim, torch.Tensor):
            keys = [("similarity", list(range(sim.shape[0])))] if sim.dim() == 3 else []
        elif isinstance(sim, Mapping):
            keys = [("similarity", sorted(sim))]
        else:
            keys = [("similarity", list(range(len(sim))))]
        return keys + super().layer_keys()

    def varies_by_layer(self) -> bool:
        sim = self.similarity
        per_layer_sim = not isinstance(sim, torch.Tensor) or sim.dim() == 3
        return per_layer_sim or super().varies_by_layer()

    def similarity_at(self, layer: int | None) -> torch.Tensor:
        """The [E, E] similarity of MoE layer `layer`."""
        sim = self.similarity
        if isinstance(sim, torch.Tensor) and sim.dim() == 3:
            if layer is None:
                raise ValueError("sere similarity is given per layer; call the policy with layer=<MoE-layer index>")
            if not 0 <= layer < sim.shape[0]:
                raise ValueError(f"sere similarity holds {sim.shape[0]} layers; MoE layer {layer} is out of range "
                                 f"({COUNTING}: stack one [E, E] per MoE layer)")
            return sim[layer]
        return resolve("sere similarity", sim, layer)


class SERE(Policy):
    name = "sere"
    Config = SEREConfig

    def check_fit(self, spec, config, layer) -> None:
        E = spec.num_experts
        need_at_most("sere primary", config.primary, spec.top_k, "the model's K")
        sim = config.similarity_at(layer)
        if tuple(sim.shape) != (E, E):
            raise ValueError(
                f"sere similarity for MoE layer {layer} is {tuple(sim.shape)} but the model has E={E} experts; "
                f"it needs [{E}, {E}], calibrated on this model"
            )

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None) -> Routing:
        K, E = spec.top_k, spec.num_experts
        S = config.primary
        sim = config.similarity_at(layer).to(device=router_logits.device, dtype=torch.float32)  # [E, E]

        s = score(sanitize(router_logits, valid), spec, self.ties, native)
        ids, weights = ranked_native(s)  # [T, K], best first
        slot = torch.arange(K, device=ids.device)
        in_primary = torch.zeros(*ids.shape[:-1], E, dtype=torch.bool, device=ids.device)  # [T, E]
        in_primary.scatter_(-1, ids[..., :S], True)
        in_primary &= valid[..., None]
        held = fixed_members(s, fixed, valid)
        if held is not None:  # a fixed row's K native experts are all loaded
            in_primary |= held
        P = in_primary.any(dim=-2)  # [E] ([S, E])
        sim_to_p = sim.masked_fill(~P[..., None, :], float("-inf"))  # [E, E]: rows e, columns p in P
        best = sim_to_p.argmax(dim=-1)  # [E], first maximum: lowest id on ties
        best_sim = sim_to_p.gather(-1, best[..., None]).squeeze(-1)  # [E]
        critical = best_sim < config.threshold if config.threshold > 0 else torch.zeros_like(P)
        movable = ~P & ~critical  # [E]
        by_row = ids.shape[:-1] + (E,)  # per-expert values, one row per token: [T, E]
        reroute = (slot >= S) & movable[..., None, :].expand(by_row).gather(-1, ids)  # [T, K]
        new_ids = torch.where(reroute, best[..., None, :].expand(by_row).gather(-1, ids), ids)

        # Fold duplicates: each slot's weight goes to the first slot holding the same expert.
        same = new_ids[..., :, None] == new_ids[..., None, :]  # [T, K, K]
        first = same.to(torch.int32).argmax(dim=-1)  # [T, K]
        folded = torch.zeros_like(weights).scatter_add_(-1, first, weights)
        ids, w = native_where_unchanged(s, new_ids, torch.ones_like(reroute), folded)
        return finish(*native_where_fixed(s, ids, w, fixed, valid), valid, s)

