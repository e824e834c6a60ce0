"""Metrics of a routing: pure functions of tensors, no host synchronisation (results stay tensors).

T = tokens, E = experts, K = slots per token, D = expert-parallel ranks, S = steps. Padding rows
(`Routing.valid` False) never count. A routing of S steps ([S, T, K], as a policy returns for
[S, T, E] logits) gives one value per step: [S] where one batch gives a 0-d tensor, [S, T] for [T].
"""

from __future__ import annotations

import torch

from .contract import RouterSpec, Routing
from .scoring import score


def _valid(routing: Routing) -> torch.Tensor:
    if routing.valid is None:
        return torch.ones(routing.ids.shape[:-1], dtype=torch.bool, device=routing.ids.device)
    return routing.valid


def expert_mask(routing: Routing, num_experts: int) -> torch.Tensor:
    """[T, E] bool: which experts each token computes (a weight-0 repeat adds nothing)."""
    ids = routing.ids
    if int(num_experts) < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    mask = torch.zeros(*ids.shape[:-1], num_experts, dtype=torch.bool, device=ids.device)
    try:
        return mask.scatter_(-1, ids.long(), True)
    except RuntimeError as e:  # on CPU torch checks the ids (no host synchronisation here to do it on a GPU)
        if "out of bounds" not in str(e):
            raise
        raise ValueError(f"the routing's ids reach past num_experts={num_experts} (expert ids are "
                         f"0..{num_experts - 1}); give the E of the model that routed it") from None


def used_experts(routing: Routing, num_experts: int) -> torch.Tensor:
    """[E] bool: the batch's expert set, over valid tokens ([S, E]: each step's)."""
    return (expert_mask(routing, num_experts) & _valid(routing)[..., None]).any(dim=-2)


def used_slots(routing: Routing, replicas, layer: int | None = None) -> torch.Tensor:
    """[P] bool: the physical expert slots the batch's valid tokens reach under redundant experts
    (`moe_reroute.replicas.Replicas`, row t of each step hashed to its replica as vLLM does); [S, P]."""
    slots = replicas.to_physical(routing.ids, layer)  # [..., T, K]
    mask = torch.zeros(*slots.shape[:-1], replicas.num_physical, dtype=torch.bool, device=slots.device)
    return (mask.scatter_(-1, slots, True) & _valid(routing)[..., None]).any(dim=-2)


def unique_experts(routing: Routing, num_experts: int) -> torch.Tensor:
    """U: distinct experts the batch's valid tokens activate (0-d int64 tensor; [S] for S steps)."""
    return used_experts(routing, num_experts).sum(dim=-1)


def experts_per_token(routing: Routing) -> torch.Tensor:
    """[T] int64: distinct experts each token computes (its kept experts). [S, T] for S steps."""
    ids = torch.sort(routing.ids, dim=-1).values
    return 1 + (ids[..., 1:] != ids[..., :-1]).sum(dim=-1)


def retained_mass(routing: Routing, router_logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """[T] float32: gate mass of each token's kept experts over the mass of its native top-K.

    1.0 means the token keeps as much router probability as the model's own routing. cap is at most 1.
    Policies that take experts outside a token's top-K may exceed it: budget, and OEA where the model
    does not rank by gate mass (DeepSeek-V3's correction bias picks the top-K, the unbiased score weighs them).
    """
    s = score(router_logits, spec)
    kept = (s.gate * expert_mask(routing, spec.num_experts)).sum(dim=-1)
    native = s.gate.gather(-1, s.native_ids).sum(dim=-1)
    return kept / native.clamp_min(torch.finfo(native.dtype).tiny)


def overlap_with_native(routing: Routing, native: Routing, num_experts: int) -> torch.Tensor:
    """[T] float32: share of each token's native experts that the policy still uses."""
    mine = expert_mask(routing, num_experts)
    theirs = expert_mask(native, num_experts)
    return (mine & theirs).sum(dim=-1).float() / theirs.sum(dim=-1).float()


def default_placement(num_experts: int, ranks: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[E] int64 rank of each expert when E experts are split over D ranks in contiguous blocks
    (`moe_reroute.placement.contiguous`: expert e on rank e*D//E)."""
    from .placement import contiguous

    return contiguous(num_experts, ranks, device)


def rank_unique(used: torch.Tensor, placement: torch.Tensor, ranks: int) -> torch.Tensor:
    """[..., D] int64: distinct experts on each rank, from a [..., E] bool mask of the experts in use
    (`used_experts`) and an [E] placement (rank of each expert, 0..D-1)."""
    if placement.dim() != 1 or placement.shape[0] != used.shape[-1]:
        raise ValueError(f"placement must have shape [E]=[{used.shape[-1]}], got {tuple(placement.shape)}")
    out = torch.zeros(*used.shape[:-1], ranks, dtype=torch.long, device=used.device)
    return out.scatter_add_(-1, placement.to(used.device, torch.long).expand(used.shape), used.long())


def unique_experts_per_rank(
    routing: Routing, num_experts: int, ranks: int, placement: torch.Tensor | None = None
) -> torch.Tensor:
    """[D] int64: distinct experts each rank must read under expert parallelism ([S, D] for S steps).

    placement: [E] rank of each expert; default contiguous blocks (expert e on rank e*D//E).
    """
    if placement is None:
        placement = default_placement(num_experts, ranks, routing.ids.device)
    elif tuple(placement.shape) != (num_experts,):
        raise ValueError(f"placement must have shape [E]=[{num_experts}], got {tuple(placement.shape)}")
    return rank_unique(used_experts(routing, num_experts), placement, ranks)  # [D] ([S, D])


def max_unique_per_rank(
    routing: Routing, num_experts: int, ranks: int, placement: torch.Tensor | None = None
) -> torch.Tensor:
    """The step time under expert parallelism follows the busiest rank: max over ranks of its U (0-d; [S])."""
    return unique_experts_per_rank(routing, num_experts, ranks, placement).amax(dim=-1)


def mean_unique_per_rank(
    routing: Routing, num_experts: int, ranks: int, placement: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over ranks of their U (float32, 0-d; [S]): U / D, each expert being on one rank. Its gap to
    `max_unique_per_rank` is what an uneven spread of the batch's experts over ranks costs."""
    return unique_experts_per_rank(routing, num_experts, ranks, placement).float().mean(dim=-1)


def summarize(
    routing: Routing, router_logits: torch.Tensor, spec: RouterSpec, native: Routing | None = None
) -> dict[str, float]:
    """Means over valid tokens of the metrics above, as Python floats (this one does synchronise); U is
    the mean over steps for a routing of S steps."""
    valid = _valid(routing)
    n = valid.sum().clamp_min(1)
    out = {
        "unique_experts": float(unique_experts(routing, spec.num_experts).float().mean()),
        "experts_per_token": float((experts_per_token(routing) * valid).sum() / n),
        "retained_mass": float((retained_mass(routing, router_logits, spec) * valid).sum() / n),
    }
    if native is not None:
        out["native_unique_experts"] = float(unique_experts(native, spec.num_experts).float().mean())
        out["overlap_with_native"] = float((overlap_with_native(routing, native, spec.num_experts) * valid).sum() / n)
    return out
