"""`moe-reroute demo`: the main job on the shipped reference model, CPU, one thread, under two minutes.

Native routing, a default of `cap`, `oea`, `sere` and `budget` (`DEFAULT_POLICIES`), and the tuned policy
file shipped with the reference model (`tuned-oea.json`, `moe-reroute tune --policy oea` at batches 1, 4, 16
and 64) at decode batch 16, for decode batches of one domain
("same-domain") and batches mixing the held-out split's seven domains ("mixed"): distinct experts per
layer (U), held-out cross-entropy against native with a paired 95% CI, greedy generation against native,
and the MoE-layer latency ratio measured at Qwen3-30B-A3B's layer shape with the routings these policies
make on the reference model's router logits (same 128-expert top-8 geometry), with a noise check: when
the same call's time varies too much between repeats, the ratios are reported as noise. Then a report
with everything printed and plots (same-domain batches): each policy family swept over its parameter,
and U against batch size replayed on the model's routing trace of mixed batches.

One torch thread by default (--threads): the reference model's matmuls are too small for a second thread
to pay, and on a machine shared with other work a thread pool's threads wait for each other (spinning)
whenever one is descheduled, which multiplied the demo's CPU time several times over on a busy 2-core
machine. Each phase prints its elapsed and CPU time.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from .measure import DEFAULT_POLICIES

# two more settings of each family beside its default: the ends of the quality-against-U curves
SWEEP = ("cap:k=2", "cap:k=6", "oea:k0=1", "oea:k0=5", "sere:primary=1", "sere:primary=3", "budget:budget=16",
         "budget:budget=48")
BATCH = 16
TUNED = "tuned-oea.json"  # shipped beside the reference model: `tune --policy oea` at batches 1, 4, 16, 64
REPLAY_BATCHES = (1, 4, 8, 16, 32, 64)
BATCHINGS = ("same-domain", "mixed")
ENGINE_REPEATS = 2
ENGINE_OUTPUT_LEN = 32


class Phases:
    """Elapsed (wall-clock) and CPU seconds of each phase, printed as each one ends:
    `[2/4 generation] done in 3 s (CPU 3 s)`. CPU time is this process's, all its threads: on a machine
    shared with other work, wall time grows with the load while CPU time stays near what the phase costs."""

    def __init__(self, say, n: int) -> None:
        self.say, self.n, self.seconds, self.cpu_seconds = say, n, {}, {}

    def start(self, i: int, name: str, what: str) -> str:
        """Announce phase i; returns its tag for progress lines, e.g. `[1/4 quality]`."""
        self.t, self.cpu, self.name, self.tag = time.time(), time.process_time(), name, f"[{i}/{self.n} {name}]"
        self.say(f"{self.tag} {what}")
        return self.tag

    def end(self) -> None:
        self.seconds[self.name] = round(time.time() - self.t, 1)
        self.cpu_seconds[self.name] = round(time.process_time() - self.cpu, 1)
        self.say(f"{self.tag} done in {self.seconds[self.name]:.0f} s (CPU {self.cpu_seconds[self.name]:.0f} s)")


def _demo(args) -> int:
    import torch

    from ..measure.shapes import get_shape
    from .inputs import at_least, check_out_dir

    check_out_dir(args.out)  # bad --out or --shape fail now, not after the run
    for option, value, low in (("--sequences", args.sequences, 2), ("--seq-len", args.seq_len, 2),
                               ("--generate", args.generate, 1), ("--replay-steps", args.replay_steps, 1),
                               ("--bench-steps", args.bench_steps, 1), ("--repeats", args.repeats, 1),
                               ("--threads", args.threads, 1)):
        at_least(value, low, option)
    get_shape(args.shape)
    from ..reference import heldout_documents

    documents = heldout_documents()  # read once: its domains now, its text for the run
    domains = len({doc.domain for doc in documents})
    most = -(-args.sequences // domains)  # the sequences of the domain that gets the most
    if most < BATCH:
        raise SystemExit(f"error: --sequences {args.sequences}: same-domain batches of {BATCH} need {BATCH} sequences "
                         f"of one domain, and {args.sequences} split among the {domains} held-out domains give at most "
                         f"{most}; give --sequences {BATCH * domains} ({BATCH} per domain) or more")
    if args.engine:
        from ..measure import serve_bench

        try:
            serve_bench.check_vllm_version(serve_bench.vllm_version())
        except serve_bench.BenchError as e:
            raise SystemExit(f"error: --engine: {e}") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, documents)
    finally:
        torch.set_num_threads(threads)


def _run(args, documents) -> int:
    import math

    import torch

    from ..measure import bench, report
    from ..measure.evaluate import EvalConfig, batch_order, domain_sequences, evaluate, generation_check
    from ..measure.shapes import get_shape
    from ..progress import progress as progress_bar
    from ..reference import load
    from ..reference.card import domain_streams, trace_sequences
    from .measure import build_policies

    t0, cpu0 = time.time(), time.process_time()
    torch.manual_seed(0)
    say = (lambda *a, **k: None) if args.json else print
    n = 5 if args.engine else 4  # phases
    phases = Phases(say, n)
    threads = f"{args.threads} thread{'s' * (args.threads != 1)}"
    say(f"moe-reroute demo: the shipped reference model (Qwen3-MoE, 128 experts, top-8), CPU ({threads}), float32, "
        "batch 16")
    model, tokenizer, _ = load()
    streams = domain_streams(tokenizer, documents)
    try:  # enough text for --sequences of --seq-len tokens: said before any step starts
        domain_sequences(streams, args.seq_len, args.sequences)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    defaults = build_policies(DEFAULT_POLICIES, model)
    from ..policies import load_policy
    from ..reference import path as reference_path

    tuned_file = reference_path() / TUNED
    if tuned_file.exists():  # the best setting the project ships: a row beside the defaults
        defaults[f"tuned:{TUNED}"] = load_policy(tuned_file)
    with_native = {"native": build_policies(["native"], model)["native"], **defaults}
    sweep = build_policies(SWEEP if not args.no_sweep else (), model)
    progress = not args.json
    D = len(streams)

    tag = phases.start(1, "quality", f"{args.sequences} held-out sequences of {args.seq_len} tokens "
                       f"({args.sequences // D} from each of {D} domains), each position's 16 tokens routed as one "
                       f"decode batch; same-domain batches: {1 + len(defaults) + len(sweep)} routings, mixed batches: "
                       f"{1 + len(defaults)}")
    config = EvalConfig(batch_sizes=(BATCH,), seq_len=args.seq_len, num_sequences=args.sequences, resamples=2000)
    try:
        evaluations = {"same-domain": evaluate(model, streams, {**defaults, **sweep}, config, progress=progress,
                                               batching="same-domain", desc=f"{tag} same-domain batches"),
                       "mixed": evaluate(model, streams, defaults, config, progress=progress, batching="mixed",
                                         desc=f"{tag} mixed batches")}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    phases.end()

    tag = phases.start(2, "generation", f"greedy generation: {BATCH} prompts of 32 tokens (the domains in turn), "
                       f"{args.generate} new tokens, against native")
    seqs, labels = domain_sequences(streams, 32, BATCH * D)
    prompts = seqs[batch_order(labels, BATCH, "mixed")[:BATCH]]
    generation = generation_check(model, prompts, defaults, max_new_tokens=args.generate, progress=progress, desc=tag)
    phases.end()

    tag = phases.start(3, "U vs batch", "U against batch size: every policy replayed on the model's routing trace "
                       "of mixed batches")
    trace = bench.reference_trace(max(REPLAY_BATCHES), args.replay_steps, model,
                                  trace_sequences(streams, max(REPLAY_BATCHES), args.replay_steps, "mixed")[0])
    u_by_batch = {}
    bar = progress_bar(len(with_native) * len(REPLAY_BATCHES), progress, tag, unit="replays")
    for label, policy in with_native.items():
        u_by_batch[label] = {}
        for B in REPLAY_BATCHES:
            per_layer = trace.rebatch(B).replay(policy)
            u_by_batch[label][B] = sum(u.double().mean().item() for u in per_layer.values()) / len(per_layer)
            bar.update(1)
    bar.close()
    phases.end()

    shape = get_shape(args.shape)
    tag = phases.start(4, "latency", f"MoE-layer latency: {shape.name} layer shape (H={shape.hidden}, "
                       f"I={shape.intermediate}, E={shape.num_experts}, K={shape.top_k}) on CPU, routings from the "
                       f"reference model's router logits, {args.repeats} interleaved repeats")
    ratios, bench_json, kernel, steps_timed, noise = {}, {}, "", {}, {}
    layer, bandwidth = bench.MoELayer(shape, "cpu", seed=0), bench.measure_bandwidth("cpu")
    for batching in BATCHINGS:
        parts = trace_sequences(streams, BATCH, 64, batching)  # steps spread over 64 positions
        per = math.ceil(args.bench_steps / len(parts))
        routings = {name: [] for name in with_native}
        for seq in parts:
            for name, rs in bench.routings_from_trace(bench.reference_trace(BATCH, 64, model, seq), with_native,
                                                      BATCH, per, shape=shape).items():
                routings[name] += rs
        result = bench.bench_policies(shape, routings, "cpu", repeats=args.repeats, warmup=1, progress=progress,
                                      layer=layer, bandwidth=bandwidth, desc=f"{tag} {batching} batches")
        measured = result.to_dict()
        kernel, steps_timed[batching] = result.kernel, len(routings["native"])
        bench_json[batching] = {
            "command": "", "shape": {**measured["shape"], "bytes_per_expert": shape.bytes_per_expert(torch.float32)},
            "routing": f"the reference model's native router logits on held-out text, {batching} decode batches of "
                       f"{BATCH}, {len(routings['native'])} (position, layer) steps",
            "bandwidth": measured["bandwidth"], "results": {str(BATCH): measured}}
        ratios[batching] = {name: t["ratio_vs_native"] for name, t in measured["policies"].items()}
        noise[batching] = {"spread": result.spread, "noisy": result.noisy}
    phases.end()

    command = "moe-reroute " + " ".join(shlex.quote(a) for a in args.argv)
    for b in bench_json.values():
        b["command"] = command
    engine = None
    if args.engine:
        from ..measure import serve_bench

        phases.start(5, "vLLM", f"vLLM end to end: the reference model at batch {BATCH}, native and each policy, "
                     f"{ENGINE_REPEATS} interleaved repeats, each run in a fresh engine")
        engine_policies = list(DEFAULT_POLICIES) + ([str(tuned_file)] if tuned_file.exists() else [])
        cfg = serve_bench.Config(model=str(reference_path()), policies=engine_policies, batch_sizes=[BATCH],
                                 output_len=ENGINE_OUTPUT_LEN, repeats=ENGINE_REPEATS)
        try:
            engine = serve_bench.run(cfg, Path(args.out) / "engine", command, say=say)
        except serve_bench.BenchError as e:
            raise SystemExit(f"error: --engine: {e}") from None
        phases.end()
    gen = {g["policy"]: g for g in generation}
    rows = [dict(r, latency_ratio=ratios[b].get(r["policy"], float("nan")))
            for b in BATCHINGS for r in evaluations[b]["rows"] if r["policy"] in ("native", *defaults)]
    conditions = (f"Batch {BATCH}, reference model, CPU ({threads}) float32; latency: {shape.name} MoE layer, "
                  f"{kernel} kernel, median of {args.repeats} interleaved repeats x {steps_timed['same-domain']} (same-domain) / "
                  f"{steps_timed['mixed']} (mixed) steps, peak read bandwidth {bandwidth.gbps:.1f} GB/s measured in "
                  f"the same run; greedy generation: {BATCH} prompts of the domains in turn")
    table = _table(rows, gen, noise)
    lines = [conditions, "", table, ""]
    for batching, nz in noise.items():
        if nz["noisy"]:
            lines.append(f"MoE latency, {batching}: the same call's time varied by {_pct(nz['spread'])} between repeats "
                         f"(IQR / median), more than {100 * bench.NOISE_SPREAD:.0f}%: its ratios are noise, not "
                         "results (other work on the machine?); they are in results.json. Rerun with more --repeats "
                         "on an idle machine.")
    lines.append(f"Uniform routing would activate {report.uniform_expectation(128, 8, BATCH):.1f} experts per layer at "
                 f"batch {BATCH}.")
    if engine:
        from ..measure import serve_bench

        lines += ["", f"vLLM {engine['conditions']['vllm']} end to end on {engine['conditions']['device']}, "
                  f"{engine['conditions']['dtype']}, batch {BATCH}, {ENGINE_OUTPUT_LEN} output tokens:", "",
                  serve_bench.table(engine)]
    t_report, cpu_report = time.time(), time.process_time()
    out = report.write(Path(args.out), evaluations["same-domain"], command, bench=bench_json["same-domain"],
                       generation=generation, batch=BATCH, u_by_batch=u_by_batch, serve=engine,
                       more={"mixed": {"evaluation": evaluations["mixed"], "bench": bench_json["mixed"]}},
                       summary="\n".join(lines), phases=phases.seconds)
    phases.seconds["report"] = round(time.time() - t_report, 1)
    phases.cpu_seconds["report"] = round(time.process_time() - cpu_report, 1)
    elapsed, cpu = time.time() - t0, time.process_time() - cpu0
    if args.json:
        print(json.dumps({"rows": rows, "latency_ratio": ratios, "latency_noise": noise, "generation": generation,
                          "report": str(out), "engine": engine["rows"] if engine else None,
                          "phases": phases.seconds, "phases_cpu": phases.cpu_seconds, "seconds": round(elapsed, 1),
                          "cpu_seconds": round(cpu, 1), "threads": args.threads}))
        return 0
    print("\n" + "\n".join(lines))
    busy = ": the machine was busy with other work, so the elapsed time is longer" if cpu < 0.75 * elapsed else ""
    print("\nElapsed: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.seconds.items()) + f"; {elapsed:.0f} s in all "
          f"(CPU time {cpu:.0f} s, {threads}{busy})")
    print(f"Report with plots and both batchings: {out}")
    return 0


def _pct(x: float) -> str:
    return "unknown (fewer than 3 repeats)" if x != x else f"{100 * x:.0f}%"


def _table(rows: list[dict], gen: dict, noise: dict) -> str:
    """The summary table: both batchings, the latency column `noise` where the timings were."""
    out = ["| batches | policy | U / layer | experts / token | Δ CE [95% CI] | significant loss | greedy tokens changed | "
           "MoE latency / native |", "| --- | --- | ---: | ---: | --- | --- | ---: | ---: |"]
    for r in rows:
        lo, hi = r["delta_ce_ci"]
        g = gen.get(r["policy"])
        # the generation check's prompts mix the domains: shown on the mixed rows
        changed = "—" if r["batching"] != "mixed" else f"{g['differing_tokens']}/{g['generated_tokens']}" if g else "0"
        latency = "noise" if noise[r["batching"]]["noisy"] else f"{r['latency_ratio']:.2f}"
        out.append(f"| {r['batching']} | {r['policy']} | {r['mean_unique']:.1f} | {r['experts_per_token']:.2f} | "
                   f"{r['delta_ce']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {'yes' if r['significant_loss'] else 'no'} | "
                   f"{changed} | {latency} |")
    return "\n".join(out)


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="the main job: native, cap, oea, sere, budget and the shipped tuned policy on the "
                       "shipped reference model at batch 16, with a report")
    p.add_argument("--out", default="moe-reroute-report", help="report folder (default ./moe-reroute-report)")
    p.add_argument("--sequences", type=int, default=112, help="held-out sequences for the quality check, split "
                   "equally among the 7 domains; same-domain batches of 16 need 16 per domain (default 112)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--generate", type=int, default=24, help="greedy tokens in the generation check (default 24)")
    p.add_argument("--no-sweep", action="store_true", help="only the default of each policy, no parameter sweep")
    p.add_argument("--replay-steps", type=int, default=32, help="trace positions for U against batch size (default 32)")
    p.add_argument("--shape", default="qwen3-30b-a3b", help="MoE layer shape for the latency check (default qwen3-30b-a3b)")
    p.add_argument("--bench-steps", type=int, default=4, help="decode steps (trace position x layer) timed (default "
                   "4; same-domain batches: at least one per domain)")
    p.add_argument("--repeats", type=int, default=4, help="interleaved latency repeats (default 4; at least 3 for the "
                   "noise check)")
    p.add_argument("--engine", action="store_true", help="also time vLLM end to end on the reference model at batch "
                   "16 (`serve-bench`; needs vLLM: pip install 'moe-reroute[vllm]'; about 4 more minutes on 2 cores)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the reference model's matmuls "
                   "are too small for a second thread to pay, and on a machine shared with other work, threads that "
                   "wait for each other can multiply the time several times over)")
    p.add_argument("--json", action="store_true", help="print one JSON object, no tables or progress")
    p.set_defaults(run=_demo, needs=("hf", "plots"))
