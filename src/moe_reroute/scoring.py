"""Shared pieces of every policy: the model's scores and top-K, ranking, packing kept experts into K slots, weights.

T = tokens, E = experts, K = experts per token, S = steps. Every function takes one batch ([T, ...]
tensors) or S batches at once ([S, T, ...]; a batch-wide reduction is then one per step). Nothing here
synchronises with the host or makes a data-dependent shape, so policies built from it run inside CUDA
graphs and torch.compile(fullgraph=True).

Ranking rule (every policy, every backend): a token's ranks 1..K are the model's own top-K experts, in
the model's order; the other experts follow by the model's score, ties to the lower expert id. So a
policy at its no-op setting (`cap:k=K`, `oea:k0=K`, `budget >= E`) is exactly native routing.
`ties` says whose top-K that is: "model" (the model's `torch.topk`, whose order among equal scores
is the library's) or "lower-id" (equal scores to the lower expert id, the fused kernels' rule, which
is also deterministic across devices).

Fixed rows (the `fixed` mask of a policy call, e.g. an engine's prefill tokens): such a row keeps its
native top-K, ids and weights exactly as `native` returns them (`native_where_fixed`), and since those
experts are read anyway they belong to the batch's expert set (`fixed_members`), which the other rows
may then use. An invalid row is padding whatever `fixed` says.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .contract import RouterSpec, Routing

TIES = ("model", "lower-id")

# Budget's per-token gate mass is summed on this grid (in units of 1/BUDGET_GRID of a token's mass): integer
# sums are exact in any order, so every backend picks the same expert set.
BUDGET_GRID = 256


class Scored(NamedTuple):
    """One layer's scores for a batch.

    choice [T, E]: what the model ranks experts by (float32); -inf for experts it may never pick.
    gate [T, E]: non-negative gate mass; a token's weight for expert e is gate[e], divided by the sum over
      its kept experts when the model renormalises (for "topk_softmax": softmax over the kept).
    native_ids [T, K]: the model's top-K, in its order. native_w [T, K] float32: the model's weights.
    """

    choice: torch.Tensor
    gate: torch.Tensor
    native_ids: torch.Tensor
    native_w: torch.Tensor


def check_ties(ties: str) -> str:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    return ties


def grouped_choice(scores: torch.Tensor, spec: RouterSpec, ties: str = "model") -> torch.Tensor:
    """DeepSeek-V3 selection scores: score + bias, -inf outside each token's `topk_group` best groups.

    With ties="model" the same operations, in the same order, as transformers' DeepseekV3TopkRouter,
    so that top-K of the result gives its ids bit for bit; "lower-id" picks equal groups by lower id.
    """
    *rows, E = scores.shape
    bias = spec.e_score_correction_bias
    choice = scores if bias is None else scores + bias
    G = spec.n_group
    if G == 1 or spec.topk_group == G:
        return choice
    group_scores = choice.view(*rows, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    if ties == "model":
        group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    else:
        group_idx = torch.sort(group_scores, dim=-1, descending=True, stable=True)[1][..., : spec.topk_group]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(-1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(*rows, G, E // G).reshape(*rows, E)
    return choice.masked_fill(~score_mask.bool(), float("-inf"))  # [T, E]


def stable_topk(choice: torch.Tensor, K: int) -> torch.Tensor:
    """[T, K] ids of the K best, ties to the lower id."""
    return torch.sort(choice, dim=-1, descending=True, stable=True)[1][..., :K]


def native_topk(router_logits: torch.Tensor, spec: RouterSpec, ties: str = "model",
                probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's routing: (weights [T, K] float32, ids [T, K] int64).

    ties="model": the stock transformers routers' exact operations (bit for bit). "lower-id": the same
    weights, with equal scores ordered by lower expert id. probs: `softmax_probs(router_logits)` when the
    caller has it already (softmax scoring).
    """
    K = spec.top_k
    if spec.scoring == "softmax":  # Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral
        probs = softmax_probs(router_logits) if probs is None else probs
        if ties == "model":
            top, ids = torch.topk(probs, K, dim=-1)
        else:
            ids = stable_topk(router_logits.float(), K)  # softmax is monotone: rank by the exact logits
            top = probs.gather(-1, ids)
        if spec.renormalize:
            top /= top.sum(dim=-1, keepdim=True)
        return top, ids
    if spec.scoring == "topk_softmax":  # GPT-OSS: softmax in the logits' dtype
        if ties == "model":
            top, ids = torch.topk(router_logits, K, dim=-1)
        else:
            ids = stable_topk(router_logits.float(), K)
            top = router_logits.gather(-1, ids)
        return torch.softmax(top, dim=-1, dtype=top.dtype).float(), ids
    scores = router_logits.float().sigmoid()  # DeepSeek-V3
    if ties == "model":
        ids = torch.topk(grouped_choice(scores, spec), k=K, dim=-1, sorted=False)[1]
    else:
        ids = stable_topk(grouped_choice(scores, spec, ties), K)
    weights = scores.gather(-1, ids)
    if spec.renormalize:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * spec.routed_scaling_factor, ids


def softmax_probs(router_logits: torch.Tensor) -> torch.Tensor:
    """The softmax routers' probabilities, as they compute them: float32 softmax over E. [T, E]"""
    return torch.softmax(router_logits, dtype=torch.float, dim=-1)


def score(router_logits: torch.Tensor, spec: RouterSpec, ties: str = "model",
          native: tuple[torch.Tensor, torch.Tensor] | None = None) -> Scored:
    """The model's view of each expert (float32) and its own top-K (or `native`: an engine's (weights, ids))."""
    probs = softmax_probs(router_logits) if spec.scoring == "softmax" else None
    native_w, native_ids = native_topk(router_logits, spec, ties, probs) if native is None else native
    x = router_logits.float()
    if spec.scoring == "softmax":
        # rank by the logits: the same order as the probabilities, and exact on every device
        return Scored(x, probs, native_ids, native_w)
    if spec.scoring == "topk_softmax":
        return Scored(x, torch.exp(x - x.amax(dim=-1, keepdim=True)), native_ids, native_w)
    s = x.sigmoid()
    return Scored(grouped_choice(s, spec, ties), s, native_ids, native_w)


def scores(router_logits: torch.Tensor, spec: RouterSpec, ties: str = "model") -> tuple[torch.Tensor, torch.Tensor]:
    """(choice [T, E], gate [T, E]) of `score`."""
    s = score(router_logits, spec, ties)
    return s.choice, s.gate


def token_probs(choice: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Each token's distribution over the experts it may pick: gate mass normalised to sum to 1. [T, E]"""
    mass = torch.where(torch.isfinite(choice), gate, torch.zeros_like(gate))
    return mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)


def ranked_native(s: Scored) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's top-K by score, equal scores in the model's order: (ids, weights) [T, K]. (DeepSeek-V3's
    router returns its top-K unsorted; the others sorted, so this is their own order.)"""
    perm = torch.sort(s.choice.gather(-1, s.native_ids), dim=-1, descending=True, stable=True)[1]
    return s.native_ids.gather(-1, perm), s.native_w.gather(-1, perm)


def rank(choice: torch.Tensor, native_ids: torch.Tensor, ties: str = "model") -> torch.Tensor:
    """[T, E] expert ids of each token from best to worst: its native top-K (`native_ids`, from
    `ranked_native`) first in that order, then the rest by `choice`, ties to the lower id (the module's
    ranking rule). `ties` changes nothing here: it decided `native_ids` (or the engine did)."""
    order = torch.sort(choice, dim=-1, descending=True, stable=True)[1]  # [T, E]
    # with ties="lower-id" the library's own top-K is the head of this order, but an engine's `native`
    # top-K (its own ties) may not be: ranks 1..K are always `native_ids`
    K = native_ids.shape[-1]
    slot = torch.arange(K, device=choice.device).expand(native_ids.shape)
    pri = torch.full(choice.shape, K, dtype=torch.long, device=choice.device).scatter_(-1, native_ids, slot)
    perm = torch.sort(pri.gather(-1, order), dim=-1, stable=True)[1]
    return order.gather(-1, perm)


def order_key(choice: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """[T, E] integer keys that order each token's experts as the ranking rule orders the rest: by
    `choice`, equal scores to the lower id. All keys of a row are distinct, so `torch.topk` of them is
    exact (it orders equal values arbitrarily) and far cheaper than the stable sort it replaces.

    A float's bits read as sign and magnitude give its order as an integer (-0 = +0; -inf lowest, and
    garbage in, garbage out for NaN); the expert id fills the low bits. logits: the 16-bit (bfloat16 or
    float16) logits `choice` was cast from, if it was (softmax scoring): their bits make int32 keys.
    """
    E = choice.shape[-1]
    shift = max(E - 1, 1).bit_length()
    ids = (1 << shift) - 1 - torch.arange(E, device=choice.device)  # lower id: larger key
    if logits is not None and logits.dtype in (torch.bfloat16, torch.float16) and shift <= 15:
        bits = logits.view(torch.int16).to(torch.int32)
        mag = bits & 0x7FFF
        return torch.where(bits < 0, -mag, mag).bitwise_left_shift_(shift).bitwise_or_(ids.to(torch.int32))
    bits = choice.float().view(torch.int32).to(torch.int64)
    mag = bits & 0x7FFFFFFF
    return torch.where(bits < 0, -mag, mag).bitwise_left_shift_(shift).bitwise_or_(ids)


def pack(order: torch.Tensor, keep_sorted: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put each token's kept experts (at most K, in rank order) into K slots.

    Args:
      order: [T, E] expert ids from best to worst.
      keep_sorted: [T, E] bool, aligned with `order`; at least the first kept position must exist per row.
    Returns:
      ids [T, K] (unkept slots repeat the token's slot-0 expert) and keep [T, K] bool.
    """
    E = order.shape[-1]
    pos = torch.arange(E, device=order.device)
    key = torch.where(keep_sorted, -pos, -E - pos)  # kept first, each group in rank order
    top = torch.topk(key, K, dim=-1).indices  # [T, K]
    ids = order.gather(-1, top)
    keep = keep_sorted.gather(-1, top)
    return torch.where(keep, ids, ids[..., :1]), keep


def weights_for(
    gate: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, spec: RouterSpec, renormalize: bool
) -> torch.Tensor:
    """Gate weights of the kept slots (0 elsewhere), renormalised over the kept ones if asked. [T, K] float32"""
    w = gate.gather(-1, ids) * keep
    if renormalize or spec.scoring == "topk_softmax":
        eps = 1e-20 if spec.scoring == "sigmoid" else torch.finfo(w.dtype).tiny
        w = w / (w.sum(dim=-1, keepdim=True) + eps)
    if spec.routed_scaling_factor != 1.0:
        w = w * spec.routed_scaling_factor
    return w


def native_where_unchanged(
    s: Scored, ids: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights), with the model's own ids and weights (in its slot order) on every token that kept
    exactly its native top-K, so a policy that changes nothing returns native routing bit for bit,
    whatever the dtype. [T, K] each"""
    same_set = (torch.sort(ids, dim=-1)[0] == torch.sort(s.native_ids, dim=-1)[0]).all(dim=-1)
    same = (same_set & keep.all(dim=-1))[..., None]
    return torch.where(same, s.native_ids, ids), torch.where(same, s.native_w, weights)


def fixed_members(s: Scored, fixed: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | None:
    """[T, E] bool: the native top-K experts of each valid fixed row (False on every other row), the
    experts those rows load whatever the policy does; None when no row is fixed."""
    if fixed is None:
        return None
    members = torch.zeros_like(s.choice, dtype=torch.bool).scatter_(-1, s.native_ids, True)  # [T, E]
    return members & (fixed & valid)[..., None]


def native_where_fixed(
    s: Scored, ids: torch.Tensor, weights: torch.Tensor, fixed: torch.Tensor | None, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights) with the model's own ids and weights (or the engine's `native`, in its slot order) on
    every valid fixed row, so that those rows come back exactly native (padding rows are left to `finish`,
    whatever `fixed` says). [T, K] each"""
    if fixed is None:
        return ids, weights
    f = (fixed & valid)[..., None]
    return torch.where(f, s.native_ids, ids), torch.where(f, s.native_w, weights)


def sanitize(router_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Logits with invalid rows zeroed, so that their values (NaN, inf, stale CUDA-graph buffers) can never
    reach a batch-wide decision. [T, E]"""
    return torch.where(valid[..., None], router_logits, torch.zeros((), dtype=router_logits.dtype,
                                                                  device=router_logits.device))


def finish(ids: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, s: Scored | None = None) -> Routing:
    """Make padding rows harmless: all their slots point at one expert a real token already uses, weight 0.

    The anchor is slot 0 of the first valid row of each step, so padding never adds an expert. A step
    with no valid row has no such expert: its anchor is row 0's top-1 by the model's ranking (given `s`,
    the step's scores), the expert the fused kernels pick, so that every backend routes it alike.
    """
    first = valid.to(torch.int32).argmax(dim=-1)[..., None, None]  # [1, 1] ([S, 1, 1])
    anchor = ids.gather(-2, first)  # slot 0 of that row; indexing with a tensor would read it on the host
    if s is not None:
        top1 = ranked_native(s)[0][..., :1, :1]  # [1, 1]: row 0's rank 1
        anchor = torch.where(valid.any(dim=-1)[..., None, None], anchor, top1)
    ids = torch.where(valid[..., None], ids, anchor)
    weights = torch.where(valid[..., None], weights, torch.zeros_like(weights))
    return Routing(weights=weights.float(), ids=ids.long(), valid=valid)


def route_within_set(s: Scored, order: torch.Tensor, in_set: torch.Tensor, spec: RouterSpec, valid: torch.Tensor,
                     fixed: torch.Tensor | None, per_token: bool = False) -> Routing:
    """Each token's best K experts within one expert set per step, by its own ranking, with the model's
    weights over those (renormalised as the model does; the model's own where that is its native top-K);
    fixed rows native. A token's native top-K (ranks 1..K) may hold experts of weight 0 (fewer than K finite
    logits): they stay allowed, so that a set of every expert is native routing exactly.

    Args:
      order: [T, E] each token's ranking (`rank`). in_set: [E] bool ([S, E] for S steps); with
        `per_token`, [T, E] ([S, T, E]): the experts each token may use.
    """
    K, E = spec.top_k, spec.num_experts
    if not per_token:
        in_set = in_set[..., None, :]
    in_set = in_set.expand(order.shape)  # [T, E] by expert
    head = torch.arange(E, device=order.device) < K
    allowed = in_set.gather(-1, order) & (torch.isfinite(s.choice.gather(-1, order)) | head)  # [T, E], rank order
    keep = allowed & (allowed.cumsum(dim=-1) <= K)
    ids, kept = pack(order, keep, K)
    w = weights_for(s.gate, ids, kept, spec, spec.renormalize)
    ids, w = native_where_unchanged(s, ids, kept, w)
    return finish(*native_where_fixed(s, ids, w, fixed, valid), valid, s)
