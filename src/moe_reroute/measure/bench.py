"""Latency of one MoE layer at decode, at a real model's dimensions, under each routing policy.

The layer holds E SwiGLU experts of random weights on the device and computes, for each valid token,
sum_k w_tk · down(silu(gate x) * up x) over its routed experts, reading only the experts that at least
one valid token uses: so its latency follows U, the quantity the policies reduce. Policies are timed in
the same run, interleaved, with the caches flushed between timed calls (a real decode step reads each
layer's weights once, from memory).

T = tokens of a decode step, H = hidden, I = expert intermediate, E = experts, K = slots per token,
P = experts allocated (P < E when E do not fit: expert e then reads slot e mod P), N = T·K slots.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..contract import RouterSpec, Routing
from ..metrics import unique_experts
from ..policies import Policy
from .shapes import LayerShape

KERNELS = ("loop", "grouped_mm")
FLUSH_BYTES = 256 << 20  # like triton's do_bench: larger than any last-level cache we run on


# ----------------------------------------------------------------------------------------- bandwidth


@dataclass(frozen=True)
class Bandwidth:
    """Peak read bandwidth of a device in GB/s (1e9 bytes/s), and how it was measured."""

    gbps: float
    method: str


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


# ----------------------------------------------------------------------------------------- the layer


class MoELayer:
    """The routed experts of one MoE layer, random weights, on a device.

    gate_up: [P, 2I, H] (gate rows then up rows), down: [P, H, I], in `dtype`. Values are uniform in
    ±1/sqrt(fan-in); a random block is tiled over the rest, which is fast to fill and irrelevant to
    timing. If E experts exceed `memory_fraction` of the free memory, P < E slots are allocated and
    expert e reads slot e mod P (`aliasing` says so).
    """

    def __init__(
        self,
        shape: LayerShape,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        memory_fraction: float = 0.5,
        pool: int | None = None,
        seed: int = 0,
    ) -> None:
        self.shape = shape
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.device)
        H, I, E = shape.hidden, shape.intermediate, shape.num_experts
        per_expert = shape.bytes_per_expert(self.dtype)
        if pool is None:
            budget = memory_fraction * _free_bytes(self.device) - FLUSH_BYTES
            pool = min(E, int(budget // per_expert))
            if pool < 1:
                raise MemoryError(
                    f"one expert of {shape.name} ({shape.dims()}) needs {per_expert / 2**30:.2f} GiB in {self.dtype} "
                    f"but only {max(budget, 0) / 2**30:.2f} GiB ({memory_fraction:.0%} of free memory) is available; "
                    "free memory, raise memory_fraction or pick a smaller shape"
                )
        if not 1 <= pool <= E:
            raise ValueError(f"pool must be between 1 and E={E}, got {pool}")
        self.pool = pool
        gen = torch.Generator(self.device).manual_seed(seed)
        self.gate_up = _random((pool, 2 * I, H), 1 / H**0.5, self.dtype, self.device, gen)  # [P, 2I, H]
        self.down = _random((pool, H, I), 1 / I**0.5, self.dtype, self.device, gen)  # [P, H, I]
        self.last_read: list[int] = []  # experts the last "loop" forward read (for tests)

    @property
    def aliasing(self) -> str | None:
        """A plain statement when experts share memory, else None."""
        if self.pool == self.shape.num_experts:
            return None
        mb = self.shape.bytes_per_expert(self.dtype) / 2**20
        return (
            f"only {self.pool} of E={self.shape.num_experts} experts are allocated (all E do not fit in the memory "
            f"budget): expert e reads slot e mod {self.pool}. Each expert is {mb:.1f} MiB; an expert far larger than "
            "the last-level cache streams from memory even when its slot was read before"
        )

    def forward(self, x: torch.Tensor, routing: Routing, kernel: str = "loop") -> torch.Tensor:
        """x [T, H] -> [T, H] in x's dtype: sum_k w_tk · expert_{ids_tk}(x_t) for valid tokens, 0 for
        invalid ones. Only experts used by a valid token are read."""
        T, K = routing.ids.shape
        if tuple(x.shape) != (T, self.shape.hidden):
            raise ValueError(f"x must be [T, H]=[{T}, {self.shape.hidden}], got {tuple(x.shape)}")
        if K != self.shape.top_k:
            raise ValueError(f"the routing has K={K} slots per token but the layer shape has K={self.shape.top_k}")
        ids = routing.ids.to(self.device).reshape(-1)  # [N]
        w = routing.weights.to(self.device, torch.float32).reshape(-1)  # [N]
        tok = torch.arange(T, device=self.device).repeat_interleave(K)  # [N]
        if routing.valid is not None:
            keep = routing.valid.to(self.device).repeat_interleave(K)  # [N]; a host sync, like any compaction
            ids, w, tok = ids[keep], w[keep], tok[keep]
        out = torch.zeros(T, self.shape.hidden, dtype=torch.float32, device=self.device)  # [T, H]
        if kernel == "loop":
            self._loop(x, ids, w, tok, out)
        elif kernel == "grouped_mm":
            self._grouped(x, ids, w, tok, out)
        else:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
        return out.to(x.dtype)

    __call__ = forward

    def _loop(self, x, ids, w, tok, out) -> None:
        """One pair of matmuls per active expert over the tokens it serves."""
        order = torch.argsort(ids, stable=True)
        ids, w, tok = ids[order], w[order], tok[order]
        counts = torch.bincount(ids, minlength=self.shape.num_experts).tolist()
        self.last_read = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slot = e % self.pool
            t = tok[start : start + n]
            h = x[t] @ self.gate_up[slot].T  # [n, 2I]
            gate, up = h.chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.down[slot].T  # [n, H]
            out.index_add_(0, t, y.float() * w[start : start + n, None])
            self.last_read.append(e)
            start += n

    def _grouped(self, x, ids, w, tok, out) -> None:
        """Two `torch._grouped_mm` calls over the slots sorted by expert; experts with no rows are not
        read. With aliasing, experts sharing a slot go in separate rounds so each is read once."""
        P = self.pool
        if P == self.shape.num_experts:
            rounds = [(ids, w, tok)]
        else:
            used = torch.bincount(ids, minlength=self.shape.num_experts).nonzero().flatten().tolist()
            round_of = torch.full((self.shape.num_experts,), -1, dtype=torch.long)
            seen: dict[int, int] = {}
            for e in used:
                round_of[e] = seen.get(e % P, 0)
                seen[e % P] = int(round_of[e]) + 1
            r = round_of.to(self.device)[ids]  # [N]
            rounds = [(ids[r == i], w[r == i], tok[r == i]) for i in range(max(seen.values(), default=0))]
        for ids_r, w_r, tok_r in rounds:
            key = ids_r % P  # [N_r] slot of each token-expert pair
            order = torch.argsort(key, stable=True)
            key, w_r, tok_r = key[order], w_r[order], tok_r[order]
            counts = torch.zeros(P, dtype=torch.int32, device=self.device).scatter_add_(
                0, key, torch.ones_like(key, dtype=torch.int32)
            )  # [P], no host sync (unlike bincount on CUDA)
            offs = counts.cumsum(0, dtype=torch.int32)
            h = torch._grouped_mm(x[tok_r], self.gate_up.transpose(1, 2), offs=offs)  # [N_r, 2I]
            gate, up = h.chunk(2, dim=-1)
            y = torch._grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=offs)  # [N_r, H]
            out.index_add_(0, tok_r, y.float() * w_r[:, None])


def grouped_mm_status(layer: MoELayer) -> tuple[bool, str]:
    """(available, why): `torch._grouped_mm` exists, runs for this device, dtype and shape, and agrees
    with the loop kernel on a small routing."""
    if not hasattr(torch, "_grouped_mm"):
        return False, "torch._grouped_mm does not exist in this torch"
    K = layer.shape.top_k
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(layer.shape.num_experts, generator=gen)[:K] for _ in range(3)])  # [3, K]
    routing = Routing(torch.rand(3, K, generator=gen), ids)
    x = torch.randn(3, layer.shape.hidden, generator=gen).to(layer.device, layer.dtype)
    try:
        got = layer.forward(x, routing, "grouped_mm").float()
    except Exception as e:  # any failure means "not usable here"
        return False, f"torch._grouped_mm failed for {layer.dtype} on {layer.device.type}: {str(e).splitlines()[0]}"
    want = layer.forward(x, routing, "loop").float()
    tol = 1e-4 if layer.dtype == torch.float32 else 3e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max().clamp_min(1))):
        return False, "torch._grouped_mm disagrees with the loop kernel here"
    return True, "torch._grouped_mm works here"


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
    flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if flush else None
    bar = _progress((warmup + repeats) * steps * len(names), progress)
    times: dict[str, list[list[float]]] = {n: [[] for _ in range(steps)] for n in names}
    for rnd in range(warmup + repeats):
        for s in range(steps):
            shift = (rnd * steps + s) % len(names)
            for name in names[shift:] + names[:shift]:
                x, r = prepared[name][s]
                ms = _time_call(lambda: layer.forward(x, r, kernel), device, flush_buf, rnd)
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
    return BenchResult(shape, str(device), str(layer.dtype).removeprefix("torch."), kernel, kernel_note, bandwidth,
                       cache, layer.aliasing, repeats, warmup, timings)


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
    """{policy: [Routing, ...]}: up to `steps` decode steps of `batch_size` tokens from a trace,
    cycling over its layers then its steps (steps without valid tokens skipped).

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
    pairs = pairs[:steps]
    out: dict[str, list[Routing]] = {name: [] for name in policies}
    for s, layer in pairs:
        logits = batched.logits[layer][s].float()  # [B, E]
        for name, policy in policies.items():
            out[name].append(policy(logits, batched.specs[layer], batched.valid[s], layer=layer))
    return out


def uniform_routings(
    policies: dict[str, Policy], shape: LayerShape, batch_size: int, steps: int, seed: int = 0
) -> dict[str, list[Routing]]:
    """Routings from random router logits (standard normal, softmax top-K): not a trace of any model.
    Policies with per-layer parameters use their layer-0 values."""
    spec = RouterSpec(shape.num_experts, shape.top_k)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[Routing]] = {name: [] for name in policies}
    for _ in range(steps):
        logits = torch.randn(batch_size, shape.num_experts, generator=gen)  # [T, E]
        for name, policy in policies.items():
            out[name].append(policy(logits, spec, layer=0))
    return out


@torch.no_grad()
def reference_trace(batch_size: int, steps: int):
    """A trace of the shipped reference model on held-out text: `batch_size` sequences of `steps`
    tokens, teacher-forced in one [B, L] forward, each position's B tokens one decode step."""
    from ..hf import Recorder
    from ..reference import load
    from ..reference.card import heldout_ids

    model, tokenizer, text = load()
    ids = heldout_ids(tokenizer, text)
    if len(ids) < batch_size * steps:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than {batch_size} x {steps}; ask for fewer")
    with Recorder(model, keep="logits") as rec:
        model(input_ids=ids[: batch_size * steps].view(batch_size, steps))
    return rec.to_trace()


# ----------------------------------------------------------------------------------------- helpers


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for but torch sees no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (fast matmuls there), bfloat16 on CUDA (what models are served in)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _random(size: tuple[int, ...], scale: float, dtype, device, gen) -> torch.Tensor:
    """Uniform in ±scale: a random block of up to 16M values tiled over the tensor."""
    out = torch.empty(size, dtype=dtype, device=device)
    flat = out.view(-1)
    block = min(flat.numel(), 1 << 24)
    flat[:block].uniform_(-scale, scale, generator=gen)
    for start in range(block, flat.numel(), block):
        n = min(block, flat.numel() - start)
        flat[start : start + n].copy_(flat[:n])
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="timed calls", unit="call", leave=False)
