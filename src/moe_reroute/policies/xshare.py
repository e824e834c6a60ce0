"""`xshare`: XShare's batch-aware expert pruning (arXiv 2602.07265), as vLLM PR #35551 defines it
(`_prune_experts` in `vllm/model_executor/layers/fused_moe/gpt_oss_triton_kernels_moe.py`).

Per layer and batch of T rows (every step on its own):
1. Off (native routing) when T < min_batch or T > max_batch (0: no bound), when the global budget m is
   at least E, when nothing is asked (m = 0, k0 = 0, no group budget), or when the top-K guarantee
   holds every token's own top-K (m < K with `guarantee`): each token then picks its native experts.
2. Global set: the m experts with the largest sum of raw router logits over the batch's valid rows
   (m = `budget`, else max(1, floor(alpha * E))); ties to the lower id.
3. Per-token set: each token's own first k0 ranks (`k0`, XShare's `top_per_token`).
4. Group sets: rows 0..T//g*g-1 in consecutive groups of g = `group_size` rows; each group's
   `group_budget` experts with the largest logit sum over its valid rows; the remainder rows take the
   global sums' best `group_budget`.
5. Each token routes to its best K experts within the union of the sets that apply to it (and every
   native expert of a valid fixed row, loaded anyway), by its own ranking, with the model's weights
   over those (renormalised as the model does). A token allowed fewer than K keeps what it has; its
   spare slots repeat its first expert with weight 0.
Scoring: defined where the peer's sum of raw logits ranks experts as the model does, "softmax" and
"topk_softmax" (GPT-OSS, the peer's own model). Sums are taken in float64 so that every order of
summation (every backend, the loop reference) gives the same set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..contract import Routing
from ..scoring import (finish, fixed_members, native_where_fixed, native_where_unchanged, pack, rank, ranked_native,
                       sanitize, score, weights_for)
from .base import Policy, PolicyConfig, need_at_most, need_int, per_layer

DEFAULT_ALPHA = 0.5  # XShare's budget_alpha default, used when neither budget nor alpha is given


@dataclass(frozen=True)
class XShareConfig(PolicyConfig):
    """budget: experts in the global set (XShare's expert_budget). alpha: the global set as a fraction of
    E, max(1, floor(alpha * E)) (budget_alpha; 0 = no global set). Give one of them; neither: alpha=0.5.
    k0: each token's own first k0 ranks kept (top_per_token; 0 = off). group_budget, group_size: each
    group of group_size consecutive rows keeps its group_budget best experts (0 = off). min_batch,
    max_batch: route natively when the step has fewer / more rows (0 = no bound). guarantee: keep each
    token's own top-K when the global set is smaller than K (the peer's engine path always does)."""

    budget: Any = per_layer(None)
    alpha: Any = per_layer(None)
    k0: Any = per_layer(0)
    group_budget: Any = per_layer(0)
    group_size: Any = per_layer(0)
    min_batch: int = 0
    max_batch: int = 0
    guarantee: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None and self.alpha is not None:
            raise ValueError("xshare: give budget (experts) or alpha (a fraction of E), not both; XShare's "
                             "budget overrides alpha, which is easy to miss")

    def check(self, name: str, value: Any) -> None:
        if name == "budget" and value is not None:
            need_int("xshare budget", value)
        elif name == "alpha" and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"xshare alpha must be a fraction of the experts in [0, 1], got {value!r}")
        elif name in ("k0", "group_budget", "group_size", "min_batch", "max_batch"):
            need_int(f"xshare {name}", value, low=0)
        elif name == "guarantee" and not isinstance(value, bool):
            raise ValueError(f"xshare guarantee must be True or False, got {value!r}")


def global_budget(config: XShareConfig, E: int) -> int:
    """m, the global set's size (0: none), from budget or alpha as the peer computes it."""
    if config.budget is not None:
        return min(int(config.budget), E)
    alpha = DEFAULT_ALPHA if config.alpha is None else float(config.alpha)
    return max(1, int(alpha * E)) if alpha > 0 else 0


class XShare(Policy):
    name = "xshare"
    Config = XShareConfig
    has_kernel = True

    def check_fit(self, spec, config, layer) -> None:
        if spec.scoring == "sigmoid":
            raise ValueError("xshare ranks experts by the batch's sum of raw router logits, which is defined for "
                             "softmax and topk_softmax routers only; this model scores by sigmoid with groups "
                             "(DeepSeek-V3): use budget, oea, cap or sere")
        E = spec.num_experts
        if config.budget is not None:
            need_at_most("xshare budget", config.budget, E, "the number of experts E")
        need_at_most("xshare k0", config.k0, E, "the number of experts E")
        need_at_most("xshare group_budget", config.group_budget, E, "the number of experts E")
        if (config.group_budget > 0) != (config.group_size > 0):
            raise ValueError(f"xshare group_budget={config.group_budget} and group_size={config.group_size}: "
                             "give both (a group budget per group of group_size rows) or neither")
        if self.config.max_batch and self.config.min_batch > self.config.max_batch:
            raise ValueError(f"xshare min_batch={self.config.min_batch} > max_batch={self.config.max_batch}: "
                             "no step would be pruned")

    def _off(self, spec, config, T: int) -> bool:
        K, E = spec.top_k, spec.num_experts
        c = self.config
        if (c.min_batch and T < c.min_batch) or (c.max_batch and T > c.max_batch):
            return True
        m = global_budget(config, E)
        if m >= E or (m == 0 and config.k0 == 0 and config.group_budget == 0):
            return True
        return c.guarantee and m < K  # every token keeps its own top-K: native

    def _check_groups(self, config, T: int) -> None:
        if config.group_size > T:
            raise ValueError(f"xshare group_size={config.group_size} > the step's {T} rows: groups cannot be "
                             "formed; give a smaller group_size, or one per batch size with "
                             '{"by_batch": {...}}')

    def kernel_params(self, spec, config, T: int) -> tuple[int, int, int, int]:
        """(m, k0, group_budget, group_size) for the fused kernel, resolved on the host for a step of T rows;
        (0, 0, 0, 1) when the policy is off (native routing)."""
        self._check_groups(config, T)
        if self._off(spec, config, T):
            return 0, 0, 0, 1
        gb = int(config.group_budget)
        return global_budget(config, spec.num_experts), int(config.k0), gb, int(config.group_size) if gb else 1

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None) -> Routing:
        K, E = spec.top_k, spec.num_experts
        T = router_logits.shape[-2]
        self._check_groups(config, T)
        x = sanitize(router_logits, valid)
        s = score(x, spec, self.ties, native)
        if self._off(spec, config, T):
            return finish(*native_where_fixed(s, s.native_ids, s.native_w, fixed, valid), valid, s)
        nat = ranked_native(s)[0]  # [T, K], best first
        order = rank(s.choice, nat, self.ties)  # [T, E]
        counted = valid if fixed is None else valid & ~fixed  # a fixed row's experts join the set below
        xs = torch.where(counted[..., None], x.double(), torch.zeros((), dtype=torch.float64, device=x.device))
        allowed = torch.zeros_like(s.choice, dtype=torch.bool)  # [T, E] by expert
        m = global_budget(config, E)
        if m > 0:
            allowed |= _best(xs.sum(dim=-2), m)[..., None, :]
        if config.k0 > 0:
            allowed |= torch.zeros_like(allowed).scatter_(-1, order[..., : config.k0], True)
        if config.group_budget > 0:
            g = config.group_size
            n = T // g * g
            groups = xs[..., :n, :].reshape(*xs.shape[:-2], T // g, g, E).sum(dim=-2)  # [T/g, E]
            allowed[..., :n, :] |= _best(groups, config.group_budget).repeat_interleave(g, dim=-2)
            if n < T:
                allowed[..., n:, :] |= _best(xs.sum(dim=-2), config.group_budget)[..., None, :]
        held = fixed_members(s, fixed, valid)
        if held is not None:
            allowed |= held.any(dim=-2, keepdim=True)
        # a token's native top-K (ranks 1..K) may hold experts of weight 0 (fewer than K finite logits): they
        # stay allowed, so that the no-op setting is native routing exactly
        head = torch.arange(E, device=order.device) < K
        ok = allowed.gather(-1, order) & (torch.isfinite(s.choice.gather(-1, order)) | head)  # [T, E], rank order
        ok[..., 0] |= ~ok.any(dim=-1)  # a row with nothing allowed (padding only) keeps its best, for `pack`
        keep = ok & (ok.cumsum(dim=-1) <= K)
        ids, kept = pack(order, keep, K)
        w = weights_for(s.gate, ids, kept, spec, spec.renormalize)
        ids, w = native_where_unchanged(s, ids, kept, w)
        return finish(*native_where_fixed(s, ids, w, fixed, valid), valid, s)


def _best(sums: torch.Tensor, n: int) -> torch.Tensor:
    """[..., E] bool: the n largest of `sums` [..., E], ties to the lower id."""
    top = torch.sort(sums, dim=-1, descending=True, stable=True)[1][..., :n]
    return torch.zeros_like(sums, dtype=torch.bool).scatter_(-1, top, True)
