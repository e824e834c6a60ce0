"""Time one routing call: each policy on each backend (torch ops, fused Triton kernels) next to the model's
own router, and the policy's time as a share of the MoE layer it routes.

On a GPU each call is replayed inside a CUDA graph (as engines run the router), `calls` calls per graph,
timed with CUDA events; on CPU a plain timing loop. Medians over `repeats` rounds, every entry of a
round measured in the same process, interleaved.

T = tokens, E = experts, K = experts per token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .. import kernels
from ..contract import RouterSpec
from ..policies import make_policy
from ..progress import progress as progress_bar
from .shapes import SHAPES, LayerShape

ROUTING_BATCH_SIZES = (1, 8, 16, 64, 256, 1024)
ROUTING_EXPERTS = (64, 128, 256)
DEFAULT_ROUTING_POLICIES = ("native", "cap:k=4", "oea:k0=3", "sere", "budget:budget=32")
# the layer whose time a policy's is a share of, for each E (K=8 in each)
LAYER_FOR_EXPERTS = {64: "olmoe-1b-7b", 128: "qwen3-30b-a3b", 256: "deepseek-v3"}
SHARE_BATCH = 16


@dataclass
class RoutingTiming:
    label: str  # "oea:k0=3 [triton]", "model router (torch topk+softmax)", ...
    backend: str
    experts: int
    tokens: int
    median_us: float
    q25_us: float
    q75_us: float
    launches: int | None = None  # kernel launches per call (fused kernels only)


@dataclass
class RoutingBenchResult:
    device: str
    dtype: str
    top_k: int
    method: str
    repeats: int
    calls: int
    timings: list[RoutingTiming]
    layer_us: dict[int, dict] = field(default_factory=dict)  # E -> {"shape", "tokens", "median_us"}
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def get(self, label: str, experts: int, tokens: int) -> RoutingTiming | None:
        for t in self.timings:
            if (t.label, t.experts, t.tokens) == (label, experts, tokens):
                return t
        return None


def _similarity(E: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(E)
    s = torch.rand(E, E, generator=g)
    s = (s + s.T) / 2
    s.fill_diagonal_(1.0)
    return s.to(device)


def _vllm_fused_topk(notes: list[str]) -> Callable | None:
    """vLLM's fused top-k if vLLM is installed (else None, with a note saying why)."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_topk  # type: ignore
    except Exception as e:  # vLLM absent, or built without its fused ops
        notes.append(f"vLLM's fused top-k not measured: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None
    return fused_topk


def _model_routers(spec: RouterSpec, fused_topk: Callable | None) -> dict[str, Callable]:
    """The model's own router: torch's softmax + topk (+ renormalise), and vLLM's fused top-k if given."""
    K = spec.top_k

    def torch_router(x, valid):
        p = torch.softmax(x, dim=-1, dtype=torch.float32)
        w, ids = torch.topk(p, K, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), ids

    out = {"model router (torch softmax+topk)": torch_router}
    if fused_topk is not None:
        out["model router (vLLM fused_topk)"] = lambda x, valid: fused_topk(x, x, K, True)[:2]
    return out


def _timer(fn: Callable[[], object], device: torch.device, calls: int) -> Callable[[], float]:
    """A function returning µs per call of one round of `calls` calls (a CUDA graph replay on GPU)."""
    if device.type == "cuda":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()  # warm-up: compile kernels, fill caches, outside the graph
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run() -> float:
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3 / calls

        return run
    for _ in range(2):
        fn()

    def run_cpu() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e6 / calls

    return run_cpu


def bench_routing(
    policies: dict[str, object] | None = None,
    batch_sizes: tuple[int, ...] = ROUTING_BATCH_SIZES,
    experts: tuple[int, ...] = ROUTING_EXPERTS,
    top_k: int = 8,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    repeats: int = 20,
    calls: int = 20,
    layer_share: bool = True,
    progress: bool = True,
) -> RoutingBenchResult:
    """µs per routing call for every policy x backend x E x T, and the model's own router.

    policies: {label: spec or Policy} (default DEFAULT_ROUTING_POLICIES; `sere` gets a random similarity).
    layer_share: also time the native MoE layer of LAYER_FOR_EXPERTS[E] at T=16 (moe_reroute.measure.bench).
    """
    from .layer import resolve_device
    from ..policies.spec import parse_policy_spec

    device = resolve_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if repeats < 1 or calls < 1:
        raise ValueError(f"repeats and calls must be >= 1, got {repeats}, {calls}")
    specs = dict.fromkeys(DEFAULT_ROUTING_POLICIES) if policies is None else policies
    notes: list[str] = []
    ok, why = kernels.available(device)
    backends = ["torch"] + (["triton"] if ok else [])
    if not ok:
        notes.append(f"fused kernels not measured: {why}")
    if device.type == "cpu":
        notes.append("CPU: plain timing loop (no CUDA graph); the routing cost that matters is a GPU's")
        if ok:
            notes.append("[triton] rows ran in Triton's interpreter (TRITON_INTERPRET=1): a correctness path, "
                         "not a kernel time")
    vllm_topk = _vllm_fused_topk(notes)
    entries: list[tuple[int, int, str, str, Callable]] = []
    for E in experts:
        if top_k > E:
            raise ValueError(f"top_k={top_k} > E={E}")
        spec = RouterSpec(E, top_k)
        sim = _similarity(E, device)
        for T in batch_sizes:
            x = torch.randn(T, E, generator=torch.Generator().manual_seed(T * 1000 + E)).to(device, dtype)  # [T, E]
            valid = torch.ones(T, dtype=torch.bool, device=device)
            for label, text in specs.items():
                for backend in backends:
                    if isinstance(text, str) or text is None:
                        name, params = parse_policy_spec(label if text is None else text)
                        if name == "sere" and "similarity" not in params:
                            params["similarity"] = sim  # random: the time does not depend on its values
                        pol = make_policy(name, check_inputs=False, backend=backend, **params)
                    else:
                        pol = make_policy(text.config, check_inputs=False, backend=backend)
                    entries.append((E, T, f"{label} [{backend}]", backend,
                                    lambda pol=pol, x=x, spec=spec, valid=valid: pol(x, spec, valid)))
            for label, fn in _model_routers(spec, vllm_topk).items():
                entries.append((E, T, label, "model", lambda fn=fn, x=x, valid=valid: fn(x, valid)))

    bar = progress_bar(len(entries) * (repeats + 1), progress, "routing calls timed", unit="round", leave=False)
    runners, launches = [], []
    for E, T, label, backend, fn in entries:
        n = None
        if backend == "triton":
            with kernels.counting() as c:
                fn()
            n = c.count
        runners.append(_timer(fn, device, calls))
        launches.append(n)
        bar.update(1)
    samples: list[list[float]] = [[] for _ in entries]
    for r in range(repeats):
        order = list(range(len(entries)))
        shift = r % len(order)
        for i in order[shift:] + order[:shift]:  # rotate the order round by round
            samples[i].append(runners[i]())
            bar.update(1)
    bar.close()
    timings = []
    for (E, T, label, backend, _), s, n in zip(entries, samples, launches):
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        timings.append(RoutingTiming(label, backend, E, T, statistics.median(s), q[0], q[2], n))
    method = (f"CUDA graph of {calls} calls, replayed; CUDA events" if device.type == "cuda"
              else f"timing loop of {calls} calls")
    result = RoutingBenchResult(str(device), str(dtype).removeprefix("torch."), top_k, method, repeats, calls,
                                timings, notes=notes)
    if layer_share:
        for E in experts:
            name = LAYER_FOR_EXPERTS.get(E)
            shape = SHAPES.get(name) if name else None
            if shape is None or shape.top_k != top_k:
                notes.append(f"E={E}: no known layer shape with K={top_k}; no layer share")
                continue
            result.layer_us[E] = {"shape": shape.name, "tokens": SHARE_BATCH,
                                  "median_us": _layer_us(shape, device, progress)}
    return result


def _layer_us(shape: LayerShape, device: torch.device, progress: bool) -> float:
    """Median µs of the native MoE layer at T=SHARE_BATCH, uniform routing (moe_reroute.measure.bench)."""
    from .bench import bench_policies, uniform_routings

    native = {"native": make_policy("native", backend="torch")}
    routings = uniform_routings(native, shape, SHARE_BATCH, steps=4, seed=0)
    cpu = device.type == "cpu"
    res = bench_policies(shape, routings, device, repeats=3 if cpu else 10, warmup=1, progress=progress)
    return res.policies["native"].median_ms * 1e3


def table(result: RoutingBenchResult) -> str:
    """One block per E: rows = entries, columns = T, µs per call; the share of the layer at T=16."""
    lines = [f"routing time per call (µs, median of {result.repeats} rounds; {result.method}), "
             f"{result.dtype} logits on {result.device}, K={result.top_k}"]
    Es = sorted({t.experts for t in result.timings})
    Ts = sorted({t.tokens for t in result.timings})
    labels = list(dict.fromkeys(t.label for t in result.timings))
    for E in Es:
        layer = result.layer_us.get(E)
        share_col = layer is not None and SHARE_BATCH in Ts
        head = ["E=%d" % E, *[f"T={T}" for T in Ts], "launches"]
        if share_col:
            head.append(f"% of layer (T={SHARE_BATCH})")
        rows = [head]
        for label in labels:
            cells = [label]
            launch = "-"
            for T in Ts:
                t = result.get(label, E, T)
                cells.append(f"{t.median_us:.1f}" if t else "-")
                if t and t.launches is not None:
                    launch = str(t.launches) if launch in ("-", str(t.launches)) else f"{launch},{t.launches}"
            cells.append(launch)
            if share_col:
                t = result.get(label, E, SHARE_BATCH)
                cells.append(f"{100 * t.median_us / layer['median_us']:.1f}" if t else "-")
            rows.append(cells)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines.append("")
        if layer is not None:
            lines.append(f"E={E}: MoE layer {layer['shape']} (native, T={layer['tokens']}, uniform routing) "
                         f"{layer['median_us']:.1f} µs")
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
