"""Decode-step bench: the MoE work of a whole decode step, L MoE layers deep, under every routing policy.

A stack of L MoE layers at a real model's shape (default Qwen3-30B-A3B: H=2048, I=768, E=128, K=8; L=48)
with random bf16 weights. Each layer runs router -> policy -> experts: the router's GEMM [B, H] x [H, E]
is computed (its cost is in the step) but its output is replaced by router logits the shipped reference
model recorded for a real decode batch (E=128, K=8 like Qwen3-30B-A3B; stacked layer l takes reference
layer l mod its MoE layers), in two batchings: "same-domain" (all B sequences of one held-out domain)
and "mixed" (the domains in turn). The experts are two `torch._grouped_mm` calls over the slots sorted by
expert (an expert no token uses is not read) plus the residual add, so layer l+1's input is layer l's
output. On CUDA the whole step is captured in one CUDA graph and each timed sample is one replay
(CUDA events); on CPU (--dry-run) the same step runs eagerly.

Three variants of the step per policy, timed interleaved with every other policy in one run:
  step     router + policy + experts (the step an engine runs)
  experts  router + experts with the policy's routing computed beforehand (the routing alone removed);
           step - experts is the policy's own cost inside the step
  routing  the policy alone on the L layers' logits
Medians over steps x repeats samples with bootstrap 95% confidence intervals; ratio to native's step.
If fewer than L layers fit in GPU memory, as many as fit are run and `scaled_ms` scales to L.

    python benchmarks/decode_step.py --json out.json                # on a GPU: the full run
    python benchmarks/decode_step.py --dry-run --json out.json      # CPU, tiny sizes, seconds: the code path
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

from moe_reroute.contract import RouterSpec, Routing
from moe_reroute.measure.layer import MoELayer, grouped_mm_status, resolve_device
from moe_reroute.measure.shapes import LayerShape, custom_shape, get_shape
from moe_reroute.policies.spec import policy_from_spec

# gain is not among them: its set takes `budget` small device steps per layer, some 35,000 graph nodes a step
# at 48 layers, which alone would take most of the GPU run's time limit (`--policy gain:budget=32` adds it)
DEFAULT_POLICIES = ("native", "cap:k=4", "oea:k0=3", "sere", "budget:budget=32")
BATCHINGS = ("same-domain", "mixed")
VARIANTS = ("step", "experts", "routing")
FIRST_POSITION = 8  # positions before this have little context: not sampled
GROUPED_MM_TORCH = "2.8"  # the first torch release with torch._grouped_mm


def check_torch() -> None:
    """One line naming what is needed when this torch cannot run the bench."""
    if not hasattr(torch, "_grouped_mm"):
        raise SystemExit(f"decode_step: needs torch >= {GROUPED_MM_TORCH} (torch._grouped_mm); "
                         f"this torch is {torch.__version__}")


# ----------------------------------------------------------------------------------------- the step


class Stack:
    """L MoE layers at `shape`: router weights [L, H, E] and the experts of each layer (all E allocated)."""

    def __init__(self, shape: LayerShape, L: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.shape, self.L, self.device, self.dtype = shape, L, device, dtype
        self.layers = [MoELayer(shape, device, dtype, pool=shape.num_experts, seed=seed + i) for i in range(L)]
        g = torch.Generator(device).manual_seed(seed)
        self.router = (torch.randn(L, shape.hidden, shape.num_experts, generator=g, device=device)
                       / shape.hidden ** 0.5).to(dtype)  # [L, H, E]


def step(stack: Stack, x: torch.Tensor, logits: torch.Tensor, specs: list[RouterSpec], moe_layers: list[int],
         policy=None, routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One decode step's MoE work: x [B, H] -> [B, H]. logits [L, B, E]: the router logits each layer uses;
    routing (weights [L, B, K], ids [L, B, K]) replaces the policy (the "experts" variant). No host
    synchronisation and no data-dependent shape: capturable in a CUDA graph."""
    h = x
    for i, layer in enumerate(stack.layers):
        h @ stack.router[i]  # the router's GEMM: its cost is part of the step, its output is replaced
        if routing is None:
            r = policy(logits[i], specs[i], layer=moe_layers[i])
            # every row is a token (reference_batches has no padding): without `valid` the experts skip no
            # rows, where dropping the invalid ones would index by a mask, a host synchronisation
            r = Routing(r.weights, r.ids)
        else:
            r = Routing(routing[0][i], routing[1][i])
        h = h + layer.forward(h, r, "grouped_mm")
    return h


def route_only(logits: torch.Tensor, specs: list[RouterSpec], moe_layers: list[int], policy) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy alone on every layer's logits: (weights [L, B, K] float32, ids [L, B, K] int64)."""
    out = [policy(logits[i], specs[i], layer=moe_layers[i]) for i in range(logits.shape[0])]
    return torch.stack([r.weights.float() for r in out]), torch.stack([r.ids for r in out])


class Runner:
    """A function of static input buffers, captured in one CUDA graph (graph=True) or called eagerly.

    `run()` fills nothing: copy the step's inputs into `self.inputs` first. `out` is the last result."""

    def __init__(self, fn, inputs: dict[str, torch.Tensor], graph: bool, pool=None):
        self.fn, self.inputs, self.graph = fn, inputs, None
        if graph:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn(**inputs)  # warm-up outside the graph (kernels compiled, workspaces allocated)
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = fn(**inputs)
        else:
            self.out = None

    def run(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out = self.fn(**self.inputs)
        return self.out


def time_ms(runner: Runner, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    runner.run()
    return (time.perf_counter() - t0) * 1e3


# ----------------------------------------------------------------------------------------- inputs


@dataclass
class Batches:
    """Recorded router logits of real decode batches: logits [S, L, B, E] for S steps (B = the largest
    batch; a smaller one takes the first rows), the specs and MoE-layer numbers of the L stacked layers."""

    logits: torch.Tensor
    specs: list[RouterSpec]
    moe_layers: list[int]
    where: str


def reference_batches(L: int, B: int, steps: int, batching: str) -> Batches:
    """`steps` decode steps of B tokens from the reference model's held-out text, teacher-forced."""
    from moe_reroute.measure.bench import reference_trace
    from moe_reroute.reference import heldout_documents, load
    from moe_reroute.reference.card import domain_streams, trace_sequences

    model, tokenizer, _ = load()
    streams = domain_streams(tokenizer, heldout_documents())
    positions = FIRST_POSITION + steps
    seqs = trace_sequences(streams, B, positions, batching)  # one [B, positions] per domain, or one mixed
    picked = []  # (trace, position): same-domain steps take the domains in turn
    traces = [reference_trace(B, positions, model, s) for s in seqs[: min(len(seqs), steps)]]
    for s in range(steps):
        picked.append((traces[s % len(traces)], FIRST_POSITION + s // len(traces)))
    ref_layers = traces[0].layers
    specs = [traces[0].specs[ref_layers[i % len(ref_layers)]] for i in range(L)]
    moe = [traces[0].moe_layer(ref_layers[i % len(ref_layers)]) for i in range(L)]
    logits = torch.stack([torch.stack([t.logits[ref_layers[i % len(ref_layers)]][p].float() for i in range(L)])
                          for t, p in picked])  # [S, L, B, E]
    if not all(bool(t.valid[p].all()) for t, p in picked):
        raise SystemExit("decode_step: a recorded decode batch has padding rows; record longer sequences")
    where = (f"reference model's router logits, {batching} batches of {B} held-out sequences, positions "
             f"{FIRST_POSITION}..{positions - 1}; stacked layer l uses reference MoE layer l mod {len(ref_layers)}")
    return Batches(logits, specs, moe, where)


def reference_policies(specs: list[str]) -> dict:
    """{label: Policy} with check_inputs off (as inside an engine's CUDA graph); `sere` without a
    similarity takes the reference model's shipped one."""
    from moe_reroute.hf.calibrate import load_similarity
    from moe_reroute.policies import make_policy
    from moe_reroute.policies.spec import parse_policy_spec
    from moe_reroute.reference import path

    out = {}
    for text in specs:
        name, params = parse_policy_spec(text)
        if name == "sere" and "similarity" not in params:
            params["similarity"] = load_similarity(str(path() / "sere" / "similarity.safetensors"))
            out[text] = make_policy(name, check_inputs=False, **params)
        else:
            out[text] = policy_from_spec(text, check_inputs=False)
    return out


# ----------------------------------------------------------------------------------------- statistics


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def bootstrap_ci(xs: list[float], stat, n: int = 1000, seed: int = 0, ys: list[float] | None = None) -> tuple[float, float]:
    """95% percentile-bootstrap interval of stat(sample) (or stat(x sample, y sample) when ys is given)."""
    rng = random.Random(seed)
    vals = []
    for _ in range(n):
        a = [xs[rng.randrange(len(xs))] for _ in xs]
        vals.append(stat(a) if ys is None else stat(a, [ys[rng.randrange(len(ys))] for _ in ys]))
    vals.sort()
    return vals[int(0.025 * (n - 1))], vals[int(0.975 * (n - 1))]


# ----------------------------------------------------------------------------------------- the bench


def fit_layers(shape: LayerShape, want: int, device: torch.device, dtype: torch.dtype, reserve_gib: float = 6.0) -> int:
    """How many of `want` layers fit in the device's free memory, keeping `reserve_gib` for the rest."""
    if device.type != "cuda":
        return want
    free = torch.cuda.mem_get_info(device)[0] - reserve_gib * 2**30
    return max(1, min(want, int(free // shape.layer_bytes(dtype))))


def bench(shape: LayerShape, L: int, batch_sizes: list[int], policies: dict, batches: dict[str, Batches],
          device: torch.device, dtype: torch.dtype, repeats: int, warmup: int, graph: bool,
          deadline: float | None = None, seed: int = 0, log=print, progress=None) -> dict:
    """Every batch size (the outer loop: under a time limit the small and middle ones come first), each
    batching, every policy's three graphs interleaved. progress(out) is called with the results so far after
    each (batch size, batching), so that a run stopped from outside keeps what it measured."""
    stack = Stack(shape, L, device, dtype, seed)
    pool = torch.cuda.graph_pool_handle() if graph else None
    results, timed_out = [], []
    for B in batch_sizes:
        for batching, data in batches.items():
            if deadline is not None and time.monotonic() > deadline:
                timed_out.append({"batching": batching, "B": B})
                continue
            S = data.logits.shape[0]
            gen = torch.Generator().manual_seed(seed + B)
            x = (torch.randn(B, shape.hidden, generator=gen) * 0.1).to(device, dtype)  # [B, H]
            all_logits = data.logits[:, :, :B].to(device)  # [S, L, B, E] float32
            runners, pre = {}, {}
            for name, pol in policies.items():
                # the policy's routing of every step, computed beforehand for the "experts" variant
                routed = [route_only(all_logits[s], data.specs, data.moe_layers, pol) for s in range(S)]
                pre[name] = (torch.stack([w for w, _ in routed]), torch.stack([i for _, i in routed]))
                lg = all_logits[0].clone()
                w0, i0 = pre[name][0][0].clone(), pre[name][1][0].clone()
                runners[(name, "step")] = Runner(
                    lambda x, logits, p=pol: step(stack, x, logits, data.specs, data.moe_layers, policy=p),
                    {"x": x, "logits": lg}, graph, pool)
                runners[(name, "experts")] = Runner(
                    lambda x, w, ids: step(stack, x, None, data.specs, data.moe_layers, routing=(w, ids)),
                    {"x": x, "w": w0, "ids": i0}, graph, pool)
                runners[(name, "routing")] = Runner(
                    lambda logits, p=pol: route_only(logits, data.specs, data.moe_layers, p),
                    {"logits": lg}, graph, pool)
            keys = list(runners)
            samples: dict = {k: [] for k in keys}
            for rnd in range(warmup + repeats):
                for s in range(S):
                    shift = (rnd * S + s) % len(keys)
                    for key in keys[shift:] + keys[:shift]:
                        name, variant = key
                        inp = runners[key].inputs
                        if "logits" in inp:
                            inp["logits"].copy_(all_logits[s])
                        if "w" in inp:
                            inp["w"].copy_(pre[name][0][s])
                            inp["ids"].copy_(pre[name][1][s])
                        ms = time_ms(runners[key], device)
                        if rnd >= warmup:
                            samples[key].append(ms)
            # mean distinct experts per layer under each policy
            E = shape.num_experts
            for name in policies:
                ids = pre[name][1]  # [S, L, B, K]
                used = torch.zeros(*ids.shape[:2], E, dtype=torch.bool, device=ids.device)
                used.scatter_(2, ids.flatten(2), True)
                u = float(used.sum(-1).float().mean())
                st, ex, ro = (samples[(name, v)] for v in VARIANTS)
                nat = samples[("native", "step")] if "native" in policies else None
                row = {"batching": batching, "B": B, "policy": name, "mean_unique_experts": round(u, 2),
                       "samples": len(st)}
                for v in VARIANTS:
                    xs = samples[(name, v)]
                    lo, hi = bootstrap_ci(xs, median, seed=seed)
                    row[f"{v}_ms"] = {"median": median(xs), "ci95": [lo, hi]}
                cost = [a - b for a, b in zip(st, ex)]  # paired: same step, same round
                lo, hi = bootstrap_ci(cost, median, seed=seed)
                row["policy_cost_ms"] = {"median": median(cost), "ci95": [lo, hi]}
                if nat is not None:
                    lo, hi = bootstrap_ci(st, lambda a, b: median(a) / median(b), seed=seed, ys=nat)
                    row["step_vs_native"] = {"ratio": median(st) / median(nat), "ci95": [lo, hi]}
                results.append(row)
                log(f"{batching:12s} B={B:3d} {name:18s} U={u:6.1f}  step {median(st):8.3f} ms  "
                    f"experts {median(ex):8.3f} ms  routing {median(ro):7.3f} ms"
                    + (f"  x{median(st) / median(nat):.3f} of native" if nat is not None else ""))
            del runners, pre
            if progress is not None:
                progress({"results": results, "timed_out": timed_out})
    return {"results": results, "timed_out": timed_out}


def warm(policies: dict, batch_sizes: list[int], batching: str, device: torch.device) -> int:
    """Each policy called as the bench calls it (one layer's recorded logits, every batch size, the same device
    and dtype), so that its kernels are compiled; a later process finds them in Triton's cache."""
    t0 = time.monotonic()
    data = reference_batches(1, max(batch_sizes), 1, batching)
    for name, pol in policies.items():
        for B in batch_sizes:
            route_only(data.logits[0, :, :B].to(device), data.specs, data.moe_layers, pol)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"decode_step: warmed {len(policies)} policies at B = {', '.join(map(str, batch_sizes))} on {device} "
          f"in {time.monotonic() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen3-30b-a3b", help="a named layer shape (moe_reroute.measure.shapes)")
    p.add_argument("--dims", help="H,I,E,K instead of --shape (E=128, K=8 to take the reference model's logits)")
    p.add_argument("--layers", type=int, default=48, help="MoE layers in the step (fewer if they do not fit; then scaled)")
    p.add_argument("--batch-sizes", default="1,4,16,32,64")
    p.add_argument("--policy", action="append", help=f"policy spec, repeatable (default: {' '.join(DEFAULT_POLICIES)})")
    p.add_argument("--batching", default=",".join(BATCHINGS), help="same-domain, mixed or both (comma-separated)")
    p.add_argument("--steps", type=int, default=8, help="recorded decode steps (positions) per batching")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: no new batch size is started after this; those left are reported as timed out")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny sizes (dims 64,32,128,8, 2 layers, B=1,4, 2 steps, 1 repeat), no CUDA graph")
    p.add_argument("--warm-only", action="store_true",
                   help="only call every policy once at each batch size on the recorded logits (no expert weights, "
                        "nothing timed): Triton compiles the kernels the bench will run into its on-disk cache")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    check_torch()
    if a.dry_run:
        a.device, a.dims, a.layers, a.batch_sizes, a.steps, a.repeats, a.warmup = "cpu", "64,32,128,8", 2, "1,4", 2, 1, 0
        torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    t_start = time.monotonic()
    deadline = t_start + a.time_limit if a.time_limit else None
    device = resolve_device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = custom_shape(a.dims, "custom") if a.dims else get_shape(a.shape)
    batch_sizes = sorted({int(b) for b in a.batch_sizes.split(",")})
    batchings = [b.strip() for b in a.batching.split(",") if b.strip()]
    if any(b not in BATCHINGS for b in batchings):
        raise SystemExit(f"decode_step: --batching takes {' or '.join(BATCHINGS)}, got {a.batching!r}")
    probe = MoELayer(LayerShape("probe", shape.hidden, shape.intermediate, 8, min(shape.top_k, 8)), device, dtype, pool=8)
    ok, why = grouped_mm_status(probe)
    del probe
    if not ok:
        raise SystemExit(f"decode_step: {why}")
    policies = reference_policies(a.policy or list(DEFAULT_POLICIES))
    if a.warm_only:
        return warm(policies, batch_sizes, batchings[0], device)
    L = fit_layers(shape, a.layers, device, dtype)
    batches = {b: reference_batches(L, max(batch_sizes), a.steps, b) for b in batchings}
    E = batches[batchings[0]].logits.shape[-1]
    if E != shape.num_experts:
        raise SystemExit(f"decode_step: the recorded logits have E={E}, the shape {shape.dims()}; pick E={E}")
    graph = device.type == "cuda"
    head = {
        "bench": "decode_step", "shape": {"name": shape.name, "dims": shape.dims()}, "layers": L,
        "layers_asked": a.layers, "scaled": L != a.layers, "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda_graph": graph, "torch": torch.__version__, "batch_sizes": batch_sizes, "steps": a.steps,
        "repeats": a.repeats, "warmup": a.warmup, "dry_run": a.dry_run,
        "routing": {b: d.where for b, d in batches.items()},
    }

    def report_of(out: dict, complete: bool) -> dict:
        for row in out["results"]:
            row["scaled_ms"] = None if L == a.layers else row["step_ms"]["median"] * a.layers / L
        return {**head, "complete": complete, "seconds": round(time.monotonic() - t_start, 1), **out}

    def write(report: dict) -> None:  # whole or not at all: a reader never sees half a file
        if a.json:
            tmp = f"{a.json}.tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
            os.replace(tmp, a.json)

    out = bench(shape, L, batch_sizes, policies, batches, device, dtype, a.repeats, a.warmup, graph,
                deadline, a.seed, progress=lambda so_far: write(report_of(so_far, False)))
    report = report_of(out, True)
    write(report)
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
