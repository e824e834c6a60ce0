"""Plain-loop reference implementations of every policy, written from the papers' descriptions.

Each works token by token and expert by expert with Python lists, shares no code with the library,
and returns, per token, a dict {expert id: weight} of the experts that token computes. A token's
ranking is the library's documented rule: its native top-K first, in the model's order (given as
`native_ids`, else by score with ties to the lower id), then the rest by score, ties to the lower id.
Scores are formed with float32 arithmetic (as the models do) so that rankings match exactly; weights
are summed in float64.

`fixed` (a list of bools, or None) marks tokens that keep their native routing; a valid fixed token's
native experts are loaded anyway, so each batch-wide set below counts them. An invalid token is padding
whatever `fixed` says.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

NEG_INF = float("-inf")


class StockTopK(NamedTuple):
    """The stock router's own choice for each token: its top-K ids and (grouped sigmoid) its groups."""

    ids: list
    groups: list | None


def stock_topk(logits, spec):
    """Each token's top-K as the stock transformers routers compute it, with their own torch ops (so equal
    scores fall where their torch.topk puts them), written here, not taken from the library."""
    K, E = spec.top_k, spec.num_experts
    if spec.scoring == "softmax":
        return StockTopK(torch.topk(torch.softmax(logits, dtype=torch.float, dim=-1), K, dim=-1)[1].tolist(), None)
    if spec.scoring == "topk_softmax":
        return StockTopK(torch.topk(logits, K, dim=-1)[1].tolist(), None)
    s = logits.float().sigmoid()
    choice = s if spec.e_score_correction_bias is None else s + spec.e_score_correction_bias
    G = spec.n_group
    if G == 1 or spec.topk_group == G:
        return StockTopK(torch.topk(choice, K, dim=-1, sorted=False)[1].tolist(), None)
    T = logits.shape[0]
    group_scores = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
    groups = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros(T, G).scatter_(1, groups, 1).bool().repeat_interleave(E // G, dim=1)
    ids = torch.topk(choice.masked_fill(~mask, float("-inf")), K, dim=-1, sorted=False)[1]
    return StockTopK(ids.tolist(), groups.tolist())


def token_scores(row, spec, groups=None):
    """(choice, gate) lists for one token: what the model ranks by (-inf: not allowed) and gate mass.
    groups: the groups the model chose (grouped sigmoid), else the best by score, ties to the lower id."""
    x = row.float().numpy() if hasattr(row, "numpy") else np.asarray(row, dtype=np.float32)
    E = len(x)
    if spec.scoring == "softmax":
        m = float(np.max(x))
        ex = [math.exp(float(v) - m) for v in x]
        s = sum(ex)
        probs = [v / s for v in ex]
        # rank by the logits themselves: softmax is monotone
        return [float(v) for v in x], probs
    if spec.scoring == "topk_softmax":
        m = float(np.max(x))
        return [float(v) for v in x], [math.exp(float(v) - m) for v in x]
    sig = (np.float32(1) / (np.float32(1) + np.exp(-x.astype(np.float32)))).astype(np.float32)
    bias = np.zeros(E, np.float32)
    if spec.e_score_correction_bias is not None:
        bias = spec.e_score_correction_bias.float().numpy()
    sel = (sig + bias).astype(np.float32)
    G, size = spec.n_group, E // spec.n_group
    group_score = []
    for g in range(G):
        members = sorted((float(v) for v in sel[g * size : (g + 1) * size]), reverse=True)
        group_score.append(float(np.float32(members[0]) + np.float32(members[1])))
    best_groups = sorted(range(G), key=lambda g: (-group_score[g], g))[: spec.topk_group] if groups is None else groups
    choice = [float(sel[e]) if e // size in best_groups else NEG_INF for e in range(E)]
    return choice, [float(v) for v in sig]


def ranking(choice, native=None):
    """Expert ids best first: `native` (the model's top-K) first if given, by score with equal scores in
    the model's order, then the rest by score, ties to the lower id; experts the token may not pick last."""
    order = sorted(range(len(choice)), key=lambda e: (-choice[e], e))
    if native is None:
        return order
    native = sorted(native, key=lambda e: -choice[e])  # by score; equal scores keep the model's order
    return native + [e for e in order if e not in native]


def rankings(logits, spec, native_ids=None):
    """native_ids: the model's top-K per token (a list, or `stock_topk`'s answer, which also gives its groups)."""
    groups = [None] * len(logits)
    if isinstance(native_ids, StockTopK):
        if native_ids.groups is not None:
            groups = native_ids.groups
        native_ids = native_ids.ids
    toks = [token_scores(row, spec, g) for row, g in zip(logits, groups)]
    nat = [None] * len(toks) if native_ids is None else [list(map(int, r)) for r in native_ids]
    return toks, [ranking(c, n) for (c, _), n in zip(toks, nat)]


def is_fixed(fixed, valid, t):
    """Whether token t is a valid token that keeps its native routing."""
    return fixed is not None and bool(fixed[t]) and bool(valid[t])


def weights(gate, kept, spec, renormalize):
    w = {e: gate[e] for e in kept}
    if renormalize or spec.scoring == "topk_softmax":
        s = sum(w.values())
        w = {e: v / s for e, v in w.items()}
    return {e: v * spec.routed_scaling_factor for e, v in w.items()}


def ref_native(logits, spec, valid, native_ids=None, fixed=None):
    """Every token's own top-K (fixed or not: native routing is all native)."""
    toks, ranks = rankings(logits, spec, native_ids)
    return [weights(gate, order[: spec.top_k], spec, spec.renormalize) for (_, gate), order in zip(toks, ranks)]


def ref_cap(logits, spec, valid, k, renormalize=None, native_ids=None, fixed=None):
    """The model's top-k: its native weights cut to k (renormalize False), or rescaled to their native total.
    A fixed token keeps all K."""
    renorm = spec.renormalize if renormalize is None else renormalize
    out = []
    for t, native in enumerate(ref_native(logits, spec, valid, native_ids)):
        if is_fixed(fixed, valid, t):
            out.append(dict(native))
            continue
        kept = list(native)[:k]  # dicts keep the ranking order
        w = {e: native[e] for e in kept}
        if renorm:
            scale = sum(native.values()) / sum(w.values())
            w = {e: v * scale for e, v in w.items()}
        out.append(w)
    return out


def oea_base(toks, ranks, k0, p):
    """Each token's base set: its first k0 experts in `ranks`' order, fewer where the top-p of its gate mass
    (over the experts it may choose) is reached first."""
    base = []
    for (choice, gate), order in zip(toks, ranks):
        allowed = [e for e in order if choice[e] != NEG_INF]
        total = sum(gate[e] for e in allowed)
        t, acc = len(allowed), 0.0
        if p < 1.0:
            for j, e in enumerate(allowed):
                acc += gate[e] / total
                if acc >= p:
                    t = j + 1
                    break
        base.append(order[: min(k0, t)])
    return base


def ref_oea(logits, spec, valid, k0, p=1.0, k_max=None, max_rank=None, native_ids=None, fixed=None):
    """OEA, Algorithm 2 of arXiv 2511.02237 (simplified OEA when p=1, k_max=K, max_rank=E). The loaded set
    is the union of the re-routed tokens' base sets and the fixed tokens' native top-K; a fixed token
    routes to its native top-K, the others piggyback on the loaded set."""
    K, E = spec.top_k, spec.num_experts
    k_max = K if k_max is None else k_max
    max_rank = E if max_rank is None else max_rank
    toks, ranks = rankings(logits, spec, native_ids)
    base = oea_base(toks, ranks, k0, p)
    loaded = set()
    for t, (b, order) in enumerate(zip(base, ranks)):
        if is_fixed(fixed, valid, t):
            for e in order[:K]:
                loaded.add(e)
        elif valid[t]:
            loaded.update(b)
    out = []
    for t, ((choice, gate), order, b) in enumerate(zip(toks, ranks, base)):
        if is_fixed(fixed, valid, t):
            out.append(weights(gate, order[:K], spec, spec.renormalize))
            continue
        kept = list(b)
        for j in range(len(b), max_rank):  # j is the 0-based rank
            if len(kept) >= k_max:
                break
            e = order[j]
            if e in loaded and choice[e] != NEG_INF:
                kept.append(e)
        out.append(weights(gate, kept, spec, spec.renormalize))
    return out


def ref_sere(logits, spec, valid, sim, primary=2, threshold=0.1, native_ids=None, fixed=None):
    """SERE re-routing, arXiv 2602.07616; duplicate experts' weights are summed. Every native expert of a
    fixed token is in the primary set P (it is loaded anyway); a fixed token is not re-routed."""
    K = spec.top_k
    sim = np.asarray(sim, dtype=np.float32)
    toks, ranks = rankings(logits, spec, native_ids)
    topk = [order[:K] for order in ranks]
    P = set()
    for t, ids in enumerate(topk):
        if is_fixed(fixed, valid, t):
            for e in ids:
                P.add(e)
        elif valid[t]:
            P.update(ids[:primary])
    out = []
    for t, ((choice, gate), ids) in enumerate(zip(toks, topk)):
        w = weights(gate, ids, spec, spec.renormalize)
        if is_fixed(fixed, valid, t):
            out.append(w)
            continue
        result = {}
        for slot, e in enumerate(ids):
            target = e
            if slot >= primary and e not in P and P:
                best, best_sim = None, NEG_INF
                for p in sorted(P):
                    if float(sim[e, p]) > best_sim:
                        best, best_sim = p, float(sim[e, p])
                critical = threshold > 0 and best_sim < threshold
                if not critical:
                    target = best
            result[target] = result.get(target, 0.0) + w[e]
        out.append(result)
    return out


def within_set(toks, ranks, chosen, spec, valid, fixed):
    """Each token's best K experts of the set `chosen`, by its ranking (fixed tokens: native); `chosen`
    may be a function (t, e) -> whether token t may use e."""
    K = spec.top_k
    allowed = chosen if callable(chosen) else (lambda t, e: e in chosen)
    out = []
    for t, ((choice, gate), order) in enumerate(zip(toks, ranks)):
        if is_fixed(fixed, valid, t):
            out.append(weights(gate, order[:K], spec, spec.renormalize))
            continue
        kept = [e for e in order if allowed(t, e) and choice[e] != NEG_INF][:K]
        out.append(weights(gate, kept, spec, spec.renormalize))
    return out


def ref_budget(logits, spec, valid, budget, native_ids=None, grid=256, fixed=None):
    """Batch-wide expert set under a budget (XShare-style), top-1 of every token guaranteed; each token's
    share of an expert's mass counted in whole 1/grid-ths (rounded half up), at least one. A fixed token's
    native top-K is in the set before the budget is filled (and counts against it); it routes natively.
    Only the re-routed tokens' mass is counted here: a fixed token's lies on experts already chosen."""
    K = spec.top_k
    toks, ranks = rankings(logits, spec, native_ids)
    score = {}
    chosen = []
    for t, ((choice, gate), order, v) in enumerate(zip(toks, ranks, valid)):
        if not v:
            continue
        if is_fixed(fixed, valid, t):
            for e in order[:K]:
                if e not in chosen:
                    chosen.append(e)
            continue
        if order[0] not in chosen:
            chosen.append(order[0])
        top = order[:K]
        s = sum(gate[e] for e in top)
        for e in top:
            score[e] = score.get(e, 0) + max(1, math.floor(gate[e] / s * grid + 0.5))
    extra = sorted((e for e in range(spec.num_experts) if e not in chosen), key=lambda e: (-score.get(e, 0), e))
    chosen += extra[: max(0, budget - len(chosen))]
    return within_set(toks, ranks, chosen, spec, valid, fixed)


def ref_gain(logits, spec, valid, budget, base=1, native_ids=None, fixed=None):
    """Batch-wide set grown one expert at a time by the summed gain in log kept mass.

    Algorithm:
      1. q[t][e] = gate[e] / (gate mass of t's native top-K), 0 where t may never pick e; only valid
         re-routed tokens count.
      2. The set starts with each valid re-routed token's ranks 1..base and each valid fixed token's
         native top-K.
      3. While the set holds fewer than `budget`: each token's K best-ranked experts in the set (fewer if
         the set holds fewer) keep mass kept[t] = the sum of their q; an expert e outside the set that t ranks
         above the K-th of them (any e when there are fewer than K) changes it by q[t][e] minus that K-th
         one's q (0 if there are fewer than K), otherwise by 0; the expert with the largest
         sum_t log(1 + max(change / kept[t], 2**-20 - 1)) joins (lower id first among equal sums).
      4. Each token takes its best K experts within the set, by its ranking (fixed tokens: native)."""
    K, E = spec.top_k, spec.num_experts
    toks, ranks = rankings(logits, spec, native_ids)
    chosen = set()
    q = []
    for t, ((choice, gate), order) in enumerate(zip(toks, ranks)):
        if not valid[t]:
            continue
        if is_fixed(fixed, valid, t):
            chosen.update(order[:K])
            continue
        own = sum(gate[e] for e in order[:K])
        q.append(([gate[e] / own if choice[e] != NEG_INF else 0.0 for e in range(E)], order))
        chosen.update(order[:base])
    while len(chosen) < budget:
        best = None
        for e in range(E):
            if e in chosen:
                continue
            total = 0.0
            for row, order in q:
                inside = [x for x in order if x in chosen][:K]
                kept = sum(row[x] for x in inside)
                if len(inside) < K:
                    change = row[e]
                elif order.index(e) < order.index(inside[-1]):
                    change = row[e] - row[inside[-1]]
                else:
                    change = 0.0
                total += math.log1p(max(change / kept, 2.0 ** -20 - 1))
            if best is None or total > best[0]:
                best = (total, e)
        chosen.add(best[1])
    return within_set(toks, ranks, chosen, spec, valid, fixed)


def _top_by(values, n):
    """The n indices of the largest values, ties to the lower index."""
    return sorted(range(len(values)), key=lambda e: (-values[e], e))[:n]


def ref_xshare(logits, spec, valid, budget=None, alpha=None, k0=0, group_budget=0, group_size=0, min_batch=0,
               max_batch=0, guarantee=True, native_ids=None, fixed=None):
    """XShare's pruning, read from `_prune_experts` of vLLM PR #35551: masks each row's logits outside
    (global top-m by the batch's logit sums) | (its own top-k0) | (its group's top-group_budget) |
    (its own top-K when m < K), then the row takes its top-K among the unmasked. Padding and fixed rows
    are left out of the sums; a fixed row's native experts stay unmasked for every row."""
    K, E = spec.top_k, spec.num_experts
    T = len(logits)
    toks, ranks = rankings(logits, spec, native_ids)
    native = [weights(gate, order[:K], spec, spec.renormalize) for (_, gate), order in zip(toks, ranks)]
    if budget is not None:
        m = min(budget, E)
    else:
        a = 0.5 if alpha is None else alpha
        m = max(1, int(a * E)) if a > 0 else 0
    off = ((min_batch and T < min_batch) or (max_batch and T > max_batch) or m >= E
           or (m == 0 and k0 == 0 and group_budget == 0) or (guarantee and m < K))
    if off:
        return native
    rows = [[float(v) for v in r.double().tolist()] for r in logits]
    counted = [bool(valid[t]) and not is_fixed(fixed, valid, t) for t in range(T)]

    def sums(ts):
        out = [0.0] * E
        for t in ts:
            if counted[t]:
                for e in range(E):
                    out[e] += rows[t][e]
        return out

    shared = set()
    for t in range(T):
        if is_fixed(fixed, valid, t):
            shared.update(ranks[t][:K])
    allow = [set(shared) for _ in range(T)]
    if m > 0:
        g = set(_top_by(sums(range(T)), m))
        for a in allow:
            a.update(g)
    for t in range(T):
        allow[t].update(ranks[t][:k0])
    if group_budget > 0:
        n = T // group_size * group_size
        for start in range(0, n, group_size):
            members = range(start, start + group_size)
            best = set(_top_by(sums(members), group_budget))
            for t in members:
                allow[t].update(best)
        rest = set(_top_by(sums(range(T)), group_budget))
        for t in range(n, T):
            allow[t].update(rest)
    out = []
    for t, ((choice, gate), order) in enumerate(zip(toks, ranks)):
        if is_fixed(fixed, valid, t):
            out.append(native[t])
            continue
        kept = [e for e in order if e in allow[t] and choice[e] != NEG_INF][:K]
        out.append(weights(gate, kept, spec, spec.renormalize))
    return out


def _lynx_padding_zeroed(logits, valid):
    """Padding rows hold anything (NaN, inf): the peer's batch has none, so they are read as zeros, never used."""
    keep = torch.tensor([bool(v) for v in valid])[:, None]
    return torch.where(keep, logits, torch.zeros((), dtype=logits.dtype))


def _lynx_levels(row, alpha, beta, clamp=False):
    """Bucket depths l = -q of one token's logits: q = ceil(alpha * (x - max x)) in float32, every q <= -beta at
    -beta. clamp: the peer's `quant_flatten_remove` form, max(ceil(...), -beta) (the same for a whole beta)."""
    x = [float(v) for v in row.float().tolist()]
    mx = max(x)
    out = []
    for v in x:
        raw = float(np.float32(alpha) * (np.float32(v) - np.float32(mx)))
        if beta is None:
            out.append(-float(math.ceil(raw)) if raw != NEG_INF else math.inf)
        elif clamp:
            out.append(float(min(-math.ceil(raw), beta)) if raw != NEG_INF else float(beta))
        else:
            out.append(float(beta) if raw <= -beta else -float(math.ceil(raw)))
    return out


def _lynx_popularity(depths, rows, B, beta):
    """Each expert's sum of B ** -l over `rows`. With beta: from the count of rows at each depth, by Horner's
    rule from the deepest bucket (c_0 + (c_1 + ...) / B), every B ** -l as 1 / B / B ... (l divisions), as
    the library evaluates it in every backend. Without beta: the values summed smallest first."""
    E = len(depths[0]) if depths else 0
    if beta is None:
        return [sum(sorted(float(B) ** -depths[t][e] for t in rows)) for e in range(E)]
    pop = []
    for e in range(E):
        acc = None
        for d in range(int(beta), -1, -1):
            c = float(sum(1 for t in rows if depths[t][e] == d))
            acc = c if acc is None else acc / B + c
        pop.append(acc)
    return pop


def _lynx_h(B, depth, beta):
    if beta is None:
        return float(B) ** -depth
    h = 1.0
    for _ in range(int(depth)):
        h = h / B
    return h


def _lynx_quant_set(logits, valid, K, alpha, beta, ranks, fixed, clamp=False):
    """(keep set, depths): Lynx's "quant" vote. Each valid, not fixed token takes its top-K of
    q + (pop - own h) / B (ties to the lower id); B counts the valid rows; fixed rows add their native top-K."""
    T, E = len(logits), logits.shape[1]
    rows = [t for t in range(T) if valid[t]]
    B = float(max(1, len(rows)))
    depths = [_lynx_levels(r, alpha, beta, clamp) for r in logits]
    pop = _lynx_popularity(depths, rows, B, beta)
    keep = set()
    for t in range(T):
        if is_fixed(fixed, valid, t):
            keep.update(ranks[t][:K])
        elif valid[t]:
            h = [_lynx_h(B, depths[t][e], beta) for e in range(E)]
            keep.update(_top_by([-depths[t][e] + (pop[e] - h[e]) / B for e in range(E)], K))
    return keep, depths


def _lynx_route(toks, ranks, keep, K, spec, fixed, valid, native, scale):
    """Each token's best K (by its ranking) within `keep`, weights over them, then `scale(t, w)`."""
    out = []
    for t, ((choice, gate), order) in enumerate(zip(toks, ranks)):
        if is_fixed(fixed, valid, t):
            out.append(native[t])
            continue
        # the library's rule: a token's native top-K stays allowed at weight 0 where its logit is -inf
        kept = [e for i, e in enumerate(order) if e in keep and (choice[e] != NEG_INF or i < K)][:K] or order[:1]
        out.append(scale(t, kept, weights(gate, kept, spec, True)))
    return out


def ref_lynx(logits, spec, valid, alpha, beta=None, native_ids=None, fixed=None):
    """Lynx's "quant" policies, read from gt-nexs/lynx `src/lynx/routing.py`: per token q = ceil(alpha *
    (x - max x)) (q <= -beta -> -beta), h = B**q; each token picks its top-K of q + (sum of h over the batch
    - own h) / B (ties to the lower id); the batch keeps the experts picked; each token then takes its top-K
    logits among them, weights renormalised, or scaled to its native top-K mass when the model does not
    renormalise. B counts the valid rows; a fixed row keeps its native top-K, which the batch keeps too."""
    K = spec.top_k
    logits = _lynx_padding_zeroed(logits, valid)
    toks, ranks = rankings(logits, spec, native_ids)
    native = [weights(gate, order[:K], spec, spec.renormalize) for (_, gate), order in zip(toks, ranks)]
    keep, _ = _lynx_quant_set(logits, valid, K, alpha, beta, ranks, fixed)

    def scale(t, kept, w):
        if spec.renormalize:
            return w
        total = sum(native[t].values())
        return {e: v * total for e, v in w.items()}

    return _lynx_route(toks, ranks, keep, K, spec, fixed, valid, native, scale)


def ref_lynx_flatten_remove(logits, spec, valid, alpha, beta, native_ids=None, fixed=None):
    """Lynx's `quant_flatten_remove` (routing.py's branch of that name): "quant" with
    q = max(ceil(alpha * (x - max)), -beta), then every chosen id whose q == -beta is replaced by the
    token's first id and keeps its weight: the first expert counts with the sum of those weights."""
    logits = _lynx_padding_zeroed(logits, valid)
    _, ranks = rankings(logits, spec, native_ids)
    depths = [_lynx_levels(r, alpha, beta, clamp=True) for r in logits]
    out = []
    routed = ref_lynx(logits, spec, valid, alpha, beta, native_ids, fixed)
    for t, w in enumerate(routed):
        if is_fixed(fixed, valid, t):
            out.append(w)
            continue
        kept = [e for e in ranks[t] if e in w]  # the token's ids, in its order: the first is its best
        first = kept[0]
        merged = {}
        for e in kept:
            target = first if depths[t][e] == beta else e
            merged[target] = merged.get(target, 0.0) + w[e]
        out.append(merged)
    return out


def stock_weights(logits, spec):
    """Each token's native top-K weights, best first, as the stock softmax routers compute them (float32)."""
    K = spec.top_k
    if spec.scoring == "topk_softmax":
        top = torch.topk(logits, K, dim=-1).values
        return torch.softmax(top, dim=-1, dtype=top.dtype).float().tolist()
    top = torch.topk(torch.softmax(logits, dtype=torch.float, dim=-1), K, dim=-1).values
    if spec.renormalize:
        top /= top.sum(dim=-1, keepdim=True)
    return top.tolist()


def ref_lynx_advanced_parametrized(logits, spec, valid, alpha, beta, native_ids=None, fixed=None):
    """Lynx's `advanced_parametrized` (routing.py: `optimize_expert_selection_parameterized` and
    `extract_important_graded`): per token, confidence c = (top half - bottom half) / (top half + 1e-8) of its
    native top-K weights (halves split at K // 2; float32); it keeps its slots j < floor(c * K * beta) + alpha;
    the batch keeps those experts; logits outside are masked and each token takes its top-K of the softmax
    over what is left (renormalised when the model renormalises). A token with nothing left keeps its top-1
    (weight 1). Fixed rows keep their native top-K, which the batch keeps too."""
    K = spec.top_k
    f32 = np.float32
    logits = _lynx_padding_zeroed(logits, valid)
    toks, ranks = rankings(logits, spec, native_ids)
    native = [weights(gate, order[:K], spec, spec.renormalize) for (_, gate), order in zip(toks, ranks)]
    keep = set()
    for t, w in enumerate(stock_weights(logits, spec)):
        if is_fixed(fixed, valid, t):
            keep.update(ranks[t][:K])
            continue
        if not valid[t]:
            continue
        top, bottom = f32(0), f32(0)
        for j in range(K):
            if j < K // 2:
                top = f32(top + f32(w[j]))
            else:
                bottom = f32(bottom + f32(w[j]))
        c = f32(f32(top - bottom) / f32(top + f32(1e-8)))
        n = f32(np.floor(f32(f32(c * f32(K)) * f32(beta)))) + f32(alpha)
        keep.update(e for j, e in enumerate(ranks[t][:K]) if f32(j) < n)

    def scale(t, kept, w):
        if spec.renormalize:
            return w
        gate = toks[t][1]
        in_set = sum(gate[e] for e in keep if toks[t][0][e] != NEG_INF)
        chosen = sum(gate[e] for e in kept)
        return {e: gate[e] / max(in_set, chosen) for e in kept}

    return _lynx_route(toks, ranks, keep, K, spec, fixed, valid, native, scale)


def ref_rank_unique(ids, valid, placement, ranks):
    """Distinct experts on each of `ranks` ranks for one step: ids [T][K] lists, valid [T] bools,
    placement [E] list of ranks. Returns (per-rank counts, max over ranks, mean over ranks)."""
    used = set()
    for t, row in enumerate(ids):
        if valid[t]:
            for e in row:
                used.add(int(e))
    counts = [0] * ranks
    for e in used:
        counts[int(placement[e])] += 1
    return counts, max(counts), sum(counts) / ranks


def ref_balanced_placement(load, ranks):
    """EPLB-style greedy packing: experts by decreasing load (ties: lower id), each onto the rank with the
    least load so far (ties: lower rank) that has room; rank r has room for as many experts as the
    contiguous split e * D // E puts on it."""
    E = len(load)
    room = [sum(1 for e in range(E) if e * ranks // E == r) for r in range(ranks)]
    total = [0.0] * ranks
    out = [None] * E
    for e in sorted(range(E), key=lambda i: (-load[i], i)):
        best = None
        for r in range(ranks):
            if room[r] > 0 and (best is None or total[r] < total[best]):
                best = r
        out[e] = best
        room[best] -= 1
        total[best] += load[e]
    return out


def _rank_capped(candidates, forced, placement, cap, total=None):
    """Greedy over `candidates` (best first): a forced expert always; another while its rank holds fewer
    than `cap` experts taken so far and, with `total`, while fewer than `total` are taken."""
    taken, per_rank = [], {}
    for e in candidates:
        r = int(placement[e])
        if e in forced or (per_rank.get(r, 0) < cap and (total is None or len(taken) < total)):
            taken.append(e)
            per_rank[r] = per_rank.get(r, 0) + 1
    return set(taken)


def _native_mass(toks, ranks, valid, fixed, K, grid=256, slot=None):
    """Each expert's native gate mass over the valid re-routed tokens, in whole 1/grid-ths (as ref_budget);
    with `slot(t, e)`, summed per physical slot instead."""
    score = {}
    for t, ((choice, gate), order) in enumerate(zip(toks, ranks)):
        if not valid[t] or is_fixed(fixed, valid, t):
            continue
        top = order[:K]
        s = sum(gate[e] for e in top)
        for e in top:
            key = e if slot is None else slot(t, e)
            score[key] = score.get(key, 0) + max(1, math.floor(gate[e] / s * grid + 0.5))
    return score


def replica_slots(physical_to_logical):
    """vLLM's replica choice, written out: row t reaches, for logical expert e, the r-th slot (in slot
    order) holding e, r = ((t * 2654435769) mod 2^32) mod (e's replica count). Returns slot(t, e)."""
    holders = {}
    for p, e in enumerate(physical_to_logical):
        holders.setdefault(int(e), []).append(p)

    def slot(t, e):
        h = (t * 2654435769) % (1 << 32)
        return holders[e][h % len(holders[e])]

    return slot


def _slot_setup(E, ranks, placement, physical_to_logical):
    """(slot(t, e), rank of each slot, number of slots) for a plain or a replicated placement."""
    if physical_to_logical is None:
        placement = [e * ranks // E for e in range(E)] if placement is None else [int(v) for v in placement]
        return (lambda t, e: e), placement, E
    P = len(physical_to_logical)
    return replica_slots(physical_to_logical), [p // (P // ranks) for p in range(P)], P


def ref_oea_ep(logits, spec, valid, k0, ranks, placement=None, rank_cap=None, p=1.0, k_max=None, max_rank=None,
               native_ids=None, fixed=None, physical_to_logical=None):
    """OEA with its loaded set chosen under a per-rank cap (expert parallelism over `ranks` ranks):
    forced = every valid re-routed token's top-1 and every fixed token's native top-K; then the other
    experts of plain OEA's loaded set, then experts outside it with native mass, each group by mass
    (ties: lower id); a rank takes experts while it holds fewer than cap = rank_cap or
    ceil(|plain loaded set| / ranks). Tokens keep their base experts that are loaded and piggyback on the
    loaded set (ranks up to max_rank), up to k_max; fixed tokens route natively.
    With `physical_to_logical` (redundant experts), every set holds the physical slots the tokens reach
    (`replica_slots`), slot p on rank p // (P / ranks), and a token may use e if its slot is loaded."""
    K, E = spec.top_k, spec.num_experts
    k_max = K if k_max is None else k_max
    max_rank = E if max_rank is None else max_rank
    slot, placement, n = _slot_setup(E, ranks, placement, physical_to_logical)
    toks, order_of = rankings(logits, spec, native_ids)
    base = oea_base(toks, order_of, k0, p)
    plain, forced = set(), set()
    for t, (b, order) in enumerate(zip(base, order_of)):
        if is_fixed(fixed, valid, t):
            plain.update(slot(t, e) for e in order[:K])
            forced.update(slot(t, e) for e in order[:K])
        elif valid[t]:
            plain.update(slot(t, e) for e in b)
            forced.add(slot(t, order[0]))
    mass = _native_mass(toks, order_of, valid, fixed, K, slot=slot)
    candidates = sorted((x for x in range(n) if x in forced or x in plain or mass.get(x, 0) > 0),
                        key=lambda x: (x not in forced, x not in plain, -mass.get(x, 0), x))
    cap = rank_cap if rank_cap is not None else -(-len(plain) // ranks)
    loaded = _rank_capped(candidates, forced, placement, cap)
    out = []
    for t, ((choice, gate), order, b) in enumerate(zip(toks, order_of, base)):
        if is_fixed(fixed, valid, t):
            out.append(weights(gate, order[:K], spec, spec.renormalize))
            continue
        kept = []
        for j, e in enumerate(order):
            if len(kept) >= k_max:
                break
            if slot(t, e) in loaded and (j < len(b) or (choice[e] != NEG_INF and j < max_rank)):
                kept.append(e)
        out.append(weights(gate, kept, spec, spec.renormalize))
    return out


def ref_budget_ep(logits, spec, valid, budget, ranks, placement=None, rank_cap=None, native_ids=None, fixed=None,
                  physical_to_logical=None):
    """`ref_budget` with the set filled under a per-rank cap: forced experts (every valid re-routed token's
    top-1, every fixed token's native top-K) first, then by mass (ties: lower id), each only while its rank
    holds fewer than cap = rank_cap or ceil(budget / ranks) and the set fewer than `budget`.
    With `physical_to_logical`, the set holds physical slots (as in `ref_oea_ep`); a token routes to its
    best K experts whose slots are in it."""
    K, E = spec.top_k, spec.num_experts
    slot, placement, n = _slot_setup(E, ranks, placement, physical_to_logical)
    toks, order_of = rankings(logits, spec, native_ids)
    forced = set()
    for t, order in enumerate(order_of):
        if is_fixed(fixed, valid, t):
            forced.update(slot(t, e) for e in order[:K])
        elif valid[t]:
            forced.add(slot(t, order[0]))
    mass = _native_mass(toks, order_of, valid, fixed, K, slot=slot)
    candidates = sorted(range(n), key=lambda x: (x not in forced, -mass.get(x, 0), x))
    cap = rank_cap if rank_cap is not None else -(-budget // ranks)
    chosen = _rank_capped(candidates, forced, placement, cap, total=budget)
    return within_set(toks, order_of, lambda t, e: slot(t, e) in chosen, spec, valid, fixed)
