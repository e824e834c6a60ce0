"""A routing whose every row names K distinct experts, for engines whose MoE kernels need that.

The contract fills a slot a policy dropped by repeating an expert the token already uses, with weight 0
(`Routing`). Some engines' MoE paths assume distinct ids per row: SGLang's native MoE
(`moe_forward_native`, used on CPU) counts tokens per expert with `scatter_(1, topk_ids, 1)`, which sets
rather than adds, so a repeated id breaks the shapes it computes. `distinct_ids` rewrites each repeated
slot to an expert the row does not use, with weight 0, choosing first among the experts the batch has
loaded already (the experts of its valid rows), so U, the experts the batch activates, does not grow.
The output of the layer is unchanged: a weight-0 slot adds nothing, and the weights of repeated slots
are summed onto the first slot naming that expert.

U grows only when the batch's loaded experts are too few to fill a row (fewer than K of them, e.g.
`cap:k=1` with every token on one expert): then the lowest-numbered experts not loaded fill the rest.
"""

from __future__ import annotations

import torch

from ..contract import Routing


def has_repeats(ids: torch.Tensor) -> torch.Tensor:
    """[..., T] bool: rows of `ids` [..., T, K] that name an expert more than once."""
    s = torch.sort(ids, dim=-1).values
    return (s[..., 1:] == s[..., :-1]).any(dim=-1)


def distinct_ids(routing: Routing, num_experts: int) -> Routing:
    """`routing` with K distinct experts in every row (see the module's docstring); [T, K] or [S, T, K].

    Rows that are distinct already come back unchanged (ids and weights equal). Slots keep their order;
    a repeated slot takes the lowest-numbered expert loaded by the batch (or step, for [S, T, K]) that its
    row does not use yet, else the lowest-numbered expert its row does not use. Tensor ops only, whatever
    the rows hold: asking whether any row repeats would wait for the device, which a CUDA-graph capture
    refuses (SGLang captures its decode steps with the plugin inside).
    """
    ids, weights = routing.ids, routing.weights
    K = ids.shape[-1]
    if K > num_experts:
        raise ValueError(f"distinct_ids: K={K} slots cannot name distinct experts out of E={num_experts}")
    if K == 1:
        return routing
    T = ids.shape[-2]
    i = ids.reshape(-1, T, K).long()  # [B, T, K]
    w = weights.reshape(-1, T, K)
    B = i.shape[0]
    valid = routing.valid
    v = (torch.ones(B, T, dtype=torch.bool, device=i.device) if valid is None
         else valid.reshape(-1, T).expand(B, T).to(torch.bool))  # [B, T]
    eq = i[..., :, None] == i[..., None, :]  # [B, T, K, K]: slot a names slot b's expert
    earlier = torch.ones(K, K, dtype=torch.bool, device=i.device).tril(-1)  # [K, K]: b < a
    repeat = (eq & earlier).any(dim=-1)  # [B, T, K]: an earlier slot names this expert
    # each first slot of an expert carries the weight of every slot naming it
    merged = torch.where(repeat, torch.zeros_like(w), (eq.to(w.dtype) * w[..., None, :]).sum(dim=-1))
    E = num_experts
    in_row = torch.zeros(B, T, E, dtype=torch.bool, device=i.device).scatter_(-1, i, True)  # [B, T, E]
    loaded = (in_row & v[..., None]).any(dim=1, keepdim=True)  # [B, 1, E]
    expert = torch.arange(E, device=i.device)
    # preference: loaded experts first, by id, then the others; experts the row uses last of all
    order = expert + E * (~loaded).long() + 2 * E * in_row.long()  # [B, T, E]
    candidates = torch.argsort(order, dim=-1, stable=True)[..., :K]  # [B, T, K]
    nth = (torch.cumsum(repeat.long(), dim=-1) - 1).clamp_min(0)  # [B, T, K]: n-th repeated slot of its row
    new_ids = torch.where(repeat, candidates.gather(-1, nth), i)
    return Routing(merged.reshape(weights.shape), new_ids.to(ids.dtype).reshape(ids.shape), routing.valid)
