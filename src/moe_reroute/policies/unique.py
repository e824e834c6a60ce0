"""U without the routing, for policies whose batch uses exactly the experts of each valid token's first n
ranks and each valid fixed token's native top-K (`native`: n = K; `cap`: n = k; `oea`: its base, whose
union is the loaded set that piggybacking never leaves).

T = tokens, E = experts, K = experts per token, S = steps, N = rows counted the slow way, n = ranks.

A token's first n ranks (the ranking rule of `moe_reroute.scoring`: its native top-K first, in the
model's order) are its n best logits whenever the n-th best is strictly above the (n+1)-th: then no
ties rule can order them otherwise. One top-k of the logits gives those; with ties="model" and softmax
scoring the native top-K is picked by float32 probabilities, which rounding may tie where the logits
differ, so the n best must also lead the (K+1)-th best by MARGIN (exp keeps that order with room to
spare) and lie within SPAN of the row's best (their probabilities are normal floats, not underflowed).
Every other valid row (ties at the boundary, non-finite values, a fixed row, sigmoid scoring, p < 1)
is ranked by the policies' own functions on just those rows (each row is computed independently).
"""

from __future__ import annotations

import torch

from ..contract import RouterSpec
from ..kernels import cpu_top
from ..scoring import rank, ranked_native, score, token_probs

MARGIN = 2.0 ** -7  # logits; exp(MARGIN) - 1 > 0.0078, float32 softmax errs by ~1e-6 relative
SPAN = 60.0  # exp(-60) / E is a normal float32 for any E <= 2**20


def head_union(router_logits: torch.Tensor, spec: RouterSpec, valid: torch.Tensor, ties: str, n: int,
               p: float = 1.0, fixed: torch.Tensor | None = None, full_rank: bool = False) -> torch.Tensor:
    """U of each step when every valid row uses exactly its first n ranks (with p < 1, the first
    min(n, t) with t the fewest whose probability reaches p, as oea's base) and every valid fixed row
    its native top-K.

    Args:
      router_logits: [T, E] or [S, T, E], checked. valid, fixed: [T] or [S, T] bool (fixed may be None).
      full_rank: p < 1 sums the probabilities over the whole ranking (oea with max_rank < E) rather than
        over the native top-K, as the policy does (the same sums on CPU).
    Returns:
      0-d int64 for [T, E], [S] for [S, T, E].
    """
    E = spec.num_experts
    T = router_logits.shape[-2]
    x = router_logits.reshape(-1, T, E)  # [S, T, E]
    S = x.shape[0]
    valid = valid.reshape(S, T)
    fixed = None if fixed is None else fixed.reshape(S, T)
    members = torch.zeros(S, E + 1, dtype=torch.bool, device=x.device)  # [S, E + 1]; column E is "none"
    if spec.scoring == "sigmoid" or p < 1.0 or n >= E:
        slow = valid
    else:
        vals, ids = _top(x, spec, ties, n)  # [S, T, m], best first
        fast = valid & _certain(vals, spec, ties, n)
        if fixed is not None:
            fast &= ~fixed
        heads = torch.where(fast[..., None], ids[..., :n], E)  # [S, T, n]
        members.scatter_(1, heads.reshape(S, T * n), True)
        slow = valid & ~fast
    where = slow.nonzero()  # [N, 2]: (step, row)
    if where.numel():
        step, row = where[:, 0], where[:, 1]
        is_fixed = torch.zeros_like(step, dtype=torch.bool) if fixed is None else fixed[step, row]
        heads = _exact_heads(x[step, row], spec, ties, n, p, is_fixed, full_rank)  # [N, K]
        members[step[:, None].expand_as(heads), heads] = True
    return members[:, :E].sum(dim=-1).reshape(router_logits.shape[:-2])


def _top(x: torch.Tensor, spec: RouterSpec, ties: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best m logits of each row and their ids, m = K + 1 (softmax, ties="model") or n + 1. [S, T, m]"""
    E, K = spec.num_experts, spec.top_k
    m = min(E, K + 1) if spec.scoring == "softmax" and ties == "model" else n + 1
    fast = cpu_top.topk(x, m)  # CPU tensors: the compiled kernel when it can run, several times faster
    return fast if fast is not None else torch.topk(x, m, dim=-1)


def _certain(vals: torch.Tensor, spec: RouterSpec, ties: str, n: int) -> torch.Tensor:
    """[S, T] bool: rows whose first n ranks are surely their n best logits (`vals`, from `_top`)."""
    K, m = spec.top_k, vals.shape[-1]
    # the policies rank by float32 logits: strictly ordered in float32, two values are so in any dtype
    # (a float64 tie in float32 must count as a tie); a float32 difference is rounded, which the margins dwarf
    best, nth, next_ = (vals[..., i].float() for i in (0, n - 1, n))
    # sorted, NaN first: all m are finite iff the first and the last are
    ok = torch.isfinite(best) & torch.isfinite(vals[..., m - 1].float()) & (nth > next_)
    if spec.scoring == "softmax" and ties == "model":
        if K < m:  # else the native top-K is every expert
            ok &= nth - vals[..., K].float() >= MARGIN
        ok &= best - nth <= SPAN
    return ok


def _exact_heads(x: torch.Tensor, spec: RouterSpec, ties: str, n: int, p: float, is_fixed: torch.Tensor,
                 full_rank: bool) -> torch.Tensor:
    """[N, K] ids of each row's first n ranks (its native top-K where `is_fixed`), E in the unused slots,
    by the policies' own scoring and ranking; x [N, E] valid rows."""
    E, K = spec.num_experts, spec.top_k
    s = score(x, spec, ties)
    nat = ranked_native(s)[0]  # [N, K]
    slot = torch.arange(K, device=x.device)
    if p >= 1.0:
        take = (slot < n).expand(nat.shape)
    else:
        probs = token_probs(s.choice, s.gate)
        order = rank(s.choice, nat, ties) if full_rank else nat  # its first K are `nat`
        cum = probs.gather(-1, order).cumsum(dim=-1)[..., :K]  # [N, K]
        take = slot < ((cum < p).sum(dim=-1, keepdim=True) + 1).clamp(max=n)
    take = take | is_fixed[:, None]
    return torch.where(take, nat, E)
