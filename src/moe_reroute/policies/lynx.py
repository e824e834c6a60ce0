"""`lynx`: Lynx's batch-wide expert selection (arXiv 2411.08982), as gt-nexs/lynx defines it in
`src/lynx/routing.py`, one `variant` per policy of its softmax entry `custom_routing_function`.

variant="quant" (its `quant`, `quant_optimized` and `quant_alphaA_betaB_optimized` policies), per layer and
batch (B = the step's valid rows):
1. Bucket: each token's logits relative to its best, q_e = ceil(alpha * (x_e - max x)), an integer <= 0;
   with beta, every q_e <= -beta becomes -beta (one bottom bucket).
2. Popularity: h_e = B ** q_e per token; an expert's batch score is the sum of h_e over the valid rows, in
   float64 (the peer sums in float32). With beta it is evaluated from the count c_l of rows in each bucket
   -l: Horner's rule from the bottom bucket up (pop = c_0 + (c_1 + (c_2 + ...) / B) / B), and h = 1 / B / B
   ... (l divisions), so that every backend computes the same value in any order of rows. Without beta the
   values are summed smallest first. Either way experts with the same contributions tie exactly.
3. Re-rank: each token scores q_e + (score_e - h_e) / B, its bucket first (the others' share is below 1,
   so it never crosses a bucket), then the popularity of the expert among the other tokens; it chooses
   its K best by that score, equal scores to the lower id (the peer's Triton kernels' argmax).
4. Keep set: every expert a valid, not fixed token chose, and every native expert of a valid fixed row.
5. Each token routes to its best K experts by the model's own ranking within the keep set (it holds at
   least the K it chose). Weights: the model's over those, renormalised when the model renormalises;
   when it does not, rescaled so that they sum to the token's native top-K weight (as Lynx does).

variant="quant_flatten_remove" (beta required): "quant", then every slot whose expert lies in the token's
bottom bucket (q = -beta) is given to the token's first expert: the peer replaces its id by the first id
and keeps its weight, so the first expert counts with the sum of those weights. Here the slot repeats the
first expert at weight 0 and its weight is added to the first slot's: the same MoE output.

variant="advanced_parametrized" (Lynx's confidence policy; alpha and beta mean an offset and a scale):
each valid, not fixed token keeps the first n of its native top-K, n = floor(c * K * beta) + alpha (slots
j < n), where c = (top - bottom) / (top + 1e-8), top and bottom the sums of its first K // 2 and remaining
native weights (float32, in slot order). The keep set is the union of those (and the fixed rows' native
experts); each token routes to its best K experts within it, with the softmax restricted to the keep set
as weights (renormalised over the K when the model renormalises). A token with nothing in the set keeps
its top-1 at weight 1 (the peer masks every expert there and takes an arbitrary top-K).
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
from .base import Policy, PolicyConfig, layer_values, per_layer

VARIANTS = ("quant", "quant_flatten_remove", "advanced_parametrized")
CONFIDENCE_EPS = 1e-8  # the peer's epsilon in its confidence score (`extract_important_graded`)


@dataclass(frozen=True)
class LynxConfig(PolicyConfig):
    """variant: which of Lynx's policies (see the module). For "quant" and "quant_flatten_remove":
    alpha: bucket resolution (buckets of 1/alpha in logit), > 0; beta: depth of the bottom bucket, a whole
    number >= 1 (every q <= -beta is -beta; None: no floor, Lynx's plain "quant"; required by
    "quant_flatten_remove"). For "advanced_parametrized": alpha, an offset added to each token's expert
    count (any finite number); beta, the scale of its confidence (>= 0, required). Each of alpha and beta
    may be given per layer or by batch size."""

    alpha: Any = per_layer()
    beta: Any = per_layer(None)
    variant: str = "quant"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"lynx variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        super().__post_init__()
        if self.variant != "quant" and any(v is None for v in layer_values(self.beta)):
            what = ("the bottom bucket it removes, q = -beta" if self.variant == "quant_flatten_remove"
                    else "the scale of the confidence, e.g. beta=0.5")
            raise ValueError(f"lynx variant={self.variant!r} needs beta ({what}); give beta=<number> "
                             "(for every layer and batch size)")

    def check(self, name: str, value: Any) -> None:
        if name == "variant":
            return
        if name == "beta" and value is None:
            return
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if self.variant == "advanced_parametrized":
            if not number or (name == "beta" and value < 0):
                want = "a number >= 0" if name == "beta" else "a finite number"
                raise ValueError(f"lynx {name} (variant='advanced_parametrized') must be {want}, got {value!r}")
        elif name == "alpha" and not (number and value > 0):
            raise ValueError(f"lynx alpha must be a positive number, got {value!r}")
        elif name == "beta" and not (number and value >= 1 and float(value).is_integer()):
            raise ValueError(f"lynx beta must be a positive number, a whole number of buckets (1, 2, 3, ...), "
                             f"got {value!r}")


class Lynx(Policy):
    name = "lynx"
    Config = LynxConfig
    has_kernel = True

    def check_fit(self, spec, config, layer) -> None:
        if spec.scoring == "sigmoid":
            raise ValueError("lynx buckets the raw logits of a softmax router; this model scores by sigmoid with "
                             "groups (DeepSeek-V3): use budget, oea, cap or sere")
        if self.config.variant == "advanced_parametrized" and spec.top_k == 1 and config.beta != 0:
            raise ValueError("lynx variant='advanced_parametrized' with K=1: the confidence of one expert is "
                             "-w / 1e-8 (its bottom half holds all its weight), so no token would keep an expert; "
                             "give beta=0 (alpha experts per token) or use variant='quant'")

    def no_kernel_for(self) -> str:
        c = self.config
        if c.variant == "advanced_parametrized":
            return ("lynx variant='advanced_parametrized' has no fused kernel (its counts floor a float32 confidence "
                    "of the weights, which a kernel's own exp could move by one ulp)")
        if any(v is None for v in layer_values(c.beta)):
            return "lynx without beta has no fused kernel (its popularity sums an unbounded number of buckets)"
        return ""

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None) -> Routing:
        K, E = spec.top_k, spec.num_experts
        variant = self.config.variant
        x = sanitize(router_logits, valid)
        s = score(x, spec, self.ties, native)
        nat, nat_w = ranked_native(s)  # [T, K], best first
        voters = valid if fixed is None else valid & ~fixed
        if variant == "advanced_parametrized":
            n = confident_count(nat_w, float(config.alpha), float(config.beta))  # [T]
            first = torch.arange(K, device=x.device) < n[..., None]  # [T, K]
            members = torch.zeros_like(s.choice, dtype=torch.bool).scatter_(-1, nat, first)
            level = None
        else:
            level, modified = popularity_scores(x, valid, config)
            chosen = torch.sort(modified, dim=-1, descending=True, stable=True)[1][..., :K]  # [T, K]
            members = torch.zeros_like(s.choice, dtype=torch.bool).scatter_(-1, chosen, True)
        members = members & voters[..., None]
        held = fixed_members(s, fixed, valid)
        if held is not None:
            members = members | held
        in_set = members.any(dim=-2, keepdim=True).expand_as(members)  # [T, E] by expert
        order = rank(s.choice, nat, self.ties)  # [T, E]
        # a token's native top-K (ranks 1..K) may hold experts of weight 0 (fewer than K finite logits): they
        # stay allowed, so that the no-op setting is native routing exactly
        head = torch.arange(E, device=order.device) < K
        ok = in_set.gather(-1, order) & (torch.isfinite(s.choice.gather(-1, order)) | head)  # [T, E], rank order
        ok[..., 0] |= ~ok.any(dim=-1)  # nothing allowed (padding, or an empty set): the token keeps its best
        keep = ok & (ok.cumsum(dim=-1) <= K)
        ids, kept = pack(order, keep, K)
        w = weights_for(s.gate, ids, kept, spec, True)
        if variant == "advanced_parametrized" and not spec.renormalize:  # the softmax over the keep set
            chosen_mass = (s.gate.gather(-1, ids) * kept).sum(dim=-1, keepdim=True)
            set_mass = (s.gate * in_set).sum(dim=-1, keepdim=True)
            w = w * chosen_mass / torch.maximum(set_mass, chosen_mass).clamp_min(torch.finfo(w.dtype).tiny)
        elif not spec.renormalize:  # Lynx keeps each token's native top-K mass
            w = w * s.native_w.sum(dim=-1, keepdim=True)
        if variant != "advanced_parametrized" or spec.renormalize:  # (else the set's softmax is never native)
            ids, w = native_where_unchanged(s, ids, kept, w)
        if variant == "quant_flatten_remove":
            ids, w = give_bottom_to_first(ids, w, level, int(config.beta))
        return finish(*native_where_fixed(s, ids, w, fixed, valid), valid, s)


def levels(x: torch.Tensor, alpha: float, beta: int | None) -> torch.Tensor:
    """[T, E] float32: each logit's bucket depth l = -q >= 0, q = ceil(alpha * (x - max x)), with every
    q <= -beta at -beta (beta given). x: [T, E] sanitized logits."""
    xf = x.float()
    raw = float(alpha) * (xf - xf.amax(dim=-1, keepdim=True))  # [T, E]
    depth = -torch.ceil(raw)
    if beta is None:
        return depth
    return torch.where(raw <= -float(beta), torch.full_like(raw, float(beta)), depth)


def popularity_scores(x: torch.Tensor, valid: torch.Tensor, config: LynxConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels [T, E], modified [T, E] float64): each token's re-ranking score q + (pop - h) / B."""
    beta = None if config.beta is None else int(config.beta)
    lv = levels(x, config.alpha, beta)  # [T, E]
    B = valid.sum(dim=-1, keepdim=True).clamp_min(1).double()[..., None]  # [1, 1]: valid rows of the step
    if beta is None:
        h = torch.pow(B, -lv.double())  # [T, E], float64
        h = torch.where(valid[..., None], h, torch.zeros_like(h))
        # summed in ascending order, so that two experts with the same values (in any rows) tie exactly
        pop = torch.sort(h, dim=-2)[0].sum(dim=-2, keepdim=True)  # [1, E]
    else:
        pop = None
        h = torch.ones_like(lv, dtype=torch.float64)  # [T, E]
        step = torch.ones_like(B)  # 1 / B ** l, by l divisions
        for depth in range(1, beta + 1):
            step = step / B
            h = torch.where(lv == depth, step, h)
        for depth in range(beta, -1, -1):  # Horner's rule, bottom bucket first
            c = ((lv == depth) & valid[..., None]).sum(dim=-2, keepdim=True).double()  # [1, E]
            pop = c if pop is None else pop / B + c
    return lv, -lv.double() + (pop - h) / B


def confident_count(nat_w: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """[T] float32: Lynx's n = floor(c * K * beta) + alpha (slot j is kept when j < n), c its confidence
    (top - bottom) / (top + 1e-8) over the native weights nat_w [T, K] (best first), summed in slot order."""
    K = nat_w.shape[-1]
    mid = K // 2
    top = torch.zeros_like(nat_w[..., 0])
    bottom = torch.zeros_like(nat_w[..., 0])
    for j in range(K):  # in slot order, so that every backend sums alike
        if j < mid:
            top = top + nat_w[..., j]
        else:
            bottom = bottom + nat_w[..., j]
    c = (top - bottom) / (top + CONFIDENCE_EPS)
    return torch.floor(c * float(K) * float(beta)) + float(alpha)


def give_bottom_to_first(ids: torch.Tensor, w: torch.Tensor, lv: torch.Tensor, beta: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots 1.. whose expert is in the token's bottom bucket (level beta) move their weight to slot 0 and
    repeat its expert at weight 0. ids, w: [T, K]; lv: [T, E] levels."""
    bottom = lv.gather(-1, ids) == beta  # [T, K]
    bottom[..., 0] = False
    moved = torch.where(bottom, w, torch.zeros_like(w))
    w = torch.where(bottom, torch.zeros_like(w), w)
    w = torch.cat([w[..., :1] + moved.sum(dim=-1, keepdim=True), w[..., 1:]], dim=-1)
    return torch.where(bottom, ids[..., :1], ids), w
