"""`lynx`: Lynx's bucketed, popularity-re-ranked expert selection (arXiv 2411.08982), as gt-nexs/lynx
defines it in `src/lynx/routing.py` (its "quant" policies: `quant`, `quant_optimized` and the
`quant_alphaA_betaB_optimized` family, which fix alpha and beta).

Per layer and batch (B = the step's valid rows):
1. Bucket: each token's logits relative to its best, q_e = ceil(alpha * (x_e - max x)), an integer <= 0;
   with beta, every q_e <= -beta becomes -beta (one bottom bucket).
2. Popularity: h_e = B ** q_e per token; an expert's batch score is the sum of h_e over the valid rows
   (in float64, smallest first, so that equal contributions tie exactly; the peer sums in float32).
3. Re-rank: each token scores q_e + (score_e - h_e) / B, its bucket first (the others' share is below 1,
   so it never crosses a bucket), then the popularity of the expert among the other tokens; it chooses
   its K best by that score, equal scores to the lower id (the peer's Triton kernels' argmax).
4. Keep set: every expert a valid, not fixed token chose, and every native expert of a valid fixed row.
5. Each token routes to its best K experts by the model's own ranking within the keep set (it holds at
   least the K it chose). Weights: the model's over those, renormalised when the model renormalises;
   when it does not, rescaled so that they sum to the token's native top-K weight (as Lynx does).
Scoring: "softmax" and "topk_softmax" (Lynx buckets raw logits of softmax routers); not sigmoid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..contract import Routing
from ..scoring import (finish, fixed_members, native_where_fixed, native_where_unchanged, pack, rank, ranked_native,
                       sanitize, score, weights_for)
from .base import Policy, PolicyConfig, per_layer


@dataclass(frozen=True)
class LynxConfig(PolicyConfig):
    """alpha: bucket resolution (buckets of 1/alpha in logit), > 0. beta: depth of the bottom bucket
    (every q <= -beta is -beta; None: no floor, Lynx's plain "quant"). Each may be given per layer."""

    alpha: Any = per_layer()
    beta: Any = per_layer(None)

    def check(self, name: str, value: Any) -> None:
        if name == "beta" and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"lynx {name} must be a positive number, got {value!r}")


class Lynx(Policy):
    name = "lynx"
    Config = LynxConfig
    has_kernel = False

    def check_fit(self, spec, config, layer) -> None:
        if spec.scoring == "sigmoid":
            raise ValueError("lynx buckets the raw logits of a softmax router; this model scores by sigmoid with "
                             "groups (DeepSeek-V3): use budget, oea, cap or sere")

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None) -> Routing:
        K, E = spec.top_k, spec.num_experts
        x = sanitize(router_logits, valid)
        s = score(x, spec, self.ties, native)
        xf = x.float()
        q = float(config.alpha) * (xf - xf.amax(dim=-1, keepdim=True))  # [T, E]
        if config.beta is None:
            q = torch.ceil(q)
        else:
            q = torch.where(q <= -float(config.beta), torch.full_like(q, -float(config.beta)), torch.ceil(q))
        B = valid.sum(dim=-1, keepdim=True).clamp_min(1).double()[..., None]  # [1, 1]: valid rows of the step
        h = torch.pow(B, q.double())  # [T, E], float64: B ** q exactly where representable
        h = torch.where(valid[..., None], h, torch.zeros_like(h))
        # summed in ascending order, so that two experts with the same values (in any rows) tie exactly
        pop = torch.sort(h, dim=-2)[0].sum(dim=-2, keepdim=True)  # [1, E]
        modified = q.double() + (pop - h) / B
        chosen = torch.sort(modified, dim=-1, descending=True, stable=True)[1][..., :K]  # [T, K]
        voters = valid if fixed is None else valid & ~fixed
        members = torch.zeros_like(s.choice, dtype=torch.bool).scatter_(-1, chosen, True) & voters[..., None]
        held = fixed_members(s, fixed, valid)
        if held is not None:
            members = members | held
        in_set = members.any(dim=-2, keepdim=True).expand_as(members)  # [T, E] by expert
        order = rank(s.choice, ranked_native(s)[0], self.ties)  # [T, E]
        # a token's native top-K (ranks 1..K) may hold experts of weight 0 (fewer than K finite logits): they
        # stay allowed, so that the no-op setting is native routing exactly
        head = torch.arange(E, device=order.device) < K
        ok = in_set.gather(-1, order) & (torch.isfinite(s.choice.gather(-1, order)) | head)  # [T, E], rank order
        ok[..., 0] |= ~ok.any(dim=-1)  # no valid row in the step: padding keeps its best, for `pack`
        keep = ok & (ok.cumsum(dim=-1) <= K)
        ids, kept = pack(order, keep, K)
        if spec.renormalize:
            w = weights_for(s.gate, ids, kept, spec, True)
        else:  # Lynx keeps each token's native top-K mass
            w = weights_for(s.gate, ids, kept, spec, True) * s.native_w.sum(dim=-1, keepdim=True)
        ids, w = native_where_unchanged(s, ids, kept, w)
        return finish(*native_where_fixed(s, ids, w, fixed, valid), valid, s)
