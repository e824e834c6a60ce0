"""`gain`: one expert set for the whole batch, grown expert by expert by what it adds to the tokens' kept
gate mass (a cross of `budget`'s batch-wide set and `oea`'s piggybacking).

`budget` fills its set by each expert's share of the tokens' native top-K mass, as if a token could use only
its native experts and lost an expert's whole mass when it is left out. But each token then routes to its
best K experts within the set, so it replaces a missing expert by the next one it ranks in the set; and a
token that has lost much of its mass is hurt more by a further loss than one that has lost little. `gain`
counts both.

Per layer and batch (T = tokens, E = experts, K = experts per token):
1. Each valid re-routed token t has q[t, e] = gate[t, e] / (gate mass of its native top-K): its router
   probabilities relative to what native routing keeps (0 where the model may never pick e).
2. The set S starts with each valid re-routed token's best `base` experts (its ranks 1..base) and every
   native expert of a valid fixed row (`fixed`), which keeps its native routing exactly.
3. Then, while |S| < budget: token t would route to its best K experts within S by its own ranking; its
   kept mass R[t] is the sum of their q. An expert e outside S that t ranks above the K-th of those
   (or any e, while S holds fewer than K of t's experts) would displace it, changing R[t] by q[t, e] minus
   that K-th expert's q (0 for an empty slot); otherwise by 0. S takes the expert with the largest summed
   gain in log kept mass, sum over t of log(1 + that rise / R[t]) (ties: lower id). An expert no token would use gains 0 and
   changes nothing; a rise can be negative only where a token ranks an expert above one of more gate mass
   (a selection bias, DeepSeek-V3), and such an expert joins only when no expert gains more.
4. Each token routes to its best K experts within S, by its own ranking, with the model's weights over those
   (renormalised as the model does; the model's own weights if that is its native top-K), as `budget` does.
So the set holds max(budget, forced experts) experts at most; U <= that. A single token with budget >= K, and
any batch with budget = E, routes natively. The sums are in float64; a step's set is found in `budget`
small steps on the device, without host synchronisation (no fused kernel: the torch path runs on every
backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..contract import Routing
from ..scoring import fixed_members, rank, ranked_native, route_within_set, sanitize, score
from .base import Policy, PolicyConfig, need_at_most, need_int, per_layer


@dataclass(frozen=True)
class GainConfig(PolicyConfig):
    """budget: experts the batch may activate (int, or per layer, or by_batch). base: each token's best
    experts that are always in the set (default 1: its top-1)."""

    budget: Any = per_layer()
    base: Any = per_layer(1)

    def check(self, name: str, value: Any) -> None:
        need_int(f"gain {name}", value)


class Gain(Policy):
    name = "gain"
    Config = GainConfig
    has_kernel = False  # backend="triton" warns once and runs these torch ops

    def check_fit(self, spec, config, layer) -> None:
        need_at_most("gain budget", config.budget, spec.num_experts, "the number of experts E")
        need_at_most("gain base", config.base, spec.top_k, "the model's K")

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None) -> Routing:
        K = spec.top_k
        s = score(sanitize(router_logits, valid), spec, self.ties, native)
        native = ranked_native(s)[0]  # [T, K], best first
        order = rank(s.choice, native, self.ties)  # [T, E]
        in_set = self._grow(s, native, order, valid, fixed, config.budget, config.base, K)  # [E]
        return route_within_set(s, order, in_set, spec, valid, fixed)

    @staticmethod
    def _grow(s, native, order, valid, fixed, budget: int, base: int, K: int) -> torch.Tensor:
        """Steps 1-3: the set S, [E] bool ([S, E] for S steps)."""
        E = order.shape[-1]
        rerouted = valid if fixed is None else valid & ~fixed  # [T]
        gate = torch.where(torch.isfinite(s.choice), s.gate, torch.zeros_like(s.gate)).double()  # [T, E]
        own = gate.gather(-1, native).sum(dim=-1, keepdim=True)  # [T, 1]
        q = gate / own.clamp_min(torch.finfo(torch.float64).tiny) * rerouted[..., None]  # [T, E]
        q = torch.cat([q, torch.zeros_like(q[..., :1])], dim=-1)  # [T, E + 1]: column E, an empty slot
        pos = torch.empty_like(order).scatter_(-1, order, torch.arange(E, device=order.device).expand_as(order))  # [T, E]
        members = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, order[..., :base], True) & rerouted[..., None]
        held = fixed_members(s, fixed, valid)  # [T, E] or None
        if held is not None:
            members = members | held
        in_set = members.any(dim=-2)  # [E]
        # each token's K best ranks within S, ascending; rank E: an empty slot (fewer than K in S)
        slots = torch.where(in_set[..., None, :], pos, E).topk(K, dim=-1, largest=False)[0]  # [T, K]
        by_rank = torch.cat([order, torch.full_like(order[..., :1], E)], dim=-1)  # [T, E + 1]: rank -> expert
        for _ in range(budget):
            last = by_rank.gather(-1, slots)  # [T, K] experts (E: empty)
            kept = q.gather(-1, last).sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)  # [T, 1]
            theta = q.gather(-1, last[..., -1:])  # [T, 1]: the token's K-th expert in S, which e would displace
            rise = torch.where(pos < slots[..., -1:], q[..., :E] - theta, 0.0)  # [T, E]
            gain = torch.log1p((rise / kept).clamp_min(FLOOR - 1)).sum(dim=-2)  # [E]
            best = gain.masked_fill(in_set, float("-inf")).argmax(dim=-1, keepdim=True)  # first maximum: lower id
            grow = in_set.sum(dim=-1, keepdim=True) < budget  # [1]
            in_set = in_set | (torch.zeros_like(in_set).scatter_(-1, best, True) & grow)
            new = pos.gather(-1, best.unsqueeze(-2).expand(*pos.shape[:-1], 1))  # [T, 1]
            new = torch.where(grow.unsqueeze(-2), new, E)
            slots = torch.cat([slots, new], dim=-1).topk(K, dim=-1, largest=False)[0]
        return in_set


# a token's kept mass never falls below this share of itself in the gain's logarithm (an expert that would
# displace all of a token's mass for an expert of zero weight still gets a finite, very negative gain)
FLOOR = 2.0 ** -20
