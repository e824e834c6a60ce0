"""A linear cost model of one MoE layer at decode, and what hardware and expert parallelism predict.

latency = b·U + a·(T·K) + c: reading the U activated experts' weights (b per expert), computing the
T·K token-expert slots (a per slot) and a fixed cost (c: dispatch, launches). Fitted by least squares
over measured (U, T·K, latency) points from several batch sizes and policies.

U = distinct experts of a decode step, T = tokens, K = slots per token, D = expert-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from ..contract import Routing
from ..metrics import default_placement, max_unique_per_rank, unique_experts_per_rank

# Peak HBM bandwidth in GB/s from the vendors' data sheets (SXM parts); "cpu" is measured on the spot.
HARDWARE_GBPS: dict[str, float | None] = {"h100": 3350.0, "h200": 4800.0, "a100": 2039.0, "cpu": None}
# GPU-to-GPU bandwidth in GB/s, one direction, from the data sheets: H100 SXM's NVLink 4 moves 900 GB/s
# both directions together, 450 each way.
LINK_GBPS: dict[str, float] = {"h100-nvlink": 450.0}


@dataclass(frozen=True)
class CostModel:
    """latency = b·U + a·slots + c, in the unit of the fitted latencies (ms for `bench_policies`).

    unidentified: coefficients the points cannot separate from the constant (all points share one U
    or one T·K); they are set to 0 and their cost is folded into c.
    """

    b: float
    a: float
    c: float
    r2: float
    mean_rel_err: float
    max_rel_err: float
    points: int
    unidentified: tuple[str, ...] = ()

    def predict(self, unique: float, slots: float) -> float:
        """Predicted latency of a step activating `unique` experts over `slots` = T·K token-expert pairs."""
        return self.b * unique + self.a * slots + self.c

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unidentified"] = list(self.unidentified)
        return d

    def describe(self, unit: str = "ms") -> str:
        text = (
            f"latency = {self.b:.4g} {unit}/expert * U + {self.a:.4g} {unit}/slot * T*K + {self.c:.4g} {unit}; "
            f"R^2 = {self.r2:.4f}, relative error mean {100 * self.mean_rel_err:.1f}% max "
            f"{100 * self.max_rel_err:.1f}% over {self.points} points"
        )
        if self.unidentified:
            text += f" ({', '.join(self.unidentified)} not identifiable from these points: set to 0, folded into c)"
        return text


def fit_cost_model(points: Iterable[tuple[float, float, float]]) -> CostModel:
    """Least-squares fit of latency = b·U + a·(T·K) + c to (U, T·K, latency) points.

    Give points of several batch sizes and policies: with a single T·K (or a single U) that term cannot
    be told apart from the constant and is reported as unidentified.
    """
    data = torch.tensor([tuple(map(float, p)) for p in points], dtype=torch.float64)  # [N, 3]
    if data.dim() != 2 or data.shape[-1] != 3:
        raise ValueError("cost-model points must be (U, T*K, latency) triples")
    if data.shape[0] < 2:
        raise ValueError(f"the cost model needs at least 2 measured points, got {data.shape[0]}")
    u, slots, y = data.unbind(-1)
    columns, names, unidentified = [], [], []
    for name, col in (("b", u), ("a", slots)):
        if float(col.max() - col.min()) <= 1e-12 * max(1.0, float(col.abs().max())):
            unidentified.append(name)
        else:
            columns.append(col)
            names.append(name)
    X = torch.stack([*columns, torch.ones_like(y)], dim=-1)  # [N, P]
    coef = torch.linalg.lstsq(X, y[:, None], driver="gelsd").solution[:, 0]
    values = dict(zip([*names, "c"], coef.tolist()))
    pred = X @ coef
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    scale = float((y**2).sum()) or 1.0
    if ss_tot > 1e-24 * scale:
        r2 = 1.0 - ss_res / ss_tot
    else:
        r2 = 1.0 if ss_res <= 1e-24 * scale else float("nan")
    rel = (pred - y).abs() / y.abs().clamp_min(torch.finfo(torch.float64).tiny)
    return CostModel(
        b=values.get("b", 0.0),
        a=values.get("a", 0.0),
        c=values["c"],
        r2=r2,
        mean_rel_err=float(rel.mean()),
        max_rel_err=float(rel.max()),
        points=int(data.shape[0]),
        unidentified=tuple(unidentified),
    )


def physical_warnings(model: CostModel) -> list[str]:
    """What makes a fit unphysical: a negative cost per expert, per slot or fixed. Every term is work
    the layer does, so a negative one says the points are noise or too few to separate the terms."""
    names = {"b": "per expert (b)", "a": "per token-expert slot (a)", "c": "fixed (c)"}
    bad = [f"{names[k]} = {getattr(model, k):.4g}" for k in ("b", "a", "c")
           if k not in model.unidentified and getattr(model, k) < 0]
    if not bad:
        return []
    return [f"the cost model is not physical: negative cost {', '.join(bad)}; the timings are noisy or the "
            "batch sizes too few to separate the terms: do not use its predictions (rerun with more --repeats "
            "and batch sizes, e.g. --batch-sizes 1,4,16,64, on an idle machine)"]


def bandwidth_bound_ms(unique: float, bytes_per_expert: int, gbps: float) -> float:
    """Time to read U experts' weights once at `gbps` GB/s: a lower bound on the layer's latency
    (it ignores compute, dispatch and launch costs and assumes peak bandwidth)."""
    if gbps <= 0:
        raise ValueError(f"bandwidth must be > 0 GB/s, got {gbps}")
    return unique * bytes_per_expert / (gbps * 1e9) * 1e3


def hardware_bound_ms(unique: float, bytes_per_expert: int, profile: str, measured_gbps: float | None = None) -> float:
    """`bandwidth_bound_ms` on a named profile (h100, h200, a100, or cpu with its measured bandwidth)."""
    if profile not in HARDWARE_GBPS:
        raise ValueError(f"unknown hardware profile {profile!r}; known: {', '.join(HARDWARE_GBPS)}")
    gbps = HARDWARE_GBPS[profile]
    if gbps is None:
        if measured_gbps is None:
            raise ValueError(f"profile {profile!r} uses the measured bandwidth; pass measured_gbps (measure_bandwidth)")
        gbps = measured_gbps
    return bandwidth_bound_ms(unique, bytes_per_expert, gbps)


def ep_max_unique(routing: Routing, num_experts: int, ranks: int) -> int:
    """Under expert parallelism over D ranks (contiguous expert blocks) the busiest rank's U."""
    return int(max_unique_per_rank(routing, num_experts, ranks))


def ep_predict(routing: Routing, num_experts: int, ranks: int, model: CostModel) -> float:
    """Predicted step latency under expert parallelism over D ranks (contiguous expert blocks): each
    rank costs `model.predict(U_rank, slots_rank)` on its own experts and the step waits for the slowest."""
    per_rank_u = unique_experts_per_rank(routing, num_experts, ranks)  # [D]
    placement = default_placement(num_experts, ranks, routing.ids.device)  # [E]
    valid = routing.valid if routing.valid is not None else torch.ones(routing.num_tokens, dtype=torch.bool)
    rank_of_slot = placement[routing.ids][valid.to(routing.ids.device)]  # [T_valid, K]
    per_rank_slots = torch.bincount(rank_of_slot.flatten(), minlength=ranks)  # [D]
    return max(model.predict(float(u), float(s)) for u, s in zip(per_rank_u.tolist(), per_rank_slots.tolist()))


@dataclass(frozen=True)
class EPStepModel:
    """One MoE layer's decode step under expert parallelism, bandwidth-bound:

        time = max-rank U x bytes_per_expert / HBM bandwidth + T x hidden x act_bytes x 2 / link bandwidth

    The first term is the slowest rank reading its distinct experts' weights (the step waits for it); the
    second is the all-to-all that sends each token's hidden state to the experts' ranks and back (dispatch
    and combine), the same for every policy at a batch size. Both are lower bounds at peak bandwidth
    (no compute, launch or latency cost). Defaults: an H100 SXM (HBM 3350 GB/s, NVLink 450 GB/s each way),
    bfloat16 activations.
    """

    bytes_per_expert: int
    hidden: int
    act_bytes: int = 2
    hbm_gbps: float = HARDWARE_GBPS["h100"]
    link_gbps: float = LINK_GBPS["h100-nvlink"]

    def __post_init__(self) -> None:
        for name in ("bytes_per_expert", "hidden", "act_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("hbm_gbps", "link_gbps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
                raise ValueError(f"{name} must be a bandwidth > 0 GB/s, got {v!r}")

    def expert_ms(self, max_unique: float) -> float:
        """The slowest rank reading `max_unique` experts' weights."""
        return bandwidth_bound_ms(max_unique, self.bytes_per_expert, self.hbm_gbps)

    def all_to_all_ms(self, tokens: float) -> float:
        """Dispatch and combine of `tokens` hidden states."""
        return tokens * self.hidden * self.act_bytes * 2 / (self.link_gbps * 1e9) * 1e3

    def predict_ms(self, max_unique: float, tokens: float) -> float:
        """Predicted MoE-layer time of a step: `expert_ms` + `all_to_all_ms`."""
        return self.expert_ms(max_unique) + self.all_to_all_ms(tokens)

    def describe(self) -> str:
        return (f"MoE layer ms = max-rank U x {self.bytes_per_expert / 1e6:.2f} MB / {self.hbm_gbps:g} GB/s + "
                f"T x {self.hidden} x {self.act_bytes} B x 2 / {self.link_gbps:g} GB/s")
