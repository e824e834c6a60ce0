"""`moe-reroute tune`: the cheapest per-layer, per-batch-size setting of one policy family within a
quality budget, written as a policy file engines load.

A setting is one value of the family's tunable parameter per MoE layer (oea k0, cap k, sere primary,
budget and gain budget). It is evaluated as `moe-reroute eval` does: calibration sequences of L tokens, B at a
time, through teacher-forced forwards with the policy in `phase="decode-sim"` (each position's B tokens
route as one decode batch). Its quality is the mean paired difference of next-token cross-entropy to
native routing over the sequences (nats; what must fit the budget is its one-sided upper confidence bound,
`TuneConfig.confidence`), or its top-1 agreement with native; its cost the predicted
MoE time, the sum over layers of b*U + a*B*k (the bench's cost model, k = experts kept per token), or
the sum of U with `objective="experts"`.

Search, per batch size B (each evaluation cached, and kept in the state file so that an interrupted
search resumes where it stopped):
1. Native forwards once per sequence (native routing is per token, so they hold at every B), keeping
   every decoder layer's output: a setting that routes layers below some layer natively is evaluated
   from that layer up, without recomputing the layers below.
2. Uniform: the same value on every layer, lowered step by step while the budget holds: the best uniform
   setting, the baseline the tuned one must beat.
3. Sensitivity: each MoE layer alone lowered (the others native), value by value until it alone breaks
   the budget: each layer's cost and quality loss at each value.
4. Allocation: the values that minimise the summed cost with the summed losses within the budget (a
   multiple-choice knapsack, solved exactly by dynamic programming over the loss), then evaluated jointly;
   losses do not add exactly, so the knapsack's budget is rescaled by measured/predicted and the
   allocation re-solved and re-evaluated, a few rounds.
5. Refinement: single-layer lowerings of the best setting, the most promising first, a few evaluations.
The cheapest setting found within budget (never worse than the best uniform one) is the tuned one.
The tuned settings of all batch sizes go into one policy file: a step of T tokens takes the setting
tuned at the largest tuned batch size <= T (the smallest below it), through `by_batch` buckets.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import RouterSpec, Routing
from ..metrics import experts_per_token
from ..policies import Policy
from ..progress import progress as progress_bar

TUNABLE = {"oea": "k0", "cap": "k", "sere": "primary", "budget": "budget", "gain": "budget"}
OBJECTIVES = ("time", "experts")
STATE_FORMAT = "moe_reroute.tune-state/3"
MIN_BOUND_SEQUENCES = 16  # calibration sequences at a batch size below which a confidence bound is refused
DP_STEPS = 400  # resolution of the knapsack's loss axis


@dataclass(frozen=True)
class TuneConfig:
    """What to tune and within what.

    family: oea | cap | sere | budget | gain. budget: the largest increase of cross-entropy over native allowed
    (nats, > 0); or `agreement`: the smallest top-1 agreement with native allowed (0..1).
    confidence: with a budget, what must fit it is the one-sided `confidence` upper bound of the mean
    increase over the calibration sequences (mean + z * standard error, z the normal quantile), so that
    text the search never saw, which costs more than the calibration sample, still fits; 0: the mean.
    objective: "time" (b*U + a*B*k per layer, `cost_b`/`cost_a` in any one unit) or "experts" (sum of U).
    params: the family's other parameters, fixed, as a policy file writes them (e.g. {"p": 0.9} for oea,
    {"similarity": "sim.safetensors"} for sere). rounds: joint evaluations of the allocation step;
    refine: evaluations of the refinement step.
    """

    family: str
    budget: float | None = 0.01
    agreement: float | None = None
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    objective: str = "time"
    cost_b: float = 1.0
    cost_a: float = 0.0
    params: dict = field(default_factory=dict)
    rounds: int = 6
    refine: int = 8
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.family not in TUNABLE:
            known = ", ".join(TUNABLE)
            from ..policies import POLICIES

            why = ("it has no tunable parameter" if self.family == "native" else
                   "tune has no parameter grid for it yet" if self.family in POLICIES else "it is not a policy family")
            raise ValueError(f"cannot tune {self.family!r}: {why}; tune one of {known}")
        if (self.budget is None) == (self.agreement is None):
            raise ValueError("give a quality budget (mean cross-entropy increase in nats) or an agreement floor, "
                             "not both and not neither")
        if self.budget is not None and (not isinstance(self.budget, (int, float)) or not math.isfinite(self.budget)
                                        or self.budget <= 0):
            raise ValueError(f"the quality budget is a mean cross-entropy increase over native in nats, a number "
                             f"> 0 (e.g. 0.01; a budget of 0 would allow only settings that never change a "
                             f"prediction's loss); got {self.budget!r}")
        if not (isinstance(self.confidence, (int, float)) and 0.0 <= self.confidence < 1.0):
            raise ValueError(f"the confidence of the budget's bound is in [0, 1) (e.g. 0.95; 0: the mean); "
                             f"got {self.confidence!r}")
        if self.agreement is not None and not (isinstance(self.agreement, (int, float)) and 0.0 <= self.agreement <= 1.0):
            raise ValueError(f"the agreement floor is a top-1 agreement with native in [0, 1] (e.g. 0.95); "
                             f"got {self.agreement!r}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be integers >= 1, got {self.batch_sizes}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not (self.cost_b >= 0 and self.cost_a >= 0 and self.cost_b + self.cost_a > 0):
            raise ValueError(f"cost coefficients b={self.cost_b}, a={self.cost_a} must be >= 0 and not both 0")
        if self.rounds < 1 or self.refine < 0:
            raise ValueError(f"rounds must be >= 1 and refine >= 0, got {self.rounds} and {self.refine}")
        if self.parameter in self.params:
            raise ValueError(f"{self.parameter} is what tune searches for {self.family}; do not fix it")
        for name, value in self.params.items():
            try:
                json.dumps(value)
            except TypeError:
                raise ValueError(f"{self.family} parameter {name} must be what a policy file can hold (a number, "
                                 f"list or string; a similarity as a file path), got a {type(value).__name__}") from None

    @property
    def parameter(self) -> str:
        return TUNABLE[self.family]

    def z(self) -> float:
        """The normal quantile of `confidence` the bound adds standard errors by (0 without a bound)."""
        if self.budget is None or self.confidence <= 0:
            return 0.0
        from statistics import NormalDist

        return NormalDist().inv_cdf(self.confidence)

    def loss_limit(self) -> float:
        """The budget in loss terms: delta CE in nats, or disagreement (1 - agreement)."""
        return self.budget if self.budget is not None else 1.0 - self.agreement


def value_grid(family: str, spec: RouterSpec) -> list[int]:
    """The values the tunable parameter may take, the first (native routing) first, cheapest last."""
    K, E = spec.top_k, spec.num_experts
    if family not in ("budget", "gain"):
        return list(range(K, 0, -1))
    fractions = (1.0, 0.85, 0.7, 0.6, 0.5, 0.42, 0.35, 0.3, 0.25, 0.2, 0.16, 0.12, 0.1, 0.08, 0.06, 0.04)
    return sorted({max(K, min(E, round(E * f))) for f in fractions}, reverse=True)


@dataclass
class Point:
    """An evaluated setting: its values per MoE layer, quality and cost."""

    values: tuple[int, ...]
    delta_ce: float
    agreement: float
    unique: list[float]  # mean U per MoE layer
    kept: list[float]  # mean experts per token per MoE layer
    cost: float
    loss: float  # delta_ce (plus z standard errors under a confidence bound), or 1 - agreement
    delta_ce_se: float = 0.0  # standard error of delta_ce over the calibration sequences

    def describe_loss(self, config: TuneConfig) -> str:
        """The loss as the log prints it: "loss bound +0.0083 (mean +0.0008)" under a confidence bound,
        "loss +0.0008" without one, "disagreement 0.0400" under an agreement floor."""
        if config.budget is None:
            return f"disagreement {self.loss:.4f}"
        if config.z() > 0:
            return f"loss bound {self.loss:+.4f} (mean {self.delta_ce:+.4f})"
        return f"loss {self.loss:+.4f}"

    def to_dict(self) -> dict:
        return {"values": list(self.values), "delta_ce": self.delta_ce, "delta_ce_se": self.delta_ce_se,
                "loss": self.loss, "agreement": self.agreement,
                "unique_per_layer": self.unique, "mean_unique": sum(self.unique) / len(self.unique),
                "experts_per_token": self.kept, "cost": self.cost}


class Forwards:
    """Teacher-forced forwards of the calibration sequences, native ones cached per decoder layer.

    `native()` runs every sequence once with native routing and keeps its cross-entropy, top-1 tokens,
    native top-K per MoE layer (U at any batch size follows from them), and the output of every decoder
    layer; `run(rows, policy, start)`
    evaluates a policy on the sequences `rows` (one decode batch), taking the native outputs of the
    decoder layers below `start` instead of recomputing them (their routing is native under the policy).
    """

    def __init__(self, model: nn.Module, sequences: torch.Tensor, chunk: int = 16) -> None:
        from ..hf.apply import decoder, moe_routers

        self.model = model
        self.sequences = sequences  # [N, L]
        self.layers = decoder(model).layers
        self.moe = [i for i, _ in moe_routers(model)]  # decoder-layer index of each MoE layer
        self.spec = RouterSpec.from_config(model.config)
        self.chunk = chunk
        self.outputs: list[torch.Tensor] | None = None  # per decoder layer [N, L, H]
        self.ce = self.top1 = None
        self.native_ids: list[torch.Tensor] = []  # per MoE layer [N, L, K], by native()
        self.reusable = True

    def native(self) -> None:
        if self.outputs is not None:
            return
        N = self.sequences.shape[0]
        outs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        ce, top1 = [], []

        def keep(j):
            def hook(module, args, output):
                if isinstance(output, torch.Tensor):
                    outs[j].append(output.detach())
                else:
                    self.reusable = False  # an architecture whose layers return more than hidden states
            return hook

        from ..hf import Recorder

        native_ids: list[list[torch.Tensor]] = [[] for _ in self.moe]
        handles = [layer.register_forward_hook(keep(j)) for j, layer in enumerate(self.layers)]
        try:
            with Recorder(self.model, keep="routing") as rec:
                for g in range(0, N, self.chunk):
                    batch = self.sequences[g : g + self.chunk]
                    logits = self.model(input_ids=batch, use_cache=False).logits.float()
                    c, t = _ce_top1(logits, batch)
                    ce.append(c)
                    top1.append(t)
                    for m, layer in enumerate(self.moe):
                        native_ids[m].append(rec.steps[-1].layers[layer].native_ids.view(*batch.shape, -1))
        finally:
            for h in handles:
                h.remove()
        self.ce, self.top1 = torch.cat(ce), torch.cat(top1)  # [N], [N, L-1]
        self.native_ids = [torch.cat(x) for x in native_ids]  # per MoE layer [N, L, K]
        self.outputs = [torch.cat(o) for o in outs] if self.reusable else None

    def native_unique(self, order: torch.Tensor, B: int) -> list[float]:
        """Mean native U per MoE layer at batch size B (sequences `order`, B consecutive ones a batch)."""
        self.native()
        E = self.spec.num_experts
        out = []
        for ids in self.native_ids:  # [N, L, K]
            used = torch.zeros(len(order) // B, B, ids.shape[1], E, dtype=torch.bool)
            used.scatter_(3, ids[order[: len(order) // B * B]].view(*used.shape[:3], -1), True)
            out.append(used.any(dim=1).sum(dim=-1).double().mean().item())  # U of each batch's positions
        return out

    @contextmanager
    def _skipping(self, rows: torch.Tensor, start: int):
        """Decoder layers below `start` return their cached native outputs for the sequences `rows`."""
        if not self.reusable or self.outputs is None:
            start = 0
        patched = []
        try:
            for j in range(start):
                out = self.outputs[j][rows]
                self.layers[j].forward = lambda *a, _out=out, **k: _out
                patched.append(self.layers[j])
            yield
        finally:
            for layer in patched:
                del layer.forward

    def _from(self, rows: torch.Tensor, start: int) -> torch.Tensor:
        with self._skipping(rows, start):
            return self.model(input_ids=self.sequences[rows], use_cache=False).logits.float()

    def run(self, rows: torch.Tensor, policy: Policy, start_moe: int) -> dict:
        """Sums over the sequences `rows` (one decode batch) of the policy's delta CE and agreement, and per
        MoE layer (from `start_moe` up; below it, native) the sums of U over positions and of experts per token."""
        from ..hf import Recorder, apply

        self.native()
        with Recorder(self.model, keep="routing") as rec, apply(self.model, policy, phase="decode-sim"):
            logits = self._from(rows, self.moe[start_moe])
        ce, top1 = _ce_top1(logits, self.sequences[rows])
        step = rec.steps[-1]
        unique, kept = [], []
        for m, layer in enumerate(self.moe):
            r = step.layers.get(layer)
            if m < start_moe or r is None:
                unique.append(None)
                kept.append(None)
                continue
            unique.append(r.unique.double().sum().item())
            kept.append(experts_per_token(Routing(r.weights, r.ids, None)).double().sum().item())
        d = ce - self.ce[rows]
        return {"d_ce": d.sum().item(), "d_ce_sq": (d * d).sum().item(), "agree": (top1 == self.top1[rows]).double().mean(-1).sum().item(),
                "unique": unique, "kept": kept, "positions": step.layers[self.moe[-1]].unique.numel(),
                "tokens": logits.shape[0] * logits.shape[1]}


def _ce_top1(logits: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean next-token cross-entropy [B] (float64) and the top-1 predictions [B, L-1]."""
    logp = F.log_softmax(logits[:, :-1], dim=-1)  # [B, L-1, V]
    ce = -logp.gather(-1, batch[:, 1:, None])[..., 0].double().mean(-1)
    return ce, logp.argmax(-1)


class Search:
    """The search at one batch size: evaluations cached by setting (and saved to the state file)."""

    def __init__(self, forwards: Forwards, order: torch.Tensor, B: int, config: TuneConfig,
                 build: Callable[[list[int]], Policy], cache: dict[str, dict], save: Callable[[], None],
                 log: Callable[[str], None], tick: Callable[[], None]) -> None:
        self.fw, self.B, self.config = forwards, B, config
        self.grid = value_grid(config.family, forwards.spec)
        self.num_layers = len(forwards.moe)
        self.build, self.cache, self.save, self.log, self.tick = build, cache, save, log, tick
        n = len(order) // B * B
        if n < B or n < 2:
            raise ValueError(f"batch size {B} needs at least {max(2, B)} calibration sequences, got {len(order)}; "
                             "give more calibration text, more --sequences, a smaller --seq-len or smaller batch sizes")
        self.batches = [order[g : g + B] for g in range(0, n, B)]
        self.z = config.z()
        self.native_values = (self.grid[0],) * self.num_layers
        if "native_unique" not in cache:
            cache["native_unique"] = forwards.native_unique(order[:n], B)
        self.native_unique = cache["native_unique"]
        K = float(forwards.spec.top_k)
        self.native = self._point(self.native_values, 0.0, 1.0, list(self.native_unique), [K] * self.num_layers)
        self.evaluations = 0

    def layer_cost(self, u: float, k: float) -> float:
        if self.config.objective == "experts":
            return u
        return self.config.cost_b * u + self.config.cost_a * self.B * k

    def _point(self, values, d_ce, agree, unique, kept, se: float = 0.0) -> Point:
        cost = sum(self.layer_cost(u, k) for u, k in zip(unique, kept))
        loss = d_ce + self.z * se if self.config.budget is not None else 1.0 - agree
        return Point(tuple(values), d_ce, agree, unique, kept, cost, loss, se)

    def evaluate(self, values: tuple[int, ...]) -> Point:
        values = tuple(int(v) for v in values)
        if values == self.native_values:
            return self.native
        key = ",".join(map(str, values))
        hit = self.cache.setdefault("points", {}).get(key)
        if hit is None:
            start = next(m for m, v in enumerate(values) if v != self.grid[0])
            policy = self.build(list(values))
            d_ce = d_ce_sq = agree = 0.0
            unique = [0.0] * self.num_layers
            kept = [0.0] * self.num_layers
            positions = tokens = 0
            for rows in self.batches:
                r = self.fw.run(rows, policy, start)
                d_ce += r["d_ce"]
                d_ce_sq += r["d_ce_sq"]
                agree += r["agree"]
                positions += r["positions"]
                tokens += r["tokens"]
                for m in range(start, self.num_layers):
                    unique[m] += r["unique"][m]
                    kept[m] += r["kept"][m]
            n = sum(len(b) for b in self.batches)
            K = float(self.fw.spec.top_k)
            var = max(0.0, (d_ce_sq - d_ce * d_ce / n) / (n - 1))  # per-sequence variance of delta CE
            hit = {"delta_ce": d_ce / n, "delta_ce_se": math.sqrt(var / n), "agreement": agree / n,
                   "unique": [self.native_unique[m] if m < start else unique[m] / positions
                              for m in range(self.num_layers)],
                   "kept": [K if m < start else kept[m] / tokens for m in range(self.num_layers)]}
            self.cache["points"][key] = hit
            self.evaluations += 1
            self.save()
            self.tick()
        return self._point(values, hit["delta_ce"], hit["agreement"], hit["unique"], hit["kept"], hit["delta_ce_se"])

    def fits(self, p: Point) -> bool:
        return p.loss <= self.config.loss_limit()

    def best_uniform(self) -> Point:
        best = self.native
        for v in self.grid[1:]:
            p = self.evaluate((v,) * self.num_layers)
            if not self.fits(p):
                break
            if p.cost < best.cost:
                best = p
        return best

    def sensitivity(self) -> list[list[tuple[int, float, float]]]:
        """Per MoE layer: (value, that layer's cost, loss) for each value tried with the other layers native,
        native first, until the layer alone breaks the budget (that value included, marked by its loss)."""
        table = []
        for m in range(self.num_layers):
            u, k = self.native_unique[m], float(self.fw.spec.top_k)
            options = [(self.grid[0], self.layer_cost(u, k), 0.0)]
            for v in self.grid[1:]:
                values = list(self.native_values)
                values[m] = v
                p = self.evaluate(tuple(values))
                options.append((v, self.layer_cost(p.unique[m], p.kept[m]), p.loss))
                if not self.fits(p):
                    break
            table.append(options)
        return table

    def allocate(self, table, limit: float) -> tuple[int, ...]:
        """The values minimising the summed layer cost with summed (clipped at 0) losses <= limit."""
        if limit <= 0:
            return tuple(min((o for o in opts if o[2] <= 0), key=lambda o: o[1])[0] for opts in table)
        unit = limit / DP_STEPS
        INF = math.inf
        best = [0.0] * (DP_STEPS + 1)  # best[c]: least cost of the layers so far with loss <= c units
        choice = []
        for opts in table:
            new = [INF] * (DP_STEPS + 1)
            pick = [None] * (DP_STEPS + 1)
            for c in range(DP_STEPS + 1):
                for v, cost, loss in opts:
                    need = math.ceil(max(loss, 0.0) / unit - 1e-9)
                    if need > c or best[c - need] == INF:
                        continue
                    total = best[c - need] + cost
                    if total < new[c]:
                        new[c], pick[c] = total, (v, c - need)
            best = new
            choice.append(pick)
        c = DP_STEPS
        values = []
        for pick in reversed(choice):
            v, c = pick[c]
            values.append(v)
        return tuple(reversed(values))

    def run(self) -> tuple[Point, Point]:
        """(best uniform, tuned) within budget."""
        self.log(f"batch {self.B}: {len(self.batches)} decode batches; uniform settings")
        uniform = self.best_uniform()
        self.log(f"batch {self.B}: best uniform {self.config.parameter}={uniform.values[0]} "
                 f"U {_mean(uniform.unique):.1f} (native {_mean(self.native_unique):.1f}) "
                 f"{uniform.describe_loss(self.config)}")
        self.log(f"batch {self.B}: sensitivity, {self.num_layers} layers one at a time")
        table = self.sensitivity()
        self.log(f"batch {self.B}: allocation")
        best = uniform
        limit = self.config.loss_limit()
        target = limit
        for _ in range(self.config.rounds):
            p = self.evaluate(self.allocate(table, target))
            if self.fits(p) and p.cost < best.cost:
                best = p
                self._running(best, "allocation")
            scale = 2.0 if p.loss <= 0 else limit / p.loss if self.fits(p) else min(0.9, limit / p.loss)
            new_target = target * max(0.25, min(4.0, scale))
            if abs(new_target - target) <= 0.02 * target:
                break
            target = new_target
        return uniform, self.refine(best, table)

    def refine(self, best: Point, table) -> Point:
        """Lower one layer of `best` by one value at a time, the least predicted loss per cost saved first
        (from the sensitivity table), at most `config.refine` new evaluations."""
        left = self.config.refine
        while left > 0:
            moves = []
            for m, v in enumerate(best.values):
                i = self.grid.index(v)
                if i + 1 >= len(self.grid):
                    continue
                lower = self.grid[i + 1]
                known = {o[0]: o for o in table[m]}
                saved = known[v][1] - known[lower][1] if v in known and lower in known else 0.0
                ratio = (known[lower][2] - known[v][2]) / saved if saved > 0 else math.inf
                moves.append((ratio, m, tuple(lower if j == m else x for j, x in enumerate(best.values))))
            improved = False
            for _, _, values in sorted(moves):
                if left <= 0:
                    break
                left -= ",".join(map(str, values)) not in self.cache.get("points", {})
                p = self.evaluate(values)
                if self.fits(p) and p.cost < best.cost:
                    best, improved = p, True
                    self._running(best, "refinement")
                    break
            if not improved:
                break
        return best

    def _running(self, p: Point, how: str) -> None:
        self.log(f"batch {self.B}: best so far ({how}) {self.config.parameter}={list(p.values)} "
                 f"U {_mean(p.unique):.1f} {p.describe_loss(self.config)}")


def check_bound(config: TuneConfig, num_sequences: int) -> None:
    """ValueError unless every batch size of `config` has the MIN_BOUND_SEQUENCES calibration sequences its
    confidence bound needs (batches are whole: batch size B uses N // B * B of N sequences). A batch size
    with fewer sequences than one batch is left to `Search`, which says so."""
    if config.z() <= 0:
        return
    for B in sorted(set(int(b) for b in config.batch_sizes)):
        n = num_sequences // B * B
        if n >= max(B, 2) and n < MIN_BOUND_SEQUENCES:
            raise ValueError(f"the budget's {config.confidence:.0%} bound needs at least {MIN_BOUND_SEQUENCES} "
                             f"calibration sequences at each batch size; batch size {B} uses {n} of "
                             f"{num_sequences}. Give more calibration text or --sequences, a smaller --seq-len, or "
                             "--confidence 0 (the mean)")


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def text_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def tune(model: nn.Module, sequences: torch.Tensor, config: TuneConfig, state_path: Path | None = None,
         progress: bool = True, log: Callable[[str], None] = print,
         build: Callable[[list[int]], Policy] | None = None) -> dict:
    """Search the cheapest setting within budget at each batch size.

    Args:
      sequences: [N, L] calibration token ids (never the text the result is validated on), in batch order:
        at batch size B, sequences g*B .. g*B+B-1 form one decode batch (the last N % B are left out).
      state_path: a JSON file of every evaluation so far; a run given the same file and arguments resumes
        from it (a file of other arguments is refused).
      build: values per MoE layer -> the policy (default: the family with `config.params`).
    Returns: {"policy": the policy file's JSON object, "by_batch": {B: {"uniform", "tuned", "native_unique",
      "native_cost", "evaluations"}}, "conditions": {...}}.
    """
    from ..hf.apply import moe_routers
    from .evaluate import build_policy

    if sequences.dim() != 2 or sequences.shape[1] < 2 or sequences.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"calibration sequences must be int64 token ids [N, L] with L >= 2, got "
                         f"{tuple(sequences.shape)} {sequences.dtype}")
    check_bound(config, int(sequences.shape[0]))
    spec = RouterSpec.from_config(model.config)
    num_layers = len(list(moe_routers(model)))
    if build is None:
        def build(values: list[int]) -> Policy:
            return build_policy(config.family, {**config.params, config.parameter: values}, model)
    probe = build(value_grid(config.family, spec)[-1:] * num_layers)  # fixed parameters are checked now
    for m in range(num_layers):
        probe.check_model(spec, m)
    identity = {"format": STATE_FORMAT, "config": _jsonable(asdict(config)), "text": text_digest(sequences),
                "model": getattr(model.config, "_name_or_path", "") or type(model).__name__}
    state = {**identity, "evaluations": {}}
    if state_path is not None and state_path.exists():
        try:
            saved = json.loads(state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise ValueError(f"{state_path} is not a tune state file ({e}); delete it or give another --state") from None
        if not isinstance(saved, dict) or {k: saved.get(k) for k in identity} != identity:
            raise ValueError(f"{state_path} holds a search with other arguments (model, text or settings); delete "
                             "it or give another --state to start afresh")
        state = saved
        done = sum(len(v.get("points", {})) for v in state["evaluations"].values())
        log(f"resuming from {state_path} ({done} evaluations done)")

    def save() -> None:
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_suffix(state_path.suffix + ".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(state_path)

    forwards = Forwards(model, sequences)
    order = torch.arange(sequences.shape[0])
    sizes = sorted(set(int(b) for b in config.batch_sizes))
    results = {}
    started = time.perf_counter()
    bar = progress_bar(0, progress, "tuning", unit="evaluation")
    forwards.native()
    for B in sizes:
        cache = state["evaluations"].setdefault(str(B), {})
        search = Search(forwards, order, B, config, build, cache, save, log, lambda: bar.update(1))
        uniform, tuned = search.run()
        log(f"batch {B}: tuned {config.parameter}={list(tuned.values)} U {_mean(tuned.unique):.1f} "
            f"({_mean(tuned.unique) / _mean(search.native_unique):.2f}x native, best uniform "
            f"{_mean(uniform.unique) / _mean(search.native_unique):.2f}x) {tuned.describe_loss(config)}")
        results[B] = {"uniform": uniform.to_dict(), "tuned": tuned.to_dict(), "native_unique": search.native_unique,
                      "native_cost": search.native.cost, "evaluations": len(cache.get("points", {}))}
    bar.close()
    values = {B: r["tuned"]["values"] for B, r in results.items()}
    return {"policy": policy_object(config, values, identity["model"]),
            "by_batch": results,
            "conditions": {"model": identity["model"], "num_experts": spec.num_experts, "top_k": spec.top_k,
                           "moe_layers": num_layers, "sequences": int(sequences.shape[0]),
                           "seq_len": int(sequences.shape[1]), "objective": config.objective,
                           "cost": {"b": config.cost_b, "a": config.cost_a}, "budget": config.budget,
                           "agreement": config.agreement, "confidence": config.confidence if config.z() else None,
                           "seconds": round(time.perf_counter() - started, 1),
                           "prefix_reuse": forwards.reusable}}


def policy_object(config: TuneConfig, tuned: dict[int, list[int]], model: str | None = None) -> dict[str, Any]:
    """The policy file: the family, its fixed parameters, and the tuned values per MoE layer, by batch
    size when they differ between the tuned sizes (a step of T tokens takes the values tuned at the
    largest tuned size <= T; below the smallest, the smallest's)."""
    sizes = sorted(tuned)

    def plain(values: list[int]) -> Any:
        return values[0] if len(set(values)) == 1 else list(values)

    value: Any = plain(tuned[sizes[0]])
    if any(tuned[s] != tuned[sizes[0]] for s in sizes):
        buckets = {str(sizes[i + 1] - 1): plain(tuned[s]) for i, s in enumerate(sizes[:-1])}
        value = {"by_batch": {**buckets, "max": plain(tuned[sizes[-1]])}}
    return {"name": config.family, **config.params, config.parameter: value,
            "about": {"written_by": "moe-reroute tune", "model": model, "budget": config.budget,
                      "agreement": config.agreement, "objective": config.objective, "batch_sizes": sizes}}


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda v: f"<{type(v).__name__}>"))
