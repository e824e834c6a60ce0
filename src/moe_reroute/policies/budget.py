"""`budget`: one expert set for the whole batch under a budget of experts (XShare-style, arXiv 2602.07265).

Per layer and batch:
1. Every valid token's top-1 expert is in the set (its best expert is never taken away).
2. The rest of the budget goes greedily to the experts holding the most native gate mass: expert e
   scores the sum over valid tokens of its weight in their native top-K (each token's top-K weights
   normalised to sum 1). Ties go to the lower id. (Experts with no such mass may fill a budget larger
   than needed, but no token routes to them: each token's native top-K is already in the set.)
3. Each token routes to its best K experts within the set, by its own scores, with the model's weights
   over those (renormalised as the model does).
The set holds max(budget, distinct top-1 experts) experts at most: the top-1 guarantee wins when more
tokens disagree on their best expert than the budget allows. With budget >= K a single token gets
exactly its native experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..contract import Routing
from ..scoring import finish, pack, rank, scores, weights_for
from .base import Policy, PolicyConfig, need_at_most, need_int, per_layer


@dataclass(frozen=True)
class BudgetConfig(PolicyConfig):
    """budget: experts the batch may activate (int, or per layer)."""

    budget: Any = per_layer()

    def check(self, name: str, value: Any) -> None:
        if name == "budget":
            need_int("budget budget", value)


class Budget(Policy):
    name = "budget"
    Config = BudgetConfig

    def route(self, router_logits, spec, valid, config, layer) -> Routing:
        K, E = spec.top_k, spec.num_experts
        need_at_most("budget", config.budget, E, "the number of experts E")
        choice, gate = scores(router_logits, spec)
        values, order = rank(choice)  # [T, E]
        native = order[:, :K]  # [T, K]
        mass = gate.gather(1, native)
        mass = mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
        mass = mass * valid[:, None]
        score = torch.zeros_like(gate).scatter_(1, native, mass).sum(dim=0)  # [E]

        top1 = torch.zeros_like(gate, dtype=torch.bool).scatter_(1, order[:, :1], True)
        forced = (top1 & valid[:, None]).any(dim=0)  # [E]
        key = torch.where(forced, torch.full_like(score, float("inf")), score)
        chosen = torch.sort(key, descending=True, stable=True)[1][: config.budget]
        in_set = torch.zeros_like(forced).scatter_(0, chosen, True) | forced  # [E]

        within = torch.where(in_set[None, :], choice, torch.full_like(choice, float("-inf")))
        values, order = rank(within)
        pos = torch.arange(E, device=order.device)
        keep = torch.isfinite(values) & (pos < K)
        keep[:, 0] = True  # invalid rows may have nothing in the set; finish() overwrites them
        ids, kept = pack(order, keep, K)
        return finish(ids, weights_for(gate, ids, kept, spec, spec.renormalize), valid)
