"""`budget`: one expert set for the whole batch under a budget of experts (XShare-style, arXiv 2602.07265;
XShare's own rule is `xshare`, compared with this one in docs/peers.md).

Per layer and batch:
1. Every valid token's top-1 expert is in the set (its best expert is never taken away), and so is
   every native expert of a valid fixed token (`fixed`), which keeps its native routing exactly: its
   experts are loaded anyway. These forced experts count against the budget.
2. The rest of the budget goes greedily to the experts holding the most native gate mass: expert e
   scores the sum over valid tokens of its weight in their native top-K (each token's top-K weights
   normalised to sum 1, counted in whole 1/256ths and at least one, so that the sum is exact in any
   order and every backend picks the same set). Ties go to the lower id (experts in no token's native
   top-K fill a budget larger than needed by lower id).
3. Each token routes to its best K experts within the set, by its own ranking, with the model's weights
   over those (renormalised as the model does; the model's own weights if that is its native top-K).
The set holds max(budget, forced experts) experts at most: the forced experts are all in it when they
alone exceed the budget (then the set is just them). A fixed token's mass lies on forced experts, so
it does not change which others fill the budget. With budget >= K a single token gets
exactly its native experts.

Expert parallelism (`ep=D`, with `placement` and `rank_cap`; off by default, see `moe_reroute.policies.ep`):
in step 2 an expert joins only while its rank holds fewer than C = `rank_cap` or ceil(budget / D) experts
of the set (forced experts count, and are taken even past C), so the slowest rank holds at most
max(C, forced experts on it) and the set still at most max(budget, forced experts). With D = 1 (and no
rank_cap) C = budget: the plain policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..contract import Routing
from ..scoring import BUDGET_GRID, fixed_members, rank, ranked_native, route_within_set, sanitize, score
from .base import Policy, PolicyConfig, need_at_most, need_int, per_layer
from .ep import (EP_DERIVED, by_token, check_ep_fields, check_ep_fit, layer_placement, per_slot, rank_capped_set,
                 replicas_of, slot_view)


@dataclass(frozen=True)
class BudgetConfig(PolicyConfig):
    """budget: experts the batch may activate (int, or per layer). ep: expert-parallel ranks D (None =
    off); placement: "contiguous" (default), "engine", a placement file or [E] / [L, E] ranks; rank_cap: experts per
    rank (None: ceil(budget / D)). See `moe_reroute.policies.ep`."""

    budget: Any = per_layer()
    ep: Any = None
    placement: Any = field(default=None, metadata={"sequence": True})
    rank_cap: Any = None

    DERIVED: ClassVar[tuple[str, ...]] = EP_DERIVED

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ep_fields(self, "budget")

    def check(self, name: str, value: Any) -> None:
        if name == "budget":
            need_int("budget budget", value)


def rank_cap(config: BudgetConfig) -> int:
    """Experts per rank under `ep`: `rank_cap`, else ceil(budget / D)."""
    return config.rank_cap if config.rank_cap is not None else -(-config.budget // config.ep)


class Budget(Policy):
    name = "budget"
    Config = BudgetConfig

    def check_fit(self, spec, config, layer) -> None:
        check_ep_fit(config, spec.num_experts, "budget", layer)
        replicas = replicas_of(config) if config.ep is not None else None
        if replicas is None:
            need_at_most("budget", config.budget, spec.num_experts, "the number of experts E")
        else:  # redundant experts: the budget counts the physical slots read
            need_at_most("budget", config.budget, replicas.num_physical, "the physical expert slots P")

    def no_kernel_for(self) -> str:
        if self.config.ep is not None and replicas_of(self.config) is not None:
            return "budget with ep over redundant experts (a replicas placement) has no fused kernel"
        return ""

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None) -> Routing:
        E = spec.num_experts
        s = score(sanitize(router_logits, valid), spec, self.ties, native)
        native = ranked_native(s)[0]  # [T, K], best first
        order = rank(s.choice, native, self.ties)  # [T, E]
        mass = s.gate.gather(-1, native)
        mass = mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
        q = torch.floor(mass * BUDGET_GRID + 0.5).to(torch.int32).clamp_min(1)  # exact integer sums, in any order
        q = torch.where(valid[..., None], q, torch.zeros_like(q))
        held = fixed_members(s, fixed, valid)
        replicas = replicas_of(config) if config.ep is not None else None
        if replicas is not None:  # redundant experts: the set is chosen over the slots the tokens reach
            slots, slot_rank = slot_view(replicas, layer, order.shape[-2], order.device)  # [T, E], [P]
            P = replicas.num_physical
            at = slots.expand(*native.shape[:-1], E).gather(-1, native)  # [T, K] slots of the native experts
            mass_e = per_slot(q.long(), at, P)  # [P]
            top1 = torch.zeros_like(at, dtype=torch.bool)
            top1[..., 0] = valid
            forced = per_slot(top1, at, P)
            if held is not None:
                forced = forced | per_slot(held, slots, P)
            key = torch.where(forced, torch.iinfo(torch.long).max, mass_e)
            in_slots = rank_capped_set(key, forced, slot_rank, config.ep, rank_cap(config), total=config.budget)  # [P]
            return route_within_set(s, order, by_token(in_slots, slots), spec, valid, fixed, per_token=True)
        steps = native.shape[:-2]  # () or (S,): one expert set per step
        mass_e = torch.zeros(*steps, E, dtype=torch.int32, device=q.device).scatter_add_(
            -1, native.flatten(-2), q.flatten(-2))  # [E]

        forced = torch.zeros_like(mass_e).scatter_add_(-1, native[..., 0], valid.to(torch.int32)) > 0  # [E]
        if held is not None:  # every native expert of a fixed row
            forced = forced | held.any(dim=-2)
        key = torch.where(forced, torch.full_like(mass_e, torch.iinfo(torch.int32).max), mass_e)
        if config.ep is None:
            chosen = torch.sort(key, dim=-1, descending=True, stable=True)[1][..., : config.budget]
            in_set = torch.zeros_like(forced).scatter_(-1, chosen, True) | forced  # [E]
        else:
            in_set = rank_capped_set(key, forced, layer_placement(config, E, layer, key.device), config.ep,
                                     rank_cap(config), total=config.budget)  # [E]

        return route_within_set(s, order, in_set, spec, valid, fixed)
