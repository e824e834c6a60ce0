"""Expert-parallel-aware options shared by `oea` and `budget`: `ep`, `placement`, `rank_cap`.

Under expert parallelism over D ranks a step waits for its slowest rank, which reads its own distinct
experts; so these options choose the batch's expert set under a cap on experts per rank rather than
letting one rank collect many. `ep=D` turns them on (default None: off, the policy as without them, bit
for bit); `placement` says which rank holds each expert: "contiguous" (default: expert e on rank e*D//E),
a placement file's path (`moe_reroute.placement`: one rank per expert, or one such list per MoE layer)
or the same as a list or tensor; `rank_cap` is the most experts a rank may hold (default: each policy's
own, see its module).

Redundant experts (EPLB): `placement` may also be a `moe_reroute.replicas.Replicas` or a file holding
`{"ranks": D, "physical_to_logical": [...]}`. A logical expert then has replicas on several ranks, and
the replica row t reaches is fixed by vLLM's hash of t; so the set is chosen over physical slots: each
token's experts are mapped to the slots it would reach (`Replicas.token_slots`), the keys, forced and
allowed experts are summed per slot, the cap counts slots per rank (and `budget`'s total counts slots),
and a token may then use a logical expert only if the slot it reaches is in the set.

The set is picked greedily in order of a key (higher first; equal keys: lower expert id): a forced expert
(each token's best one, a fixed row's native experts) is always taken; any other is taken while its
rank holds fewer than the cap and, where the policy has one, the set is below its total. Torch ops on
[..., E] tensors (a stable sort and per-rank counts), no host synchronisation. The fused kernels implement
it over one slot per expert (`_rank_capped` in `moe_reroute.kernels.triton_route`, the same greedy pick as
counts); over replicas a policy runs as torch ops, with one warning where it would have used the kernels.

E = experts, D = ranks, T = tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from ..placement import at_layer, check_placement, check_ranks, contiguous, from_lists
from ..replicas import Replicas
from .base import is_int


# what check_ep_fields sets on a config beside its fields (its `DERIVED`)
EP_DERIVED = ("_engine", "_placement_on", "_placement")


def check_ep_fields(config: Any, policy: str) -> None:
    """Validate `ep`, `placement`, `rank_cap` of a config (at construction) and keep the placement as an
    int64 tensor in `config._placement` (None: contiguous, made for the layer's E by `layer_placement`)."""
    ep, placement, cap = config.ep, config.placement, config.rank_cap
    object.__setattr__(config, "_engine", isinstance(placement, str) and placement == ENGINE)
    # layer_placement's cache, made here so that the per-layer copies `at_layer` makes (shallow) share it
    object.__setattr__(config, "_placement_on", {})
    if ep is None:
        if placement is not None or cap is not None:
            raise ValueError(f"{policy} placement and rank_cap apply under expert parallelism: give ep=D (the number "
                             f"of ranks) too, e.g. {policy}:...,ep=8,placement=FILE")
        object.__setattr__(config, "_placement", None)
        return
    if not is_int(ep) or ep < 1:
        raise ValueError(f"{policy} ep must be the number of expert-parallel ranks, an int >= 1, got {ep!r}")
    if cap is not None and (not is_int(cap) or cap < 1):
        raise ValueError(f"{policy} rank_cap must be an int >= 1 (experts per rank), got {cap!r}")
    tensor = None
    if config._engine:
        object.__setattr__(config, "_placement", None)
        return
    if isinstance(placement, str) and placement != "contiguous":
        from ..placement import read_placement_json

        placement = read_placement_json(placement, f"{policy} placement {placement}")
    if isinstance(placement, dict):
        from ..replicas import parse_replicas

        placement = parse_replicas(placement, None, f"{policy} placement" + (
            f" {config.placement}" if isinstance(config.placement, str) else ""))
    if isinstance(placement, Replicas):
        if placement.ranks != ep:
            where = placement.origin if placement.origin.startswith(policy) else f"{policy} placement {placement.origin}"
            raise ValueError(f"{where} spreads its slots over {placement.ranks} ranks, but ep={ep}; give "
                             f"ep={placement.ranks}")
        object.__setattr__(config, "_placement", placement)
        return
    if placement is not None and not (isinstance(placement, str) and placement == "contiguous"):
        origin = f"{policy} placement" + (f" {config.placement}" if isinstance(config.placement, str) else "")
        if not isinstance(placement, torch.Tensor):
            placement = from_lists(placement, origin)
        if placement.dim() not in (1, 2):
            raise ValueError(f"{origin}: a placement is [E] (one rank per expert) or [L, E] (one per MoE layer), "
                             f"got {tuple(placement.shape)}")
        tensor = check_placement(placement, placement.shape[-1], ep, origin=origin)
    object.__setattr__(config, "_placement", tensor)


ENGINE = "engine"
ENGINE_ONLY = ("placement=engine takes the placement of the engine the policy runs in, which an engine plugin "
               "fills in when the engine runs expert parallelism itself (vLLM: enable_expert_parallel=True over "
               "more than one rank); elsewhere give placement=contiguous or a placement file")


def engine_policy(policy: Any, placement: torch.Tensor | None, ranks: int | None, origin: str = "the engine") -> Any:
    """`policy` with `placement=engine` replaced by the engine's own [E] (or [L, E]) placement over `ranks`
    (None, None: the engine does not run EP). A policy without EP options, or with its own placement,
    comes back as it is, once its `ep` is checked against the engine's ranks. ValueError saying what to
    change when `ep` names another number of ranks than the engine has, or `placement=engine` has no
    engine placement to take."""
    import dataclasses

    config = getattr(policy, "config", None)
    ep = getattr(config, "ep", None)
    if ep is None:
        return policy
    if ranks is not None and ep != ranks:
        raise ValueError(f"{policy.name} ep={ep} names {ep} expert-parallel ranks, but {origin} runs expert "
                         f"parallelism over {ranks}; give ep={ranks}")
    if not getattr(config, "_engine", False):
        return policy
    if placement is None:
        raise ValueError(f"{policy.name}: {ENGINE_ONLY}")
    resolved = dataclasses.replace(config, placement=placement)
    return type(policy)(resolved, check_inputs=policy.check_inputs, ties=policy.ties, backend=policy.backend)


def check_ep_fit(config: Any, num_experts: int, policy: str, layer: int | None) -> None:
    """Raise ValueError if the EP options do not fit a layer of E experts."""
    if config.ep is None:
        return
    if getattr(config, "_engine", False):
        raise ValueError(f"{policy}: {ENGINE_ONLY}")
    p = config._placement
    if isinstance(p, Replicas):
        p.check_fits(num_experts, config.ep)
        if p.per_layer:
            p.at(layer, p.logical_to_physical.device)
        return
    check_ranks(num_experts, config.ep)
    if p is not None:
        if p.shape[-1] != num_experts:
            raise ValueError(f"{policy} placement places {p.shape[-1]} experts but the model has E={num_experts}; "
                             "give a rank for every expert")
        at_layer(p, layer)


def layer_placement(config: Any, num_experts: int, layer: int | None, device: torch.device) -> torch.Tensor:
    """[E] int64 rank of each expert at MoE layer `layer`, on `device`: made once per device and layer and
    cached with the config, so a call inside a CUDA graph copies and allocates nothing."""
    p = config._placement
    key = (str(device), num_experts, layer if p is not None and p.dim() == 2 else None)
    cache = config._placement_on  # made by check_ep_fields (torch 2.11's dynamo cannot read __dict__)
    hit = cache.get(key)
    if hit is None:
        hit = contiguous(num_experts, config.ep, device) if p is None else at_layer(p, layer).to(device)
        cache[key] = hit
    return hit


def replicas_of(config: Any) -> Replicas | None:
    """The config's redundant-expert placement, or None (one rank per expert)."""
    p = config._placement
    return p if isinstance(p, Replicas) else None


def slot_view(replicas: Replicas, layer: int | None, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots [T, E]: the physical slot each row reaches for each logical expert; [P] rank of each slot)."""
    return replicas.token_slots(rows, layer, device), replicas.slot_ranks(device)


def per_slot(values: torch.Tensor, index: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Sum [..., T, N] `values` (bool: any) into [..., P] at slots `index` ([T, N] or [..., T, N])."""
    index = index.expand(values.shape)
    out = torch.zeros(*values.shape[:-2], num_slots, dtype=torch.long if values.dtype == torch.bool else values.dtype,
                      device=values.device)
    out.scatter_add_(-1, index.flatten(-2), values.flatten(-2).to(out.dtype))
    return out > 0 if values.dtype == torch.bool else out


def by_token(in_slots: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[..., P] bool per step -> [..., T, E] bool: whether the slot row t reaches for expert e is in the set."""
    flat = slots.flatten()  # [T * E]
    return in_slots[..., flat].view(*in_slots.shape[:-1], *slots.shape)


def rank_capped_set(key: torch.Tensor, forced: torch.Tensor, placement: torch.Tensor, ranks: int,
                    cap: int | torch.Tensor, allowed: torch.Tensor | None = None,
                    total: int | None = None) -> torch.Tensor:
    """[..., E] bool: the experts taken greedily by decreasing `key` (equal keys: lower id): a `forced`
    expert always; another if `allowed` (default: every one), while its rank has fewer than `cap` taken
    or forced before it and, with `total`, while fewer than `total` are taken.

    key [..., E] int64 (forced experts should carry the largest); forced, allowed [..., E] bool;
    placement [E] ranks 0..D-1; cap an int or a [..., 1] tensor.
    """
    E = key.shape[-1]
    order = torch.sort(key, dim=-1, descending=True, stable=True)[1]  # [..., E]
    r = placement[order]  # [..., E] rank of each expert, in key order
    # position of each expert among its rank's experts in key order (1-based): a stable sort by rank keeps
    # key order within a rank; the index in that sort minus where the rank starts
    by_rank = torch.sort(r, dim=-1, stable=True)[1]  # [..., E]
    counts = torch.zeros(*r.shape[:-1], ranks, dtype=torch.long, device=r.device).scatter_add_(
        -1, r, torch.ones_like(r))  # [..., D]
    starts = counts.cumsum(dim=-1) - counts  # [..., D]
    idx = torch.arange(E, device=r.device).expand(r.shape)
    pos_sorted = idx - starts.gather(-1, r.gather(-1, by_rank)) + 1
    pos = torch.empty_like(pos_sorted).scatter_(-1, by_rank, pos_sorted)  # [..., E], key order
    f = forced.gather(-1, order)
    eligible = f | (pos <= cap)
    if allowed is not None:
        eligible = eligible & (f | allowed.gather(-1, order))
    take = eligible if total is None else f | (eligible & (eligible.cumsum(dim=-1) <= total))
    return torch.zeros_like(take).scatter_(-1, order, take)
