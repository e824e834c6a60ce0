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
3. Then, while |S| < budget: the token's kept mass R[t] is the sum of its best K values of q within S,
   theta[t] its K-th best (0 while S holds fewer than K of its experts); expert e outside S would raise
   R[t] by max(0, q[t, e] - theta[t]). S takes the expert with the largest summed gain in log kept mass,
   sum over t of log(1 + that rise / R[t]) (ties: lower id), and stops early when no expert gains anything.
4. Each token routes to its best K experts within S, by its own ranking, with the model's weights over those
   (renormalised as the model does; the model's own weights if that is its native top-K), as `budget` does.
So the set holds max(budget, forced experts) experts at most; U <= that. A single token with budget >= K, or
a budget >= the experts any token can use, routes natively. The sums are in float64; a step's set is
found in `budget` small steps on the device, without host synchronisation (no fused kernel: the torch
path runs on every backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..contract import Routing
from ..scoring import (finish, fixed_members, native_where_fixed, native_where_unchanged, pack, rank,
                       ranked_native, sanitize, score, weights_for)
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

    def check_fit(self, spec, config, layer) -> None:
        need_at_most("gain budget", config.budget, spec.num_experts, "the number of experts E")
        need_at_most("gain base", config.base, spec.top_k, "the model's K")

    def no_kernel_for(self) -> str:
        return "gain has no fused kernel"

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None) -> Routing:
        K, E = spec.top_k, spec.num_experts
        s = score(sanitize(router_logits, valid), spec, self.ties, native)
        native = ranked_native(s)[0]  # [T, K], best first
        order = rank(s.choice, native, self.ties)  # [T, E]
        in_set = self._grow(s, native, order, valid, fixed, config.budget, config.base, K)  # [E]
        in_set = in_set[..., None, :].expand(order.shape)  # [T, E] by expert
        # a token's native top-K may hold experts of weight 0 (fewer than K finite logits): they stay
        # allowed, so that the no-op setting is native routing exactly (as in `budget`)
        head = torch.arange(E, device=order.device) < K
        allowed = in_set.gather(-1, order) & (torch.isfinite(s.choice.gather(-1, order)) | head)  # [T, E], rank order
        keep = allowed & (allowed.cumsum(dim=-1) <= K)
        ids, kept = pack(order, keep, K)
        w = weights_for(s.gate, ids, kept, spec, spec.renormalize)
        ids, w = native_where_unchanged(s, ids, kept, w)
        return finish(*native_where_fixed(s, ids, w, fixed, valid), valid, s)

    @staticmethod
    def _grow(s, native, order, valid, fixed, budget: int, base: int, K: int) -> torch.Tensor:
        """Steps 1-3: the set S, [E] bool ([S, E] for S steps)."""
        rerouted = valid if fixed is None else valid & ~fixed  # [T]
        gate = torch.where(torch.isfinite(s.choice), s.gate, torch.zeros_like(s.gate)).double()  # [T, E]
        own = gate.gather(-1, native).sum(dim=-1, keepdim=True)  # [T, 1]
        q = gate / own.clamp_min(torch.finfo(torch.float64).tiny) * rerouted[..., None]  # [T, E]
        tops = order[..., :base]  # [T, base]
        members = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, tops, True) & rerouted[..., None]
        held = fixed_members(s, fixed, valid)  # [T, E] or None
        if held is not None:
            members = members | held
        in_set = members.any(dim=-2)  # [E]
        kth = torch.where(in_set[..., None, :], q, torch.full_like(q, -1.0)).topk(K, dim=-1)[0].clamp_min(0)  # [T, K]
        tiny = torch.finfo(torch.float64).tiny
        for _ in range(budget):
            theta = kth[..., -1:]  # [T, 1]
            kept = kth.sum(dim=-1, keepdim=True).clamp_min(tiny)  # [T, 1]
            rise = (q - theta).clamp_min(0)  # [T, E]
            gain = torch.log1p(rise / kept).sum(dim=-2).masked_fill(in_set, -1.0)  # [E]
            best_gain, best = gain.max(dim=-1, keepdim=True)  # first maximum: the lower id
            grow = (in_set.sum(dim=-1, keepdim=True) < budget) & (best_gain > 0)  # [1]
            in_set = in_set | (torch.zeros_like(in_set).scatter_(-1, best, True) & grow)
            new = q.gather(-1, best.unsqueeze(-2).expand(*q.shape[:-1], 1)) * grow.unsqueeze(-2)  # [T, 1]
            kth = torch.cat([kth, new], dim=-1).topk(K, dim=-1)[0]
        return in_set
