"""Expert parallelism on a routing trace: the slowest rank's distinct experts under each policy.

Under expert parallelism over D ranks (each holding E/D experts) a decode step's MoE layer takes as long
as its slowest rank, which reads the weights of its distinct experts that the batch uses. So what a
policy should lower is the max over ranks of distinct experts per layer and step (max-rank U), not U.
`ep_replay` replays a trace through each policy at each batch size once and counts, for every D and the
placement of experts on ranks, max-rank and mean-rank U (mean-rank = U / D: the max-rank U of a perfectly
even spread). `EPStepModel` (measure/costmodel.py) turns max-rank U into a predicted MoE-layer time.

E = experts, D = ranks, L = MoE layers, S = steps, B = decode batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..contract import Routing
from ..metrics import rank_unique, used_experts, used_slots
from ..placement import NAMES, check_placement, check_ranks, make_placement, read_placement_json
from ..policies import Policy, make_policy
from ..replicas import Replicas, eplb_replicas, parse_replicas
from ..traces import Trace, default_chunk_steps
from .costmodel import EPStepModel

DEFAULT_BATCH_SIZES = (16, 32, 64, 128, 256)
DEFAULT_RANKS = (8, 16, 32, 64)


def native_load(trace: Trace) -> torch.Tensor:
    """[L, E] float64: tokens the model's own routing sends to each expert over the whole trace, per MoE
    layer (valid tokens, each of its K experts counted once): the per-expert load an EPLB-like placement
    balances."""
    native = make_policy("native")
    rows = []
    for layer in trace.layers:
        spec = trace.specs[layer]
        r = native(trace.logits[layer].float(), spec, trace.valid, layer=trace.moe_layer(layer))
        ids = r.ids[r.valid]  # [N, K]
        rows.append(torch.bincount(ids.flatten(), minlength=spec.num_experts).double())
    return torch.stack(rows)


def placements(how: str, trace: Trace, ranks: Sequence[int], load: torch.Tensor | None = None,
               redundant: int = 0) -> dict[int, torch.Tensor | Replicas]:
    """{D: [L, E] placement} for "contiguous", "eplb" (from `load`, default the trace's own `native_load`)
    or a placement file (checked against every D). With `redundant` > 0 ("eplb" only) or a file of
    redundant experts: {D: `Replicas`}, vLLM's default EPLB over E + `redundant` slots for each D."""
    E = trace.specs[trace.layers[0]].num_experts
    L = len(trace.layers)
    if how == "eplb" and load is None:
        load = native_load(trace)
    if redundant:
        if how != "eplb":
            raise ValueError("redundant experts are placed by EPLB's rearrangement; give the eplb placement (or a "
                             "placement file that lists them)")
        return {D: eplb_replicas(load, D, redundant) for D in ranks}
    obj = None
    if how not in NAMES:  # a file, read once: redundant experts, or ranks checked against every D
        obj = read_placement_json(how)
        replicas = parse_replicas(obj, E, how)
        if replicas is not None:
            replicas.check_fits(E, None, L)
            if any(D != replicas.ranks for D in ranks):
                raise ValueError(f"{how} spreads its slots over {replicas.ranks} ranks; give --ep {replicas.ranks}")
            return {replicas.ranks: replicas}
    out = {}
    for D in ranks:
        p = make_placement(how, E, D, load=load, layers=L) if obj is None else check_placement(obj, E, D, how, L)
        if obj is not None:  # a file made for fewer ranks would leave ranks empty and count them as idle
            empty = sorted(set(range(D)) - set(p.flatten().tolist()))
            if empty:
                used = int(p.max()) + 1
                raise ValueError(f"{how} places experts on {D - len(empty)} of D={D} ranks (rank"
                                 f"{'s' * (len(empty) > 1)} {_ranks_text(empty)} hold{'s' * (len(empty) == 1)} none): "
                                 f"it was made for {used} ranks; give --ep {used}, or a placement for {D} ranks")
        out[D] = p.expand(L, E) if p.dim() == 1 else p
    return out


def _ranks_text(ranks: list[int]) -> str:
    """[2, 3, ..., 63] as "2..63" when consecutive, else the first few."""
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}..{ranks[-1]}"
    return ", ".join(map(str, ranks[:5])) + (", ..." if len(ranks) > 5 else "")


def dp_routings(policy: Policy, logits: torch.Tensor, valid: torch.Tensor, spec, moe_layer: int,
                dp: int = 1) -> list[Routing]:
    """Each data-parallel rank's routing of its B / dp consecutive tokens of every step ([S, B / dp, K]
    each), routed alone as its router would; dp = 1: the whole batch in one view."""
    S, B = valid.shape
    if dp < 1 or B % dp:
        raise ValueError(f"a batch of {B} tokens does not split into {dp} data-parallel ranks of equal size; give "
                         "batch sizes that are multiples of --dp")
    b = B // dp
    steps = default_chunk_steps(b, spec.num_experts)
    out = []
    for g in range(dp):
        parts = []
        for s0 in range(0, S, steps):
            x, v = logits[s0:s0 + steps, g * b:(g + 1) * b], valid[s0:s0 + steps, g * b:(g + 1) * b]
            if spec.scoring == "topk_softmax":
                x = x.float()
            parts.append(policy(x, spec, v, layer=moe_layer))
        out.append(Routing(torch.cat([r.weights for r in parts]), torch.cat([r.ids for r in parts]),
                           torch.cat([r.valid if r.valid is not None else torch.ones(r.ids.shape[:-1], dtype=torch.bool)
                                      for r in parts])))
    return out


def dp_experts(policy: Policy, logits: torch.Tensor, valid: torch.Tensor, spec, moe_layer: int,
                dp: int = 1) -> torch.Tensor:
    """[S, E] bool: the experts each step activates when its B tokens come from `dp` data-parallel ranks,
    B / dp consecutive tokens each, and each rank's policy sees its own tokens only (its router runs on its
    rank's batch); the experts the step needs are the union over the ranks. dp = 1: one view of the
    whole batch (what a policy given every rank's router logits, e.g. by an all-gather, would route)."""
    return torch.stack([used_experts(r, spec.num_experts)
                        for r in dp_routings(policy, logits, valid, spec, moe_layer, dp)]).any(dim=0)


def ep_replay(trace: Trace, policies: dict[str, Policy], batch_sizes: Sequence[int],
              by_ranks: dict[int, torch.Tensor | Replicas], step_model: EPStepModel | None = None,
              tick: Callable[[], None] | None = None, dp: int = 1) -> list[dict]:
    """One row per (batch size, D, policy): mean over the trace's steps and MoE layers of U, max-rank U
    and mean-rank U per layer and step, and with `step_model` the predicted MoE-layer time.

    by_ranks: {D: [L, E] placement, or `Replicas` (redundant experts: U per rank counts the physical slots
    each rank reads, each row hashed to its replica as vLLM does, rows numbered within their DP rank)}
    (`placements`). A step counts when it holds a valid token. The trace is re-batched to each batch size
    (`Trace.rebatch`); each policy routes every step once, and every D and placement is counted from its
    routing. `tick` is called after each (batch size, policy). dp > 1: each step's batch comes from `dp`
    data-parallel ranks, each routed alone (`dp_routings`).
    """
    E = trace.specs[trace.layers[0]].num_experts
    L = len(trace.layers)
    for D, p in by_ranks.items():
        if isinstance(p, Replicas):
            p.check_fits(E, D, L)
            continue
        check_ranks(E, D)
        if tuple(p.shape) != (L, E):
            raise ValueError(f"the placement for D={D} is {tuple(p.shape)}, not [L, E]=[{L}, {E}]")
    rows = []
    for B in batch_sizes:
        t = trace.rebatch(B)
        counted = t.valid.any(dim=-1)  # [S]: steps with a valid token
        if not bool(counted.any()):
            raise ValueError(f"at batch size {B} the trace holds no step with a valid token")
        stats: dict[str, dict[int, tuple[float, float]]] = {}
        unique: dict[str, float] = {}
        for label, policy in policies.items():
            routed = [dp_routings(policy, t.logits[layer], t.valid, t.specs[layer], t.moe_layer(layer), dp)
                      for layer in t.layers]  # L x dp x Routing
            used = [torch.stack([used_experts(r, E) for r in rs]).any(dim=0)[counted] for rs in routed]  # L x [S', E]
            unique[label] = _mean([u.sum(dim=-1).double().mean() for u in used])
            stats[label] = {}
            for D, p in by_ranks.items():
                if isinstance(p, Replicas):
                    slots = [torch.stack([used_slots(r, p, i if p.per_layer else None) for r in rs]).any(dim=0)[counted]
                             for i, rs in enumerate(routed)]  # L x [S', P]
                    per = [rank_unique(u, p.slot_ranks(), D) for u in slots]
                else:
                    per = [rank_unique(u, p[i], D) for i, u in enumerate(used)]  # L x [S', D]
                stats[label][D] = (_mean([c.amax(dim=-1).double().mean() for c in per]),
                                   _mean([c.double().mean() for c in per]))
            if tick:
                tick()
        for D in by_ranks:
            base = stats.get("native", {}).get(D)
            for label in policies:
                mx, mean = stats[label][D]
                row = {"batch": B, "ranks": D, "dp": dp, "policy": label, "unique": unique[label], "max_rank_unique": mx,
                       "mean_rank_unique": mean, "imbalance": mx / mean if mean > 0 else float("nan"),
                       "max_rank_vs_native": mx / base[0] if base and base[0] > 0 else None}
                if isinstance(by_ranks[D], Replicas):
                    row["slots"] = by_ranks[D].num_physical
                if step_model is not None:
                    row |= {"expert_ms": step_model.expert_ms(mx), "all_to_all_ms": step_model.all_to_all_ms(B),
                            "predicted_ms": step_model.predict_ms(mx, B)}
                    if base:
                        row["predicted_vs_native"] = row["predicted_ms"] / step_model.predict_ms(base[0], B)
                rows.append(row)
    return rows


def _mean(values: list[torch.Tensor]) -> float:
    return float(torch.stack(values).mean())


def table(rows: list[dict], placement: str) -> str:
    """Per D: each policy's max-rank U (mean-rank U) per layer and step at each batch size, then the
    predicted MoE-layer time in microseconds when the rows have it."""
    batches = sorted({r["batch"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    at = {(r["ranks"], r["policy"], r["batch"]): r for r in rows}
    blocks = []
    for D in sorted({r["ranks"] for r in rows}):
        lines = [f"D={D} ranks, {placement} placement: max-rank U (mean-rank U) per layer and step"]
        grid = [("policy", *(f"B={b}" for b in batches))]
        for label in policies:
            cells = [at[D, label, b] for b in batches]
            grid.append((label, *(f"{r['max_rank_unique']:.2f} ({r['mean_rank_unique']:.2f})" for r in cells)))
        lines.append(_grid(grid))
        if "predicted_ms" in rows[0]:
            lines.append(f"D={D}: predicted MoE-layer time, us (x native)")
            grid = [("policy", *(f"B={b}" for b in batches))]
            for label in policies:
                cells = []
                for b in batches:
                    r = at[D, label, b]
                    ratio = r.get("predicted_vs_native")
                    cells.append(f"{1e3 * r['predicted_ms']:.2f}" + (f" ({ratio:.2f})" if ratio is not None else ""))
                grid.append((label, *cells))
            lines.append(_grid(grid))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _grid(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def plot(rows: list[dict], path: Path, placement: str) -> Path:
    """Max-rank U against batch size, one panel per D, one line per policy (EP-aware options dashed); the
    grey dotted line is native's mean-rank U, an even spread of native's experts."""
    from .report import _legend, _plt, _save, style

    plt = _plt()
    ranks = sorted({r["ranks"] for r in rows})
    cols = min(2, len(ranks))
    nrows = -(-len(ranks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.6 * nrows), squeeze=False)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    for ax, D in zip(axes.flat, ranks):
        others: dict = {}
        for label in policies:
            pts = sorted((r["batch"], r["max_rank_unique"]) for r in rows if r["ranks"] == D and r["policy"] == label)
            colour, marker = style(label, others)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour, label=label,
                    lw=2 if label == "native" else 1, ls="--" if "ep=" in label or "placement=" in label else "-")
        nat = sorted((r["batch"], r["mean_rank_unique"]) for r in rows if r["ranks"] == D and r["policy"] == "native")
        if nat:
            ax.plot([p[0] for p in nat], [p[1] for p in nat], ls=":", color="grey", label="native mean-rank")
        xs = sorted({r["batch"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("decode batch size")
        ax.set_ylabel("max-rank distinct experts")
        ax.set_title(f"D={D} ranks, {placement} placement", fontsize=9)
        _legend(ax, fig)
    for ax in list(axes.flat)[len(ranks):]:
        ax.axis("off")
    return _save(fig, path)
