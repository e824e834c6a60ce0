"""Latency of one MoE layer at decode, at a real model's dimensions, under each routing policy.

The layer (moe_reroute.measure.layer) holds E SwiGLU experts of random weights on the device and computes, for each valid token,
sum_k w_tk · down(silu(gate x) * up x) over its routed experts, reading only the experts that at least
one valid token uses: so its latency follows U, the quantity the policies reduce. Policies are timed in
the same run, interleaved, with the caches flushed between timed calls (a real decode step reads each
layer's weights once, from memory).

T = tokens of a decode step, H = hidden, I = expert intermediate, E = experts, K = slots per token,
P = experts allocated (P < E when E do not fit: expert e then reads slot e mod P), N = T·K slots.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..contract import RouterSpec, Routing
from ..metrics import unique_experts
from ..policies import Policy
from .shapes import LayerShape

from ..progress import progress as progress_bar
from .layer import FLUSH_BYTES, KERNELS, MoELayer, _free_bytes, _sync, default_dtype, grouped_mm_status, resolve_device

NOISE_SPREAD = 0.10  # a run whose repeated calls vary more than this (IQR / median) gives noise, not ratios

__all__ = ["KERNELS", "MoELayer", "default_dtype", "grouped_mm_status", "resolve_device", "FLUSH_BYTES"]


# ----------------------------------------------------------------------------------------- bandwidth


@dataclass(frozen=True)
class Bandwidth:
    """Peak read bandwidth of a device in GB/s (1e9 bytes/s), and how it was measured."""

    gbps: float
    method: str


def busy_cores(load: float | None, threads: int) -> tuple[int, int] | None:
    """(cores, cores free of other work) when the 1-minute load average `load` and `threads` more threads
    exceed the CPU's cores, so that they would share cores with other work (OpenMP threads that do wait for
    each other at every parallel region); None when they fit, or without a load average."""
    import os

    if load is None:
        return None
    cores = os.cpu_count() or 1
    if load + threads <= cores + 0.5:
        return None
    return cores, max(1, round(cores - load))


def measure_bandwidth(device: str | torch.device | None = None, repeats: int = 10, size_mb: int | None = None) -> Bandwidth:
    """Best of `repeats` full reductions (`buf.sum()`) over a buffer far larger than the last-level
    cache: 512 MB on CPU, 2 GB on CUDA (less if memory is short). Best-of-N gives the peak."""
    device = resolve_device(device)
    cuda = device.type == "cuda"
    if size_mb is None:
        size_mb = 2048 if cuda else 512
        if cuda:
            size_mb = min(size_mb, int(_free_bytes(device) / 4) >> 20)
    n = (size_mb << 20) // 4
    buf = torch.ones(n, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass also faults the pages in
        _sync(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            buf.sum()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            buf.sum()
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    del buf
    threads = torch.get_num_threads()
    where = f"CUDA ({torch.cuda.get_device_name(device)})" if cuda else f"CPU, {threads} thread{'s' * (threads != 1)}"
    return Bandwidth(n * 4 / best / 1e9, f"best of {repeats} buf.sum() over a {size_mb} MB float32 buffer, {where}")


# ----------------------------------------------------------------------------------------- benchmark


@dataclass
class PolicyTiming:
    """One policy's measurements. Latency: median and quartiles over all steps x repeats samples;
    `points`: (U, T·K, median ms of that step) per step, for the cost model."""

    policy: str
    steps: int
    samples: int
    median_ms: float
    q25_ms: float
    q75_ms: float
    mean_unique: float
    mean_tokens: float
    mean_slots: float
    bytes_per_step: float
    achieved_gbps: float
    peak_fraction: float
    ratio_vs_native: float | None
    points: list[tuple[int, int, float]] = field(default_factory=list)

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms


@dataclass
class BenchResult:
    """Every policy measured in one run on one layer."""

    shape: LayerShape
    device: str
    dtype: str
    kernel: str
    kernel_note: str
    bandwidth: Bandwidth
    cache: str
    aliasing: str | None
    repeats: int
    warmup: int
    policies: dict[str, PolicyTiming]
    spread: float = float("nan")  # median over (policy, step) of the IQR / median of its repeated calls
    noisy: bool = False  # spread > NOISE_SPREAD: the ratios are noise, not results

    def to_dict(self) -> dict:
        d = asdict(self)
        for name, t in self.policies.items():
            d["policies"][name]["iqr_ms"] = t.iqr_ms
        return d


def bench_policies(
    shape: LayerShape,
    routings_by_policy: dict[str, list[Routing]],
    device: str | torch.device | None = None,
    repeats: int = 10,
    warmup: int = 2,
    kernel: str = "auto",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    *,
    flush: bool = True,
    layer: MoELayer | None = None,
    bandwidth: Bandwidth | None = None,
    seed: int = 0,
    desc: str = "timed calls",
) -> BenchResult:
    """Time the layer under every policy's routings, interleaved in one run.

    routings_by_policy: {policy: [Routing of one decode step, ...]}, the same number of steps each.
    Each round runs every step under every policy once, in an order that rotates with the round and
    step; `warmup` rounds are discarded. Before each timed call a 256 MB buffer is written (unless
    flush=False) so that weights come from memory, as in a decode step that reads each layer once.
    Pass `layer` (and `bandwidth`) to reuse them across calls, e.g. over several batch sizes.
    """
    names = list(routings_by_policy)
    if not names:
        raise ValueError("no policies to measure")
    counts = {len(v) for v in routings_by_policy.values()}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(
            f"every policy needs the same, non-zero number of steps; got "
            f"{ {k: len(v) for k, v in routings_by_policy.items()} }"
        )
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if layer is None:
        device = resolve_device(device)
        bandwidth = bandwidth or measure_bandwidth(device)
        layer = MoELayer(shape, device, dtype, seed=seed)
    elif layer.shape != shape:
        raise ValueError(f"the given layer has shape {layer.shape.name}, not {shape.name}")
    elif dtype is not None and dtype != layer.dtype:
        raise ValueError(f"the given layer holds {layer.dtype} weights but dtype={dtype} was asked for")
    device = layer.device
    bandwidth = bandwidth or measure_bandwidth(device)
    E = shape.num_experts
    steps = counts.pop()

    prepared: dict[str, list[tuple[torch.Tensor, Routing]]] = {}
    stats: dict[str, list[tuple[int, int]]] = {}  # per step: (U, valid tokens)
    for name, routings in routings_by_policy.items():
        prepared[name], stats[name] = [], []
        for s, r in enumerate(routings):
            if r.ids.shape[1] != shape.top_k:
                raise ValueError(f"policy {name!r} step {s}: routing has K={r.ids.shape[1]}, the shape K={shape.top_k}")
            if r.valid is not None:  # the engine knows its batch composition: compact outside the timing
                keep = r.valid.cpu()
                r = Routing(r.weights.cpu()[keep], r.ids.cpu()[keep])
            T = r.ids.shape[0]
            if T == 0:
                raise ValueError(f"policy {name!r} step {s} has no valid tokens; drop it")
            if int(r.ids.max()) >= E or int(r.ids.min()) < 0:
                raise ValueError(f"policy {name!r} step {s}: expert ids outside 0..{E - 1}; the routing is for another E")
            u = int(unique_experts(r, E))
            gen = torch.Generator().manual_seed(seed + s)
            x = torch.randn(T, shape.hidden, generator=gen).to(device, layer.dtype)  # [T, H]
            prepared[name].append((x, Routing(r.weights.to(device), r.ids.to(device))))
            stats[name].append((u, T))

    kernel, kernel_note = _choose_kernel(layer, kernel, prepared, flush)
    calls, how = timed_calls(layer, prepared, kernel)
    kernel_note = f"{kernel_note}; {how}"
    flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if flush else None
    bar = progress_bar((warmup + repeats) * steps * len(names), progress, desc, unit="calls", leave=False)
    times: dict[str, list[list[float]]] = {n: [[] for _ in range(steps)] for n in names}
    for rnd in range(warmup + repeats):
        for s in range(steps):
            shift = (rnd * steps + s) % len(names)
            for name in names[shift:] + names[:shift]:
                ms = _time_call(calls[name][s], device, flush_buf, rnd)
                if rnd >= warmup:
                    times[name][s].append(ms)
                bar.update(1)
    bar.close()
    del flush_buf

    per_expert = shape.bytes_per_expert(layer.dtype)
    timings = {}
    for name in names:
        samples = torch.tensor([t for step in times[name] for t in step], dtype=torch.float64)
        q25, med, q75 = torch.quantile(samples, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        step_med = [float(torch.tensor(t).median()) for t in times[name]]
        us = [u for u, _ in stats[name]]
        ts = [t for _, t in stats[name]]
        total_bytes = sum(us) * per_expert
        achieved = total_bytes / (sum(step_med) / 1e3) / 1e9
        timings[name] = PolicyTiming(
            policy=name,
            steps=steps,
            samples=len(samples),
            median_ms=med,
            q25_ms=q25,
            q75_ms=q75,
            mean_unique=sum(us) / steps,
            mean_tokens=sum(ts) / steps,
            mean_slots=sum(ts) * shape.top_k / steps,
            bytes_per_step=total_bytes / steps,
            achieved_gbps=achieved,
            peak_fraction=achieved / bandwidth.gbps,
            ratio_vs_native=None,
            points=[(u, t * shape.top_k, m) for u, t, m in zip(us, ts, step_med)],
        )
    if "native" in timings:
        for t in timings.values():
            t.ratio_vs_native = t.median_ms / timings["native"].median_ms
    cache = (
        f"caches flushed: a {FLUSH_BYTES >> 20} MB buffer written before each timed call (not timed)"
        if flush
        else "caches not flushed: a layer smaller than the last-level cache may be served from it"
    )
    spread = timing_spread(times)
    return BenchResult(shape, str(device), str(layer.dtype).removeprefix("torch."), kernel, kernel_note, bandwidth,
                       cache, layer.aliasing, repeats, warmup, timings, spread, not spread <= NOISE_SPREAD)


def timing_spread(times: dict[str, list[list[float]]]) -> float:
    """How much the same call's time varies between repeats: the median over (policy, step) of
    IQR / median of that call's repeated timings. NaN with fewer than 3 repeats.

    A policy that reads fewer experts saves tens of percent of native's time; when the same call
    varies by more than NOISE_SPREAD from one repeat to the next (other work on the machine, frequency
    changes), a ratio of medians cannot be told from noise.
    """
    rel = []
    for per_step in times.values():
        for t in per_step:
            if len(t) >= 3:
                q25, med, q75 = torch.quantile(torch.tensor(t, dtype=torch.float64),
                                               torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
                rel.append((q75 - q25) / med if med > 0 else float("inf"))
    return float(torch.tensor(rel, dtype=torch.float64).median()) if rel else float("nan")


def _choose_kernel(layer: MoELayer, kernel: str, prepared, flush: bool) -> tuple[str, str]:
    if kernel not in (*KERNELS, "auto"):
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join((*KERNELS, 'auto'))}")
    if kernel == "loop":
        return kernel, "loop (as asked)"
    ok, why = grouped_mm_status(layer)
    if kernel == "grouped_mm":
        if not ok:
            raise ValueError(f"kernel grouped_mm is not available: {why}; use --kernel loop or auto")
        return kernel, "grouped_mm (as asked)"
    if not ok:
        return "loop", f"auto: loop ({why})"
    x, r = prepared.get("native", next(iter(prepared.values())))[0]
    buf = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=layer.device) if flush else None
    med = {}
    for k in KERNELS:
        ms = [_time_call(lambda: layer.forward(x, r, k), layer.device, buf, i) for i in range(4)][1:]
        med[k] = sorted(ms)[1]
    best = min(med, key=med.get)
    trial = ", ".join(f"{k} {v:.3f} ms" for k, v in med.items())
    return best, f"auto: {best} (native-routing trial, median of 3: {trial})"


def timed_calls(layer: MoELayer, prepared: dict[str, list[tuple[torch.Tensor, Routing]]], kernel: str
                ) -> tuple[dict[str, list[Callable[[], object]]], str]:
    """({policy: [the call of each step]}, how they run). On CUDA with the grouped kernel (no host
    synchronisation) each step's forward is captured in a CUDA graph and the call replays it: the ~20 kernel
    launches of an eager forward take longer on the host than a small batch's expert reads take on the GPU,
    and timed eagerly they would pull every ratio toward 1. Otherwise (CPU, the loop kernel, experts sharing
    memory) the call is the eager forward."""
    eager = {name: [functools.partial(layer.forward, x, r, kernel) for x, r in steps]
             for name, steps in prepared.items()}
    if layer.device.type != "cuda" or kernel != "grouped_mm" or layer.pool != layer.shape.num_experts:
        return eager, "each call eager"
    side = torch.cuda.Stream(layer.device)
    side.wait_stream(torch.cuda.current_stream(layer.device))
    with torch.cuda.stream(side):
        for fns in eager.values():
            for fn in fns:
                fn()  # warm-up outside the graphs (workspaces allocated)
    torch.cuda.current_stream(layer.device).wait_stream(side)
    pool = torch.cuda.graph_pool_handle()  # one pool; each graph's output is kept, so none shares another's
    graphs = {}
    for name, fns in eager.items():
        graphs[name] = []
        for fn in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = fn()
            graphs[name].append(functools.partial(_replay, g, out))
    return graphs, "each call a replay of its CUDA graph (the launches are not timed)"


def _replay(graph: torch.cuda.CUDAGraph, out: torch.Tensor) -> torch.Tensor:
    graph.replay()
    return out


def _time_call(fn: Callable[[], object], device: torch.device, flush_buf: torch.Tensor | None, tag: int) -> float:
    """Milliseconds of one call, the caches flushed first."""
    if flush_buf is not None:
        flush_buf.fill_(tag & 0xFF)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# ----------------------------------------------------------------------------------------- routings


def routings_from_trace(
    trace,
    policies: dict[str, Policy],
    batch_size: int,
    steps: int,
    shape: LayerShape | None = None,
) -> dict[str, list[Routing]]:
    """{policy: [Routing, ...]}: up to `steps` decode steps of `batch_size` tokens from a trace, spread
    evenly over its (step, layer) pairs (steps without valid tokens skipped), so early positions with
    little context do not stand for the whole sequence.

    shape: if given, the trace's E and K must match it (else a ValueError says what to do).
    """
    if shape is not None:
        for layer, spec in trace.specs.items():
            if (spec.num_experts, spec.top_k) != (shape.num_experts, shape.top_k):
                raise ValueError(
                    f"the trace routes E={spec.num_experts}, K={spec.top_k} (layer {layer}) but shape {shape.name} has "
                    f"E={shape.num_experts}, K={shape.top_k}; pick a matching --shape/--dims, or benchmark on random "
                    "router logits with --routing uniform"
                )
    batched = trace.rebatch(batch_size)
    layers = batched.layers
    pairs = [(s, layer) for s in range(batched.steps) if bool(batched.valid[s].any()) for layer in layers]
    if not pairs:
        raise ValueError("the trace has no step with a valid token")
    if len(pairs) > steps:
        pick = torch.linspace(0, len(pairs) - 1, steps).round().long().unique().tolist()
        pairs = [pairs[i] for i in pick]
    out: dict[str, list[Routing]] = {name: [] for name in policies}
    for s, layer in pairs:
        logits = batched.logits[layer][s].float()  # [B, E]
        for name, policy in policies.items():
            out[name].append(policy(logits, batched.specs[layer], batched.valid[s], layer=batched.moe_layer(layer)))
    return out


def uniform_routings(
    policies: dict[str, Policy], shape: LayerShape, batch_size: int, steps: int, seed: int = 0
) -> dict[str, list[Routing]]:
    """Routings from random router logits (standard normal, softmax top-K): not a trace of any model.
    Policies with per-layer parameters use their values for MoE layer 0."""
    spec = RouterSpec(shape.num_experts, shape.top_k)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[Routing]] = {name: [] for name in policies}
    for _ in range(steps):
        logits = torch.randn(batch_size, shape.num_experts, generator=gen)  # [T, E]
        for name, policy in policies.items():
            out[name].append(policy(logits, spec, layer=0))
    return out


@torch.no_grad()
def reference_trace(batch_size: int, steps: int, model=None, ids=None):
    """A trace of the shipped reference model on held-out text: `batch_size` sequences of `steps`
    tokens (by default from the validation part of the held-out split, its domains in turn), teacher-forced in one [B, L] forward, each
    position's B tokens one decode step.

    model, ids: the already loaded reference model and its held-out token ids (loaded here if None); ids
      may also be [batch_size, steps] sequences already arranged (e.g. by domain).
    """
    from ..hf import Recorder

    if model is None or ids is None:  # the held-out split, rows cycling through its domains
        from ..reference import heldout_documents, load
        from ..reference.card import domain_streams, trace_sequences

        model, tokenizer, _ = load()
        ids = trace_sequences(domain_streams(tokenizer, heldout_documents()), batch_size, steps, "mixed")[0]
    if ids.dim() == 2:
        if tuple(ids.shape) != (batch_size, steps):
            raise ValueError(f"arranged sequences are {tuple(ids.shape)}, not ({batch_size}, {steps})")
        seqs = ids
    elif len(ids) < batch_size * steps:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than {batch_size} x {steps}; ask for fewer")
    else:
        seqs = ids[: batch_size * steps].view(batch_size, steps)
    with Recorder(model, keep="logits") as rec:
        model(input_ids=seqs)
    return rec.to_trace()
