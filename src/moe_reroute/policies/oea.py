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
Its U is |S|, which `unique` counts without routing (`moe_reroute.policies.unique`).

Expert parallelism (`ep=D`, with `placement` and `rank_cap`; off by default, see `moe_reroute.policies.ep`):
the step waits for the rank holding most of S, so S is re-chosen with at most C experts per rank, C =
`rank_cap` or ceil(|S| / D) (the base set spread evenly), greedily: each valid token's top-1 expert and a
fixed token's native experts first (always, even past C), then the other base-set experts, then experts
outside it that some token has in its native top-K, each group by native gate mass (summed over the valid
tokens as `budget` counts it), a rank taking experts until it holds C. So busy ranks shed their least
wanted base experts and idle ranks take the next most wanted ones, up to C. Each token then keeps those of
its base experts that are in S (its top-1 always is) and piggybacks on S as in step 3; U <= C x D, and
max-rank U <= max(C, forced experts on one rank). With D = 1 (and no rank_cap) S is the base set: plain OEA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..contract import Routing
from ..scoring import (BUDGET_GRID, finish, fixed_members, native_where_fixed, native_where_unchanged, order_key, pack,
                       rank, ranked_native, sanitize, score, token_probs, weights_for)
from .base import Policy, PolicyConfig, is_int, need_at_most, need_int, per_layer
from .ep import (EP_DERIVED, by_token, check_ep_fields, check_ep_fit, layer_placement, per_slot, rank_capped_set,
                 replicas_of, slot_view)
from .unique import head_union


@dataclass(frozen=True)
class OEAConfig(PolicyConfig):
    """k0: base experts per token. p: top-p for the base (1.0 = off). k_max: experts per token at most
    (None = K). max_rank: deepest rank a token may piggyback (None = E). Each may be given per layer.
    ep: expert-parallel ranks D (None = off); placement: "contiguous" (default), "engine", a placement file or
    [E] / [L, E] ranks; rank_cap: experts per rank (None: ceil(|S| / D)). See `moe_reroute.policies.ep`."""

    k0: Any = per_layer()
    p: Any = per_layer(1.0)
    k_max: Any = per_layer(None)
    max_rank: Any = per_layer(None)
    ep: Any = None
    placement: Any = field(default=None, metadata={"sequence": True})
    rank_cap: Any = None

    DERIVED: ClassVar[tuple[str, ...]] = EP_DERIVED

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ep_fields(self, "oea")

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
        check_ep_fit(config, E, "oea", layer)

    def no_kernel_for(self) -> str:
        if self.config.ep is not None and replicas_of(self.config) is not None:
            return "oea with ep over redundant experts (a replicas placement) has no fused kernel"
        return ""

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None) -> Routing:
        K, E = spec.top_k, spec.num_experts
        k_max = K if config.k_max is None else config.k_max
        max_rank = E if config.max_rank is None else config.max_rank
        x = sanitize(router_logits, valid)
        s = score(x, spec, self.ties, native)
        if config.ep is not None:
            ids, kept = self._keep_ep(s, spec, valid, config, layer, k_max, max_rank, fixed)
        elif max_rank >= E and (native is None or self.ties == "model"):
            ids, kept = self._keep_by_topk(x, s, spec, valid, config.k0, config.p, k_max, fixed)
        else:
            ids, kept = self._keep_by_rank(s, spec, valid, config.k0, config.p, k_max, max_rank, fixed)
        w = weights_for(s.gate, ids, kept, spec, spec.renormalize)
        ids, w = native_where_unchanged(s, ids, kept, w)
        return finish(*native_where_fixed(s, ids, w, fixed, valid), valid, s)

    def count_unique(self, router_logits, spec, valid, config, layer, fixed=None) -> torch.Tensor:
        """U = |S|: every kept expert of a token is in S (its base, and piggybacked experts only from S), and
        every base expert is kept (n <= k0 <= k_max, base first), so the union of the kept experts is S.
        With `ep` S is re-chosen and a loaded expert may go unused: the routing is counted."""
        if config.ep is not None:
            return super().count_unique(router_logits, spec, valid, config, layer, fixed)
        max_rank = spec.num_experts if config.max_rank is None else config.max_rank
        return head_union(router_logits, spec, valid, self.ties, config.k0, config.p, fixed,
                          full_rank=max_rank < spec.num_experts)

    def _keep_by_rank(self, s, spec, valid, k0, p, k_max, max_rank, fixed):
        """Steps 1-3 on each token's whole ranking ([T, E], a sort): (ids, kept) [T, K]."""
        E = spec.num_experts
        order = rank(s.choice, ranked_native(s)[0], self.ties)  # [T, E]
        values = s.choice.gather(-1, order)
        pos = torch.arange(E, device=order.device)
        if p >= 1.0:
            n = torch.full_like(order[..., :1], k0)
        else:
            cum = token_probs(s.choice, s.gate).gather(-1, order).cumsum(dim=-1)  # [T, E]
            t = (cum < p).sum(dim=-1, keepdim=True) + 1  # fewest experts whose mass reaches p
            n = t.clamp(max=k0)
        base = pos < n  # [T, E], in rank order
        base_by_expert = torch.zeros_like(base).scatter(-1, order, base)  # [T, E]
        loaded = self._loaded(base_by_expert, s, valid, fixed)  # [T, E] by expert
        piggyback = loaded.gather(-1, order) & torch.isfinite(values) & (pos < max_rank)
        eligible = base | piggyback
        keep = eligible & (eligible.cumsum(dim=-1) <= k_max)
        return pack(order, keep, spec.top_k)

    def _keep_ep(self, s, spec, valid, config, layer, k_max, max_rank, fixed):
        """Steps 1-3 with S chosen under a per-rank cap (the module docstring): (ids, kept) [T, K]."""
        K, E, D = spec.top_k, spec.num_experts, config.ep
        native = ranked_native(s)[0]  # [T, K]
        order = rank(s.choice, native, self.ties)  # [T, E]
        pos = torch.arange(E, device=order.device)
        if config.p >= 1.0:
            n = torch.full_like(order[..., :1], config.k0)
        else:
            cum = token_probs(s.choice, s.gate).gather(-1, order).cumsum(dim=-1)  # [T, E]
            n = ((cum < config.p).sum(dim=-1, keepdim=True) + 1).clamp(max=config.k0)
        base = pos < n  # [T, E], rank order
        base_by_expert = torch.zeros_like(base).scatter(-1, order, base)  # [T, E]
        members = self._loaded(base_by_expert, s, valid, fixed, union=False)  # [T, E]: who brings what to S
        held = fixed_members(s, fixed, valid)  # [T, E] or None
        rerouted = valid if fixed is None else valid & ~fixed
        top1 = torch.zeros_like(base_by_expert).scatter_(-1, order[..., :1], True) & rerouted[..., None]
        forced_by = top1 if held is None else top1 | held  # [T, E]
        mass = s.gate.gather(-1, native)
        mass = mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
        q = torch.floor(mass * BUDGET_GRID + 0.5).long().clamp_min(1) * rerouted[..., None]  # [T, K]
        replicas = replicas_of(config)
        if replicas is None:  # the set is chosen over experts, each on one rank
            base_set, forced = members.any(dim=-2), forced_by.any(dim=-2)  # [E]
            mass_e = torch.zeros_like(forced, dtype=torch.long).scatter_add_(-1, native.flatten(-2), q.flatten(-2))
            placement = layer_placement(config, E, layer, order.device)
        else:  # over the physical slots the tokens reach (redundant experts)
            slots, placement = slot_view(replicas, layer, order.shape[-2], order.device)  # [T, E], [P]
            P = replicas.num_physical
            base_set, forced = per_slot(members, slots, P), per_slot(forced_by, slots, P)  # [P]
            mass_e = per_slot(q, slots.expand(*native.shape[:-1], E).gather(-1, native), P)
        tier = torch.where(base_set, 1 << 40, 0)  # base-set experts before the others
        key = torch.where(forced, torch.iinfo(torch.long).max, tier + mass_e)  # [E] (or [P])
        cap = config.rank_cap if config.rank_cap is not None else (base_set.sum(dim=-1, keepdim=True) + D - 1) // D
        loaded = rank_capped_set(key, forced, placement, D, cap, allowed=key > 0)  # [E] (or [P])
        if replicas is None:
            loaded = loaded[..., None, :].expand(order.shape)
        else:
            loaded = by_token(loaded, slots)  # [T, E] by expert: the slot the token reaches is loaded
        loaded = loaded.gather(-1, order)  # [T, E], rank order
        finite = torch.isfinite(s.choice.gather(-1, order))
        # padding rows keep their base, as in plain OEA (`finish` points them at a used expert)
        eligible = (base & (loaded | ~valid[..., None])) | (loaded & finite & (pos < max_rank))
        keep = eligible & (eligible.cumsum(dim=-1) <= k_max)
        return pack(order, keep, K)

    def _keep_by_topk(self, x, s, spec, valid, k0, p, k_max, fixed):
        """Steps 1-3 without sorting E (max_rank = E): the same (ids, kept) [T, K] as `_keep_by_rank`.

        A token's ranking is its native top-K, then the rest by `order_key`; the experts it may add past
        its native top-K are the loaded ones, so the best k_max - 1 of those (a top-k of keys, which are
        distinct) are all it can reach: its kept experts are the first k_max eligible of
        [native top-K, those]."""
        K, E = spec.top_k, spec.num_experts
        nat = ranked_native(s)[0]  # [T, K], rank order
        slot = torch.arange(K, device=nat.device)
        if p >= 1.0:
            base = (slot < k0).expand(nat.shape)  # [T, K]
        else:  # the mass of ranks 1..K is all that n = min(k0, t) <= K depends on
            cum = token_probs(s.choice, s.gate).gather(-1, nat).cumsum(dim=-1)  # [T, K]
            base = slot < ((cum < p).sum(dim=-1, keepdim=True) + 1).clamp(max=k0)
        native_set = torch.zeros_like(s.choice, dtype=torch.bool).scatter_(-1, nat, True)  # [T, E]
        loaded = self._loaded(torch.zeros_like(native_set).scatter_(-1, nat, base), s, valid, fixed)  # [T, E]
        finite = torch.isfinite(s.choice)
        nat_ok = base | (loaded & finite).gather(-1, nat)  # [T, K]
        seq, ok = nat, nat_ok
        m = min(k_max - 1, E - K)  # beyond its native top-K a token adds at most k_max - 1 (base >= 1)
        if m > 0:
            key = order_key(s.choice, x if spec.scoring != "sigmoid" else None)
            key = key.masked_fill_(~(loaded & finite & ~native_set), torch.iinfo(key.dtype).min)
            top_key, top = torch.topk(key, m, dim=-1)  # [T, m], rank order
            seq = torch.cat([nat, top], dim=-1)  # [T, K + m]
            ok = torch.cat([nat_ok, top_key != torch.iinfo(key.dtype).min], dim=-1)
        keep = ok & (ok.cumsum(dim=-1) <= k_max)  # [T, K + m]
        # pack: kept experts to slots 0.., in rank order; the other slots repeat slot 0 (always kept: base)
        dest = torch.where(keep, keep.cumsum(dim=-1) - 1, K)  # slot K collects the unkept, then is cut
        ids = nat[..., :1].expand(*nat.shape[:-1], K + 1).contiguous().scatter_(-1, dest, seq)[..., :K]
        kept = slot < keep.sum(dim=-1, keepdim=True)
        return ids, kept

    @staticmethod
    def _loaded(base_by_expert, s, valid, fixed, union=True):
        """Each step's loaded set S, the union of its valid tokens' base sets (a fixed token's whole native
        top-K), as [T, E] bool by expert (every token's row the same); `union=False`: each token's own
        contribution ([T, E])."""
        members = base_by_expert & valid[..., None]  # [T, E]
        held = fixed_members(s, fixed, valid)
        if held is not None:  # a fixed row brings its whole native top-K
            members = torch.where(fixed[..., None], held, members)
        return members.any(dim=-2, keepdim=True).expand_as(members) if union else members
