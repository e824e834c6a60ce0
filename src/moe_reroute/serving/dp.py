"""A cross-rank view under data-parallel attention: every DP rank routes the union of the ranks' decode
tokens, and keeps its own rows.

Under DP attention each rank runs its own requests, and vLLM routes each rank's tokens before it
dispatches them to the expert-parallel ranks (`MoEPrepareAndFinalizeNaiveDPEPModular.prepare` all-gathers
the top-K ids, not the router logits), so a batch-aware policy sees one rank's batch while the experts
serve the union of every rank's. With `dp_view="gather"` the plugin all-gathers the step's router logits
(and the rows' validity, their fixed-row mask and the engine's native top-K) over the DP group, routes that
whole batch with the policy, and keeps its own rows: every rank computes the same routing of the union, as
one engine serving the whole batch would. At decode the gather is small: [B, E] logits per MoE layer.

The ranks' row counts may differ (each rank its own requests): rows are padded to the largest count,
gathered in one collective of equal shapes, and the padding dropped. `gather(x)` is the group's
all-gather along dim 0 of tensors of equal shape on every rank (vLLM's `get_dp_group().all_gather`, or
`torch.distributed.all_gather` concatenated).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..contract import Routing

Gather = Callable[[torch.Tensor], torch.Tensor]
DP_VIEWS = ("local", "gather")


def gather_rows(x: torch.Tensor, sizes: list[int], gather: Gather) -> torch.Tensor:
    """Every rank's rows of `x` ([T_r, ...] on rank r, T_r = sizes[r]) concatenated in rank order:
    [sum(sizes), ...]. Bool tensors travel as uint8 (not every backend gathers bool)."""
    m = max(sizes)
    dtype = x.dtype
    y = x.to(torch.uint8) if dtype == torch.bool else x
    if y.shape[0] < m:
        y = torch.cat([y, y.new_zeros((m - y.shape[0],) + tuple(y.shape[1:]))])
    g = gather(y.contiguous())  # [R * m, ...]
    R = len(sizes)
    if g.shape[0] != R * m:
        raise RuntimeError(f"moe-reroute: the DP all-gather returned {g.shape[0]} rows, expected {R} ranks x {m}")
    g = g.view(R, m, *y.shape[1:])
    if any(s != m for s in sizes):
        out = torch.cat([g[r, : sizes[r]] for r in range(R)])
    else:
        out = g.reshape(R * m, *y.shape[1:])
    return out.to(torch.bool) if dtype == torch.bool else out


def route_across_ranks(policy: Any, router_logits: torch.Tensor, spec: Any, rank: int, sizes: list[int],
                       gather: Gather, valid: torch.Tensor | None = None, fixed: torch.Tensor | None = None,
                       native: tuple[torch.Tensor, torch.Tensor] | None = None,
                       layer: int | None = None) -> tuple[Routing, Routing, torch.Tensor, torch.Tensor,
                                                          torch.Tensor | None]:
    """Route every DP rank's rows as one batch; this rank's rows of it.

    Args:
      router_logits: [T, E] this rank's rows (T = sizes[rank]). valid, fixed: [T] bool or None (None: every
        row valid / none fixed). native: this rank's (weights [T, K], ids [T, K]) or None; every rank must
        pass the same kinds of arguments (all None or all given), as the collectives are matched.
      sizes: every rank's T, in rank order, the same list on every rank.
    Returns:
      (this rank's [T, K] routing, the whole batch's: [N, K] routing, [N, E] logits, [N] valid rows, [N] fixed
      rows or None), N = sum(sizes), rows in rank order.
    """
    T = router_logits.shape[0]
    if not 0 <= rank < len(sizes) or sizes[rank] != T:
        raise ValueError(f"moe-reroute: DP rank {rank} holds {T} rows, but the ranks' row counts are {sizes}")
    device = router_logits.device
    v = torch.ones(T, dtype=torch.bool, device=device) if valid is None else valid.to(torch.bool)
    if sum(sizes) == 0:  # no rank holds a row (every rank knows it from `sizes`): nothing to gather or route
        K = spec.top_k
        empty = Routing(router_logits.new_zeros((0, K), dtype=torch.float32),
                        torch.zeros((0, K), dtype=torch.int64, device=device), v)
        return empty, empty, router_logits, v, None if fixed is None else fixed.to(torch.bool)
    logits = gather_rows(router_logits, sizes, gather)  # [N, E]
    v_all = gather_rows(v, sizes, gather)  # [N]
    f_all = None if fixed is None else gather_rows(fixed.to(torch.bool), sizes, gather)
    n_all = None
    if native is not None:
        n_all = (gather_rows(native[0].float(), sizes, gather), gather_rows(native[1].long(), sizes, gather))
    whole = policy(logits, spec, v_all, layer=layer, native=n_all, fixed=f_all)
    lo = sum(sizes[:rank])
    own = Routing(whole.weights[lo: lo + T], whole.ids[lo: lo + T],
                  None if whole.valid is None else whole.valid[lo: lo + T])
    return own, whole, logits, v_all, f_all


def torch_gather(group: Any = None) -> Gather:
    """`gather` over a torch.distributed process group (the default group when None)."""
    import torch.distributed as dist

    def gather(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)

    return gather


def gather_sizes(T: int, device: torch.device | str, gather: Gather) -> list[int]:
    """Every rank's row count, by an all-gather of one integer."""
    return [int(n) for n in gather(torch.tensor([T], dtype=torch.int64, device=device)).tolist()]
