"""Plain-loop reference implementations of every policy, written from the papers' descriptions.

Each works token by token and expert by expert with Python lists, shares no code with the library,
and returns, per token, a dict {expert id: weight} of the experts that token computes. Ties in a
ranking go to the lower expert id (the library's documented rule). Scores are formed with float32
arithmetic (as the models do) so that rankings match exactly; weights are summed in float64.
"""

from __future__ import annotations

import math

import numpy as np

NEG_INF = float("-inf")


def token_scores(row, spec):
    """(choice, gate) lists for one token: what the model ranks by (-inf: not allowed) and gate mass."""
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
    best_groups = sorted(range(G), key=lambda g: (-group_score[g], g))[: spec.topk_group]
    choice = [float(sel[e]) if e // size in best_groups else NEG_INF for e in range(E)]
    return choice, [float(v) for v in sig]


def ranking(choice):
    """Expert ids best first; ties to the lower id; experts the token may not pick last."""
    return sorted(range(len(choice)), key=lambda e: (-choice[e], e))


def weights(gate, kept, spec, renormalize):
    w = {e: gate[e] for e in kept}
    if renormalize or spec.scoring == "topk_softmax":
        s = sum(w.values())
        w = {e: v / s for e, v in w.items()}
    return {e: v * spec.routed_scaling_factor for e, v in w.items()}


def ref_native(logits, spec, valid):
    out = []
    for row in logits:
        choice, gate = token_scores(row, spec)
        out.append(weights(gate, ranking(choice)[: spec.top_k], spec, spec.renormalize))
    return out


def ref_cap(logits, spec, valid, k, renormalize=None):
    renorm = spec.renormalize if renormalize is None else renormalize
    out = []
    for row in logits:
        choice, gate = token_scores(row, spec)
        out.append(weights(gate, ranking(choice)[:k], spec, renorm))
    return out


def ref_oea(logits, spec, valid, k0, p=1.0, k_max=None, max_rank=None):
    """OEA, Algorithm 2 of arXiv 2511.02237 (simplified OEA when p=1, k_max=K, max_rank=E)."""
    K, E = spec.top_k, spec.num_experts
    k_max = K if k_max is None else k_max
    max_rank = E if max_rank is None else max_rank
    toks = [token_scores(row, spec) for row in logits]
    ranks = [ranking(c) for c, _ in toks]
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
    loaded = set()
    for b, v in zip(base, valid):
        if v:
            loaded.update(b)
    out = []
    for (choice, gate), order, b in zip(toks, ranks, base):
        kept = list(b)
        for j in range(len(b), max_rank):  # j is the 0-based rank
            if len(kept) >= k_max:
                break
            e = order[j]
            if e in loaded and choice[e] != NEG_INF:
                kept.append(e)
        out.append(weights(gate, kept, spec, spec.renormalize))
    return out


def ref_sere(logits, spec, valid, sim, primary=2, threshold=0.1):
    """SERE re-routing, arXiv 2602.07616; duplicate experts' weights are summed."""
    K = spec.top_k
    sim = np.asarray(sim, dtype=np.float32)
    toks = [token_scores(row, spec) for row in logits]
    topk = [ranking(c)[:K] for c, _ in toks]
    P = set()
    for ids, v in zip(topk, valid):
        if v:
            P.update(ids[:primary])
    out = []
    for (choice, gate), ids in zip(toks, topk):
        w = weights(gate, ids, spec, spec.renormalize)
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


def ref_budget(logits, spec, valid, budget):
    """Batch-wide expert set under a budget (XShare-style), top-1 of every token guaranteed."""
    K = spec.top_k
    toks = [token_scores(row, spec) for row in logits]
    ranks = [ranking(c) for c, _ in toks]
    score = {}
    chosen = []
    for (choice, gate), order, v in zip(toks, ranks, valid):
        if not v:
            continue
        if order[0] not in chosen:
            chosen.append(order[0])
        top = order[:K]
        s = sum(gate[e] for e in top)
        for e in top:
            score[e] = score.get(e, 0.0) + gate[e] / s
    extra = sorted((e for e in score if e not in chosen and score[e] > 0), key=lambda e: (-score[e], e))
    chosen += extra[: max(0, budget - len(chosen))]
    out = []
    for (choice, gate), order in zip(toks, ranks):
        kept = [e for e in order if e in chosen and choice[e] != NEG_INF][:K]
        out.append(weights(gate, kept, spec, spec.renormalize))
    return out
