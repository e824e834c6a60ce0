"""Shared pieces of every policy: the model's scores, ranking, packing kept experts into K slots, weights.

T = tokens, E = experts, K = experts per token. Nothing here synchronises with the host or makes a
data-dependent shape, so policies built from it run inside CUDA graphs and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import torch

from .contract import RouterSpec, Routing


def grouped_choice(scores: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """DeepSeek-V3 selection scores: score + bias, -inf outside each token's `topk_group` best groups.

    The same operations, in the same order, as transformers' DeepseekV3TopkRouter, so that top-K of
    the result gives its ids bit for bit.
    """
    T, E = scores.shape
    bias = spec.e_score_correction_bias
    choice = scores if bias is None else scores + bias
    G = spec.n_group
    group_scores = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
    return choice.masked_fill(~score_mask.bool(), float("-inf"))  # [T, E]


def scores(router_logits: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's view of each expert, in float32.

    Returns:
      choice [T, E]: what the model ranks experts by; -inf for experts it may never pick for that token.
      gate [T, E]: non-negative gate mass; a token's weight for expert e is gate[e], divided by the sum
        over its kept experts when the model renormalises (for "topk_softmax" this is softmax over the kept).
    """
    x = router_logits.float()
    if spec.scoring == "softmax":
        probs = torch.softmax(x, dim=-1)
        return probs, probs
    if spec.scoring == "topk_softmax":
        return x, torch.exp(x - x.amax(dim=-1, keepdim=True))
    s = x.sigmoid()
    return grouped_choice(s, spec), s


def token_probs(choice: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Each token's distribution over the experts it may pick: gate mass normalised to sum to 1. [T, E]"""
    mass = torch.where(torch.isfinite(choice), gate, torch.zeros_like(gate))
    return mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)


def rank(choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts of each token from best to worst; ties go to the lower expert id. Returns (values, order) [T, E]."""
    return torch.sort(choice, dim=-1, descending=True, stable=True)


def pack(order: torch.Tensor, keep_sorted: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put each token's kept experts (at most K, in rank order) into K slots.

    Args:
      order: [T, E] expert ids from best to worst.
      keep_sorted: [T, E] bool, aligned with `order`; at least the first kept position must exist per row.
    Returns:
      ids [T, K] (unkept slots repeat the token's slot-0 expert) and keep [T, K] bool.
    """
    E = order.shape[1]
    pos = torch.arange(E, device=order.device)
    key = torch.where(keep_sorted, -pos, -E - pos)  # kept first, each group in rank order
    top = torch.topk(key, K, dim=-1).indices  # [T, K]
    ids = order.gather(1, top)
    keep = keep_sorted.gather(1, top)
    return torch.where(keep, ids, ids[:, :1]), keep


def weights_for(
    gate: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, spec: RouterSpec, renormalize: bool
) -> torch.Tensor:
    """Gate weights of the kept slots (0 elsewhere), renormalised over the kept ones if asked. [T, K] float32"""
    w = gate.gather(1, ids) * keep
    if renormalize or spec.scoring == "topk_softmax":
        eps = 1e-20 if spec.scoring == "sigmoid" else torch.finfo(w.dtype).tiny
        w = w / (w.sum(dim=-1, keepdim=True) + eps)
    if spec.routed_scaling_factor != 1.0:
        w = w * spec.routed_scaling_factor
    return w


def finish(ids: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor) -> Routing:
    """Make padding rows harmless: all their slots point at one expert a real token already uses, weight 0.

    The anchor is slot 0 of the first valid row (row 0 if none is valid), so padding never adds an expert.
    """
    first = valid.to(torch.int32).argmax().view(1, 1)
    anchor = ids.gather(0, first)  # [1, 1]; indexing with a tensor would read it on the host
    ids = torch.where(valid[:, None], ids, anchor)
    weights = torch.where(valid[:, None], weights, torch.zeros_like(weights))
    return Routing(weights=weights.float(), ids=ids.long(), valid=valid)
