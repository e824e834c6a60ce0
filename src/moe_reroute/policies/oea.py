"""`oea`: Opportunistic Expert Activation (arXiv 2511.02237), simplified and general.

Per layer and decode step:
1. Each token ranks its experts: its native top-K in the model's order, then the rest by the model's
   score (see `moe_reroute.scoring`).
2. Base set: its top n_i = min(k0, t_i) experts, t_i the fewest whose probability reaches p
   (p = 1: n_i = k0). The batch's loaded set S is the union of the valid tokens' base sets; a fixed
   token's (`fixed`) base set is its whole native top-K, which it routes to exactly.
3. Piggyback: walking down its ranking (ranks n_i+1 .. max_rank), a token that is not fixed adds an
   expert only if it is in S (a fixed token's experts included), until it holds k_max experts. S never
   grows, so U = |S| <= U(native).
4. Weights: the token's router probabilities over its kept experts, renormalised when the model
   renormalises its top-k (raw probabilities otherwise); a token that kept exactly its native top-K
   gets the model's own weights.
A batch of one token therefore gets exactly its top-k0: with nobody else, there is nothing to piggyback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..contract import Routing
from ..scoring import (finish, fixed_members, native_where_fixed, native_where_unchanged, pack, rank, ranked_native,
                       sanitize, score, token_probs, weights_for)
from .base import Policy, PolicyConfig, is_int, need_at_most, need_int, per_layer


@dataclass(frozen=True)
class OEAConfig(PolicyConfig):
    """k0: base experts per token. p: top-p for the base (1.0 = off). k_max: experts per token at most
    (None = K). max_rank: deepest rank a token may piggyback (None = E). Each may be given per layer."""

    k0: Any = per_layer()
    p: Any = per_layer(1.0)
    k_max: Any = per_layer(None)
    max_rank: Any = per_layer(None)

    def check(self, name: str, value: Any) -> None:
        if name == "k0":
            need_int("oea k0", value)
        elif name == "p":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"oea p must be a probability in (0, 1], got {value!r}")
        elif name in ("k_max", "max_rank") and value is not None:
            need_int(f"oea {name}", value)
        if name == "k_max" and value is not None and is_int(self.k0) and value < self.k0:
            raise ValueError(f"oea k_max={value} < k0={self.k0}; k_max bounds the experts a token keeps, base included")


class OEA(Policy):
    name = "oea"
    Config = OEAConfig

    def check_fit(self, spec, config, layer) -> None:
        K, E = spec.top_k, spec.num_experts
        k_max = K if config.k_max is None else config.k_max
        max_rank = E if config.max_rank is None else config.max_rank
        need_at_most("oea k0", config.k0, K, "the model's K")
        need_at_most("oea k_max", k_max, K, "the model's K")
        need_at_most("oea k0", config.k0, k_max, "k_max")
        need_at_most("oea max_rank", max_rank, E, "the number of experts E")

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None) -> Routing:
        K, E = spec.top_k, spec.num_experts
        k0 = config.k0
        k_max = K if config.k_max is None else config.k_max
        max_rank = E if config.max_rank is None else config.max_rank

        s = score(sanitize(router_logits, valid), spec, self.ties, native)
        order = rank(s.choice, ranked_native(s)[0], self.ties)  # [T, E]
        values = s.choice.gather(-1, order)
        pos = torch.arange(E, device=order.device)
        if config.p >= 1.0:
            n = torch.full_like(order[..., :1], k0)
        else:
            cum = token_probs(s.choice, s.gate).gather(-1, order).cumsum(dim=-1)  # [T, E]
            t = (cum < config.p).sum(dim=-1, keepdim=True) + 1  # fewest experts whose mass reaches p
            n = t.clamp(max=k0)
        base = pos < n  # [T, E], in rank order
        base_by_expert = torch.zeros_like(base).scatter(-1, order, base)  # [T, E]
        members = base_by_expert & valid[..., None]  # [T, E]
        held = fixed_members(s, fixed, valid)
        if held is not None:  # a fixed row brings its whole native top-K
            members = torch.where(fixed[..., None], held, members)
        loaded = members.any(dim=-2, keepdim=True).expand_as(order)  # [T, E] by expert: the batch's set S
        piggyback = loaded.gather(-1, order) & torch.isfinite(values) & (pos < max_rank)
        eligible = base | piggyback
        keep = eligible & (eligible.cumsum(dim=-1) <= k_max)
        ids, kept = pack(order, keep, K)
        w = weights_for(s.gate, ids, kept, spec, spec.renormalize)
        ids, w = native_where_unchanged(s, ids, kept, w)
        return finish(*native_where_fixed(s, ids, w, fixed, valid), valid)
