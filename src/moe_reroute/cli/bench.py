"""`moe-reroute bench`: MoE-layer latency under each policy at a real model's dimensions, and the
cost model fitted to it (latency = b·U + a·T·K + c) with bandwidth-bound predictions for GPUs."""

from __future__ import annotations

import dataclasses
import json
import shlex

DEFAULT_POLICIES = ("native", "cap:k=4", "oea:k0=3", "budget:budget=32")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


MAX_SIZE = 1 << 20  # batch sizes and expert counts
ROUTING_CALLS = 20  # bench --routing: calls per timed round
LAYER_STEPS, LAYER_WARMUP = 8, 2  # the layer bench: decode steps per batch size, untimed rounds first
MAX_SEED = (1 << 63) - 1


class UsageError(ValueError):
    """A bad command-line argument; the message says how to fix it."""


def _shape(args):
    from ..measure.shapes import custom_shape, get_shape

    if args.dims and args.shape:
        raise UsageError("give --shape or --dims, not both")
    if args.dims:
        return custom_shape(args.dims)
    return get_shape(args.shape or "qwen3-30b-a3b")


def sizes(text: str, option: str = "--batch-sizes", example: str = "1,4,16,32") -> list[int]:
    """The sizes in `text` (comma-separated, each 1..MAX_SIZE), in the order given; UsageError naming `option`."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts) or not all(p.isascii() and p.isdigit() and 0 < int(p) <= MAX_SIZE for p in parts):
        raise UsageError(f"{option} must be integers 1..{MAX_SIZE} separated by commas, e.g. {example}; got {text!r}")
    return [int(p) for p in parts]


def _batch_sizes(text: str, option: str = "--batch-sizes", example: str = "1,4,16,32") -> list[int]:
    """`sizes`, sorted, each once."""
    return sorted(set(sizes(text, option, example)))


def policy_specs(specs: list[str] | None, defaults=DEFAULT_POLICIES) -> tuple[list[str], bool, list[str]]:
    """(the specs to run, native first where it was not given; whether the user gave them; notes): the
    user's `--policy` values without repeats, or `defaults`."""
    notes = []
    explicit = specs is not None
    specs = list(dict.fromkeys(specs or defaults))
    if "native" not in specs:
        specs.insert(0, "native")
        notes.append("native added: every ratio is relative to it")
    return specs, explicit, notes


def _policies(specs: list[str] | None, shape) -> tuple[dict, list[str]]:
    """{label: Policy} checked against the shape, and notes on what was changed."""
    import torch

    from ..contract import RouterSpec
    from ..policies.spec import policy_from_spec

    specs, explicit, notes = policy_specs(specs)
    probe = torch.randn(4, shape.num_experts, generator=torch.Generator().manual_seed(0))
    spec = RouterSpec(shape.num_experts, shape.top_k)
    out = {}
    for text in specs:
        try:
            policy = policy_from_spec(text)
            policy(probe, spec, layer=0)
        except (TypeError, ValueError) as e:
            if explicit:
                raise UsageError(f"{e} (shape {shape.name}: {shape.dims()})") from None
            notes.append(f"default policy {text} skipped: it does not fit {shape.dims()}")
            continue
        out[text] = policy
    return out, notes


TRACE_POSITIONS = 64  # positions of the reference model's trace; the timed steps are spread over them


def _routings(args, shape, policies, batch_sizes):
    """(routings_for(batch_size) -> {policy: [Routing]}, a line saying where the routing comes from)."""
    from ..measure import bench

    if args.routing == "uniform":
        if args.trace:
            raise UsageError("--trace and --routing uniform exclude each other")
        return (lambda B: bench.uniform_routings(policies, shape, B, args.steps, seed=args.seed),
                "routing: random logits, not a trace")
    if args.trace:
        from ..traces import load

        trace = load(args.trace)
        where = f"routing: trace {args.trace} (model {trace.meta.get('model', '?')})"
    else:
        try:
            trace = bench.reference_trace(max(batch_sizes), TRACE_POSITIONS)
        except (FileNotFoundError, ImportError, OSError) as e:
            raise UsageError(
                f"no routing trace: recording one from the shipped reference model failed ({str(e).splitlines()[0]}). "
                "Give --trace PATH (a trace saved from moe_reroute.hf.Recorder) or --routing uniform"
            ) from None
        where = (f"routing: trace of the shipped reference model on the validation part of its held-out text "
                 f"({max(batch_sizes)} sequences, "
                 "the held-out domains in turn, x "
                 f"{TRACE_POSITIONS} positions, teacher-forced; {args.steps} (position, layer) steps spread over it)")
    bench.routings_from_trace(trace, {}, max(batch_sizes), 1, shape=shape)  # E, K and batch size checked up front
    return (lambda B: bench.routings_from_trace(trace, policies, B, args.steps, shape=shape)), where


def _say(args):
    """How the tables are printed: on stdout, or with --json on stderr, so that stdout holds the JSON alone
    (`moe-reroute bench --json > bench.json` is a file `report --bench` and `tune --bench` read)."""
    import functools
    import sys

    return functools.partial(print, file=sys.stderr) if args.json else print


def _run(args) -> int:
    import torch

    try:
        if not 0 <= args.seed <= MAX_SEED:
            raise UsageError(f"--seed must be 0..{MAX_SEED}, got {args.seed}")
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        threads = torch.get_num_threads()
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        try:
            return _bench(args)
        finally:
            torch.set_num_threads(threads)
    except UsageError as e:
        raise SystemExit(f"moe-reroute bench: error: {e}") from None


def busy_note(device, threads: int) -> str | None:
    """A line when other work keeps the CPU busy, so that torch's threads would share cores with it: on CPU,
    when the 1-minute load average and `threads` exceed the cores."""
    import os

    from ..measure.bench import busy_cores

    if getattr(device, "type", str(device)) != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    busy = busy_cores(load, threads)
    if busy is None:
        return None
    cores, free = busy
    return (f"note: the machine is busy (load average {load:.1f} on {cores} cores) and torch runs {threads} "
            f"thread{'s' * (threads != 1)}: threads that share a core with other work wait for each other, so "
            f"calls get slow and noisy" + (f"; --threads {free} uses the cores that are free" if free < threads else ""))


def _routing_bench(args) -> int:
    """`bench --routing`: µs per routing call per policy and backend, next to the model's own router."""
    import torch

    from ..measure import routing
    from ..policies.spec import parse_policy_spec

    layer_only = [o for o, v in (("--steps", args.steps), ("--warmup", args.warmup), ("--kernel", args.kernel),
                                 ("--no-flush", args.no_flush or None)) if v is not None]
    if layer_only:
        raise UsageError(f"{', '.join(layer_only)} time{'s' * (len(layer_only) == 1)} the MoE layer, not the routing "
                         "call: drop them with --routing (its rounds are --repeats, of --calls calls each)")
    if args.trace or args.shape or args.dims or args.ep:
        raise UsageError("--routing times the routing call alone: --trace, --shape, --dims and --ep do not apply "
                         "(the layer share uses the shape of each E: " +
                         ", ".join(f"E={e}: {n}" for e, n in routing.LAYER_FOR_EXPERTS.items()) + ")")
    batch_sizes = _batch_sizes(args.batch_sizes or ",".join(map(str, routing.ROUTING_BATCH_SIZES)))
    experts = _batch_sizes(args.experts, "--experts", "64,128,256") if args.experts else list(routing.ROUTING_EXPERTS)
    specs = list(dict.fromkeys(args.policy or routing.DEFAULT_ROUTING_POLICIES))
    if "native" not in specs:
        specs.insert(0, "native")
    for text in specs:
        try:
            parse_policy_spec(text)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.repeats < 1:
        raise UsageError("--repeats must be >= 1")
    if args.calls is not None and args.calls < 1:
        raise UsageError(f"--calls must be >= 1, got {args.calls}")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    from ..measure.layer import resolve_device

    note = busy_note(resolve_device(args.device), torch.get_num_threads())
    if note:
        _say(args)(note)
    calls = ROUTING_CALLS if args.calls is None else args.calls
    try:
        result = routing.bench_routing({s: s for s in specs}, tuple(batch_sizes), tuple(experts), device=args.device,
                                       dtype=dtype, repeats=args.repeats, calls=calls,
                                       layer_share=not args.no_layer, progress=not args.no_progress)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _say(args)(routing.table(result))
    if args.json:
        out = {"command": "moe-reroute " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []))}
        print(json.dumps(out | result.to_dict()))
    return 0


def _bench(args) -> int:
    import torch

    from ..measure import bench, costmodel

    if args.routing == "time":
        return _routing_bench(args)
    given = [o for o, v in (("--experts", args.experts), ("--calls", args.calls), ("--no-layer", args.no_layer or None))
             if v is not None]
    if given:
        raise UsageError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --routing (the routing call "
                         "alone); add --routing, or drop them")
    args.steps = LAYER_STEPS if args.steps is None else args.steps
    args.warmup = LAYER_WARMUP if args.warmup is None else args.warmup
    args.kernel = args.kernel or "auto"
    try:
        shape = _shape(args)
        batch_sizes = _batch_sizes(args.batch_sizes or "16")
        policies, notes = _policies(args.policy, shape)
        device = bench.resolve_device(args.device)
        if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
            raise UsageError("--steps and --repeats must be >= 1 and --warmup >= 0")
        if args.ep is not None and not 1 <= args.ep <= shape.num_experts:
            raise UsageError(f"--ep D needs 1 <= D <= E={shape.num_experts}, got {args.ep}")
        routings_for, where = _routings(args, shape, policies, batch_sizes)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    say = _say(args)
    note = busy_note(device, torch.get_num_threads())
    if note:
        say(note)
    bandwidth = bench.measure_bandwidth(device)
    layer = bench.MoELayer(shape, device, dtype, seed=args.seed)
    say(f"shape {shape.name}: {shape.dims()}; {layer.dtype} on {device}; {where}")
    say(f"peak read bandwidth {bandwidth.gbps:.1f} GB/s ({bandwidth.method})")
    if layer.aliasing:
        say(f"NOTE {layer.aliasing}")
    for note in notes:
        say(f"note: {note}")

    results, routings = {}, {}
    for B in batch_sizes:
        routings[B] = routings_for(B)
        res = bench.bench_policies(shape, routings[B], device, args.repeats, args.warmup, args.kernel,
                                   progress=not args.no_progress, flush=not args.no_flush, layer=layer,
                                   bandwidth=bandwidth, seed=args.seed)
        results[B] = res
        say("")
        say(_table(B, res))

    points = [p for res in results.values() for t in res.policies.values() for p in t.points]
    out = {"command": "moe-reroute " + " ".join(shlex.quote(a) for a in getattr(args, "argv", [])),
           "shape": dataclasses.asdict(shape) | {"bytes_per_expert": shape.bytes_per_expert(layer.dtype)},
           "routing": where, "notes": notes, "bandwidth": dataclasses.asdict(bandwidth),
           "results": {str(B): r.to_dict() for B, r in results.items()}}
    try:
        model = costmodel.fit_cost_model(points)
    except ValueError as e:
        model = None
        say(f"\ncost model: not fitted ({e})")
    if model is not None:
        say(f"\ncost model over batch sizes {batch_sizes}: {model.describe()}")
        for warning in costmodel.physical_warnings(model):
            say(f"WARNING: {warning}")
        out["cost_model"] = model.to_dict()
        out["predictions"] = _predictions(shape, layer.dtype, bandwidth, model, results, say)
        if args.ep:
            out["ep"] = _expert_parallel(shape, args.ep, model, routings, say)
    if args.json:
        print(json.dumps(out))
    return 0


def _table(B: int, res) -> str:
    from ..measure.bench import NOISE_SPREAD

    head = (f"batch {B}: {res.shape.name}, {res.dtype} on {res.device}, kernel {res.kernel_note}; "
            f"{next(iter(res.policies.values())).steps} steps x {res.repeats} repeats (+{res.warmup} warm-up), "
            f"interleaved; {res.cache}")
    rows = [("policy", "U", "median ms", "IQR ms", "MB/step", "GB/s", "% peak", "x native")]
    for name, t in res.policies.items():
        ratio = f"{t.ratio_vs_native:.3f}" if t.ratio_vs_native is not None else "-"
        rows.append((name, f"{t.mean_unique:.1f}", f"{t.median_ms:.3f}", f"{t.iqr_ms:.3f}",
                     f"{t.bytes_per_step / 1e6:.1f}", f"{t.achieved_gbps:.1f}", f"{100 * t.peak_fraction:.0f}", ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    if res.noisy:
        lines.append(f"WARNING: repeated calls vary by {100 * res.spread:.0f}% (IQR / median) here, more than "
                     f"{100 * NOISE_SPREAD:.0f}%: the ratios above are noise, not results (other work on the machine?); "
                     "rerun on an idle machine or with more --repeats")
    return "\n".join([head, *lines])


def _predictions(shape, dtype, bandwidth, model, results, say) -> list[dict]:
    """Per batch size and policy: measured, fitted, and bandwidth lower bounds (bf16 weights on GPUs)."""
    import torch

    from ..measure.costmodel import HARDWARE_GBPS, bandwidth_bound_ms

    gpu_bytes = shape.bytes_per_expert(torch.bfloat16)
    here_bytes = shape.bytes_per_expert(dtype)
    gpus = [k for k, v in HARDWARE_GBPS.items() if v is not None]
    say(f"predictions (ms): fit = the cost model; {'/'.join(gpus)} = U x bf16 expert bytes / peak bandwidth, "
        f"a lower bound (no compute, dispatch or launch cost); measured-bw = the same at this device's "
        f"{bandwidth.gbps:.0f} GB/s in {str(dtype).removeprefix('torch.')}")
    rows = [("batch", "policy", "U", "measured", "fit", *gpus, "measured-bw")]
    out = []
    for B, res in results.items():
        for name, t in res.policies.items():
            bounds = {g: bandwidth_bound_ms(t.mean_unique, gpu_bytes, HARDWARE_GBPS[g]) for g in gpus}
            here = bandwidth_bound_ms(t.mean_unique, here_bytes, bandwidth.gbps)
            fit = model.predict(t.mean_unique, t.mean_slots)
            out.append({"batch": B, "policy": name, "unique": t.mean_unique, "measured_ms": t.median_ms,
                        "fit_ms": fit, "bound_ms": bounds | {"measured_bandwidth": here}})
            rows.append((str(B), name, f"{t.mean_unique:.1f}", f"{t.median_ms:.3f}", f"{fit:.3f}",
                         *(f"{bounds[g]:.4f}" for g in gpus), f"{here:.3f}"))
    say(_grid(rows))
    return out


def _expert_parallel(shape, ranks, model, routings, say) -> list[dict]:
    """Busiest-rank U and predicted latency with experts split over D ranks in contiguous blocks."""
    import torch

    from ..measure.costmodel import HARDWARE_GBPS, bandwidth_bound_ms, ep_max_unique, ep_predict

    gpu_bytes = shape.bytes_per_expert(torch.bfloat16)
    say(f"expert parallelism over D={ranks} ranks (contiguous expert blocks; the step waits for the busiest rank): "
        "max-U per rank, the cost model on each rank's U and slots, and the h100 bandwidth lower bound")
    rows = [("batch", "policy", "max U/rank", "fit ms", "h100 bound ms")]
    out = []
    for B, by_policy in routings.items():
        for name, steps in by_policy.items():
            max_u = sum(ep_max_unique(r, shape.num_experts, ranks) for r in steps) / len(steps)
            fit = sum(ep_predict(r, shape.num_experts, ranks, model) for r in steps) / len(steps)
            bound = bandwidth_bound_ms(max_u, gpu_bytes, HARDWARE_GBPS["h100"])
            out.append({"batch": B, "policy": name, "ranks": ranks, "max_unique_per_rank": max_u,
                        "fit_ms": fit, "h100_bound_ms": bound})
            rows.append((str(B), name, f"{max_u:.2f}", f"{fit:.3f}", f"{bound:.4f}"))
    say(_grid(rows))
    return out


def _grid(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def add_parsers(sub) -> None:
    from ..measure.shapes import SHAPES

    p = sub.add_parser("bench", help="MoE-layer latency per policy at a real model's dimensions; cost model",
                       description=__doc__)
    p.add_argument("--shape", default=None, help=f"layer shape: {', '.join(SHAPES)} (default qwen3-30b-a3b)")
    p.add_argument("--dims", default=None, metavar="H,I,E,K", help="a custom shape instead of --shape")
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="routing trace (default: recorded from the shipped reference model)")
    p.add_argument("--routing", nargs="?", const="time", choices=("trace", "uniform", "time"), default="trace",
                   help="--routing alone: time the routing call itself (each policy on torch and on the fused "
                        "kernels, next to the model's router) instead of the layer; --routing uniform: random "
                        "router logits instead of a trace")
    p.add_argument("--experts", default=None, metavar="E,E", help="with --routing: expert counts (default 64,128,256)")
    p.add_argument("--calls", type=int, default=None,
                   help=f"with --routing: calls per timed round (per CUDA graph; default {ROUTING_CALLS})")
    p.add_argument("--no-layer", action="store_true", help="with --routing: do not time the MoE layer for the share")
    p.add_argument("--policy", action="append", default=None, metavar="SPEC",
                   help=f"policy spec, repeatable, e.g. oea:k0=3 (default: {' '.join(DEFAULT_POLICIES)})")
    p.add_argument("--batch-sizes", default=None,
                   help="decode batch sizes, e.g. 1,4,16,32 (default 16; with --routing 1,8,16,64,256,1024)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"decode steps (layer x step of the trace) per batch size (default {LAYER_STEPS})")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights (default float32 CPU, bfloat16 CUDA)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed rounds first (default {LAYER_WARMUP})")
    p.add_argument("--kernel", choices=("auto", "loop", "grouped_mm"), default=None,
                   help="the experts' matmuls: a loop over the active experts, torch's grouped GEMM, or (auto, the "
                        "default) the faster of the two in a native-routing trial")
    p.add_argument("--ep", type=int, default=None, metavar="D", help="also predict expert parallelism over D ranks")
    p.add_argument("--no-flush", action="store_true", help="do not flush the caches between timed calls")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0, help="seed of the layer's random weights and inputs")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads on CPU (default: torch's, one per core; on a machine busy with other work, "
                        "the cores that are free)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout, the tables on stderr: `bench --json > bench.json`")
    p.set_defaults(run=_run)
