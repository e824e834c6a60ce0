"""Batch-wide set rules tried on the way to `gain`: held-out Δ CE and U of each on the reference model.

Every rule picks one expert set S per layer and decode step, then each token routes to its best K experts
within S (as `budget` and `gain` do); they differ only in how S is chosen:
  count     `budget`'s rule: each token's top-1, then the experts with most native top-K gate mass
  cover     the same order, but as many experts as it takes to keep a share r of the batch's native top-K
            mass (a set size that follows the batch instead of a fixed count)
  greedy    grown one expert at a time by the rise in the tokens' kept mass (what `gain` does), with the
            utility of a token's kept mass R: "lin" (R), "log" (log R: `gain`), "sq" (-(1 - R)^2)
  norenorm  `count`, with each token's weights left as its raw probabilities instead of renormalised
Layer 0 (the first MoE layer) stays native unless a rule names it; the other three take the setting.

    python benchmarks/set_rules.py                         # validation part, mixed batches of 16
    python benchmarks/set_rules.py --batching same-domain
Prints one line per rule and, last, one JSON line with every result. About 10 s per rule on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moe_reroute import reference
from moe_reroute.measure.evaluate import batch_order, domain_sequences
from moe_reroute.measure.tune import Forwards
from moe_reroute.policies.budget import Budget, BudgetConfig
from moe_reroute.reference.card import domain_streams
from moe_reroute.scoring import (finish, native_where_fixed, native_where_unchanged, pack, rank, ranked_native,
                                 sanitize, score, weights_for)

B = 16


class SetRule(Budget):
    """One experimental set rule per MoE layer: ("native",), ("count", n), ("cover", r), ("greedy", n)."""

    def __init__(self, rules, renorm=True, utility="log", base=1):
        super().__init__(BudgetConfig(budget=1), backend="torch")
        self.rules, self.renorm, self.utility, self.base = rules, renorm, utility, base

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None):
        K, E = spec.top_k, spec.num_experts
        s = score(sanitize(router_logits, valid), spec, self.ties, native)
        nat = ranked_native(s)[0]  # [S, T, K]
        order = rank(s.choice, nat, self.ties)  # [S, T, E]
        rule = self.rules[layer]
        if rule[0] == "native":
            return finish(s.native_ids, s.native_w, valid, s)
        in_set = (self._greedy if rule[0] == "greedy" else self._by_mass)(s, nat, valid, rule, E)  # [S, E]
        allowed = in_set[..., None, :].expand(order.shape).gather(-1, order) & torch.isfinite(s.choice.gather(-1, order))
        keep = allowed & (allowed.cumsum(-1) <= K)
        ids, kept = pack(order, keep, K)
        w = weights_for(s.gate, ids, kept, spec, self.renorm)
        ids, w = native_where_unchanged(s, ids, kept, w)
        return finish(*native_where_fixed(s, ids, w, fixed, valid), valid, s)

    def count_unique(self, router_logits, spec, valid, config, layer, fixed=None):
        from moe_reroute.policies.base import Policy
        return Policy.count_unique(self, router_logits, spec, valid, config, layer, fixed)

    def _forced(self, nat, valid, E):
        top = nat[..., : self.base]
        hits = valid[..., None].expand(top.shape).flatten(-2).double()
        return torch.zeros(*nat.shape[:-2], E, dtype=torch.float64).scatter_add_(-1, top.flatten(-2), hits) > 0

    def _by_mass(self, s, nat, valid, rule, E):
        mass = s.gate.gather(-1, nat).double()
        mass = mass / mass.sum(-1, keepdim=True) * valid[..., None]
        mass_e = torch.zeros(*nat.shape[:-2], E, dtype=torch.float64).scatter_add_(-1, nat.flatten(-2), mass.flatten(-2))
        forced = self._forced(nat, valid, E)
        order = torch.sort(torch.where(forced, 1e9, mass_e), dim=-1, descending=True, stable=True)[1]
        nf = forced.sum(-1, keepdim=True)
        if rule[0] == "count":
            n = nf.clamp_min(int(rule[1]))
        else:
            cum = mass_e.gather(-1, order).cumsum(-1)
            n = torch.maximum((cum < rule[1] * mass_e.sum(-1, keepdim=True) - 1e-9).sum(-1, keepdim=True) + 1, nf)
        return torch.zeros_like(forced).scatter(-1, order, torch.arange(E) < n)

    def _u(self, r):
        if self.utility == "log":
            return torch.log(r.clamp_min(1e-12))
        if self.utility == "sq":
            return -(1 - r).clamp_min(0) ** 2
        return r

    def _greedy(self, s, nat, valid, rule, E):
        K = nat.shape[-1]
        p = s.gate.double() / s.gate.double().gather(-1, nat).sum(-1, keepdim=True) * valid[..., None]  # [S, T, E]
        in_set = self._forced(nat, valid, E)
        for _ in range(int(rule[1])):
            top = torch.where(in_set[..., None, :], p, -1.0).topk(K, dim=-1)[0]  # [S, T, K]
            theta = top[..., -1:].clamp_min(0)
            kept = top.clamp_min(0).sum(-1, keepdim=True)
            gain = ((self._u(kept + (p - theta).clamp_min(0)) - self._u(kept)) * valid[..., None]).sum(-2)
            best = gain.masked_fill(in_set, float("-inf")).argmax(-1, keepdim=True)
            grow = in_set.sum(-1, keepdim=True) < int(rule[1])
            in_set = in_set | (torch.zeros_like(in_set).scatter(-1, best, True) & grow)
        return in_set


def cases():
    """(label, rules, options): every rule at settings of matching U."""
    N = ("native",)
    out = []
    for n in (45, 38, 32, 26):
        out.append((f"count {n}", [N] + [("count", n)] * 3, {}))
    out.append(("norenorm count 45,38,45", [N, ("count", 45), ("count", 38), ("count", 45)], {"renorm": False}))
    out.append(("count 45,38,45", [N, ("count", 45), ("count", 38), ("count", 45)], {}))
    for r in (0.85, 0.8, 0.75, 0.7):
        out.append((f"cover {r}", [N] + [("cover", r)] * 3, {}))
    for utility in ("lin", "log", "sq"):
        for n in (38, 32):
            out.append((f"greedy-{utility} {n}", [N] + [("greedy", n)] * 3, {"utility": utility}))
    for n in (38, 32, 26):
        out.append((f"greedy-log base=2 {n}", [N] + [("greedy", n)] * 3, {"base": 2}))
    for n in (64, 48):
        out.append((f"layer 0 only: count {n}", [("count", n), N, N, N], {}))
        out.append((f"layer 0 only: greedy-log {n}", [("greedy", n), N, N, N], {}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batching", default="mixed", choices=["mixed", "same-domain"])
    ap.add_argument("--part", default="validation", choices=["validation", "tuning"])
    ap.add_argument("--sequences", type=int, default=112)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok, _ = reference.load()
    seqs, labels = domain_sequences(domain_streams(tok, reference.heldout_documents(part=args.part)), 128, args.sequences)
    seqs = seqs[batch_order(labels, B, args.batching)]
    fw = Forwards(model, seqs)
    fw.native()
    native_u = sum(fw.native_unique(torch.arange(len(seqs)), B)) / 4
    print(f"native U {native_u:.1f} ({args.part} part, {args.batching} batches of {B}, {len(seqs)} sequences of 128)")
    results = []
    for label, rules, opts in cases():
        started = time.time()
        d, u, positions = 0.0, [0.0] * 4, 0
        for g in range(0, len(seqs) // B * B, B):
            r = fw.run(torch.arange(g, g + B), SetRule(rules, **opts), 0)
            d, positions = d + r["d_ce"], positions + r["positions"]
            u = [a + b for a, b in zip(u, r["unique"])]
        mean_u = sum(u) / 4 / positions
        results.append({"rule": label, "delta_ce": d / (len(seqs) // B * B), "unique": mean_u, "x_native": mean_u / native_u})
        print(f"{label}: U {mean_u:.1f} ({mean_u / native_u:.2f}x)  Δ CE {results[-1]['delta_ce']:+.4f}  "
              f"{time.time() - started:.0f} s", flush=True)
    print(json.dumps({"native_unique": native_u, "batching": args.batching, "part": args.part, "results": results}))


if __name__ == "__main__":
    main()
