"""`moe-reroute demo`: the main job on the shipped reference model, CPU, a few minutes.

Native routing and a default of each policy at decode batch 16, for decode batches of one domain
("same-domain") and batches mixing the held-out split's seven domains ("mixed"): distinct experts per
layer (U), held-out cross-entropy against native with a paired 95% CI, greedy generation against native,
and the MoE-layer latency ratio measured at Qwen3-30B-A3B's layer shape with the routings these policies
make on the reference model's router logits (same 128-expert top-8 geometry). Then a report with plots
(same-domain batches): each policy family swept over its parameter, and U against batch size replayed on
the model's routing trace of mixed batches.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from .measure import DEFAULT_POLICIES

SWEEP = ("cap:k=2", "cap:k=3", "cap:k=6", "oea:k0=1", "oea:k0=2", "oea:k0=5", "sere:primary=1", "sere:threshold=0",
         "sere:primary=3", "budget:budget=16", "budget:budget=24", "budget:budget=48")
BATCH = 16
REPLAY_BATCHES = (1, 4, 8, 16, 32, 64)
BATCHINGS = ("same-domain", "mixed")
ENGINE_REPEATS = 2
ENGINE_OUTPUT_LEN = 32


def _demo(args) -> int:
    import math

    import torch

    from ..measure import bench, report
    from ..measure.evaluate import EvalConfig, batch_order, domain_sequences, evaluate, generation_check
    from ..measure.shapes import get_shape
    from ..reference import heldout_documents, load
    from ..reference.card import domain_streams, trace_sequences
    from .inputs import at_least, check_out_dir
    from .measure import build_policies

    check_out_dir(args.out)  # bad --out or --shape fail now, not after the run
    for option, value, low in (("--sequences", args.sequences, 2), ("--seq-len", args.seq_len, 2),
                               ("--generate", args.generate, 1), ("--replay-steps", args.replay_steps, 1),
                               ("--bench-steps", args.bench_steps, 1), ("--repeats", args.repeats, 1)):
        at_least(value, low, option)
    get_shape(args.shape)
    if args.engine:
        from ..measure import serve_bench

        try:
            serve_bench.check_vllm_version(serve_bench.vllm_version())
        except serve_bench.BenchError as e:
            raise SystemExit(f"error: --engine: {e}") from None
    t0 = time.time()
    torch.manual_seed(0)
    say = (lambda *a, **k: None) if args.json else print
    n = 5 if args.engine else 4  # steps
    say("moe-reroute demo: the shipped reference model (Qwen3-MoE, 128 experts, top-8), CPU, float32, batch 16")
    model, tokenizer, _ = load()
    streams = domain_streams(tokenizer, heldout_documents())
    defaults = build_policies(DEFAULT_POLICIES, model)
    with_native = {"native": build_policies(["native"], model)["native"], **defaults}
    sweep = build_policies(SWEEP if not args.no_sweep else (), model)
    progress = not args.json
    D = len(streams)

    say(f"\n[1/{n}] quality: {args.sequences} held-out sequences of {args.seq_len} tokens ({args.sequences // D} from each "
        f"of {D} domains), each position's 16 tokens routed as one decode batch; same-domain batches: "
        f"{1 + len(defaults) + len(sweep)} routings, mixed batches: {1 + len(defaults)}")
    config = EvalConfig(batch_sizes=(BATCH,), seq_len=args.seq_len, num_sequences=args.sequences, resamples=2000)
    try:
        evaluations = {"same-domain": evaluate(model, streams, {**defaults, **sweep}, config, progress=progress,
                                               batching="same-domain"),
                       "mixed": evaluate(model, streams, defaults, config, progress=progress, batching="mixed")}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    say(f"[2/{n}] greedy generation: {BATCH} prompts of 32 tokens (the domains in turn), {args.generate} new tokens, "
        "against native")
    seqs, labels = domain_sequences(streams, 32, BATCH * D)
    prompts = seqs[batch_order(labels, BATCH, "mixed")[:BATCH]]
    generation = generation_check(model, prompts, defaults, max_new_tokens=args.generate)

    say(f"[3/{n}] U against batch size: every policy replayed on the model's routing trace of mixed batches")
    trace = bench.reference_trace(max(REPLAY_BATCHES), args.replay_steps, model,
                                  trace_sequences(streams, max(REPLAY_BATCHES), args.replay_steps, "mixed")[0])
    u_by_batch = {}
    for label, policy in with_native.items():
        u_by_batch[label] = {}
        for B in REPLAY_BATCHES:
            per_layer = trace.rebatch(B).replay(policy)
            u_by_batch[label][B] = sum(u.double().mean().item() for u in per_layer.values()) / len(per_layer)

    shape = get_shape(args.shape)
    say(f"[4/{n}] MoE-layer latency: {shape.name} layer shape (H={shape.hidden}, I={shape.intermediate}, "
        f"E={shape.num_experts}, K={shape.top_k}) on CPU, routings from the reference model's router logits")
    ratios, bench_json, kernel, steps_timed = {}, {}, "", {}
    for batching in BATCHINGS:
        parts = trace_sequences(streams, BATCH, 64, batching)  # steps spread over 64 positions
        per = math.ceil(args.bench_steps / len(parts))
        routings = {name: [] for name in with_native}
        for seq in parts:
            for name, rs in bench.routings_from_trace(bench.reference_trace(BATCH, 64, model, seq), with_native,
                                                      BATCH, per, shape=shape).items():
                routings[name] += rs
        result = bench.bench_policies(shape, routings, "cpu", repeats=args.repeats, warmup=2, progress=progress)
        measured = result.to_dict()
        kernel, steps_timed[batching] = result.kernel, len(routings["native"])
        bench_json[batching] = {
            "command": "", "shape": {**measured["shape"], "bytes_per_expert": shape.bytes_per_expert(torch.float32)},
            "routing": f"the reference model's native router logits on held-out text, {batching} decode batches of "
                       f"{BATCH}, {len(routings['native'])} (position, layer) steps",
            "bandwidth": measured["bandwidth"], "results": {str(BATCH): measured}}
        ratios[batching] = report.latency_ratios(bench_json[batching])[BATCH]

    command = "moe-reroute " + " ".join(shlex.quote(a) for a in args.argv)
    for b in bench_json.values():
        b["command"] = command
    engine = None
    if args.engine:
        from ..measure import serve_bench
        from ..reference import path as reference_path

        say(f"[5/{n}] vLLM end to end: the reference model at batch {BATCH}, native and each policy, {ENGINE_REPEATS} "
            f"interleaved repeats, each run in a fresh engine")
        cfg = serve_bench.Config(model=str(reference_path()), policies=list(DEFAULT_POLICIES), batch_sizes=[BATCH],
                                 output_len=ENGINE_OUTPUT_LEN, repeats=ENGINE_REPEATS)
        try:
            engine = serve_bench.run(cfg, Path(args.out) / "engine", command, say=say)
        except serve_bench.BenchError as e:
            raise SystemExit(f"error: --engine: {e}") from None
    out = report.write(Path(args.out), evaluations["same-domain"], command, bench=bench_json["same-domain"],
                       generation=generation, batch=BATCH, u_by_batch=u_by_batch, serve=engine)
    gen = {g["policy"]: g for g in generation}
    rows = [dict(r, latency_ratio=ratios[b].get(r["policy"], float("nan")))
            for b in BATCHINGS for r in evaluations[b]["rows"] if r["policy"] in ("native", *defaults)]
    elapsed = time.time() - t0
    if args.json:
        print(json.dumps({"rows": rows, "latency_ratio": ratios, "generation": generation, "report": str(out),
                          "engine": engine["rows"] if engine else None,
                          "seconds": round(elapsed, 1)}))
        return 0
    print(f"\nBatch {BATCH}, reference model, CPU float32; latency: {shape.name} MoE layer, {kernel} kernel, median of "
          f"{args.repeats} interleaved repeats x {steps_timed['same-domain']} (same-domain) / "
          f"{steps_timed['mixed']} (mixed) steps; greedy generation: {BATCH} prompts of the domains in turn\n")
    print("| batches | policy | U / layer | experts / token | Δ CE [95% CI] | significant loss | greedy tokens changed | "
          "MoE latency / native |")
    print("| --- | --- | ---: | ---: | --- | --- | ---: | ---: |")
    for r in rows:
        lo, hi = r["delta_ce_ci"]
        g = gen.get(r["policy"])
        # the generation check's prompts mix the domains: shown on the mixed rows
        changed = "—" if r["batching"] != "mixed" else f"{g['differing_tokens']}/{g['generated_tokens']}" if g else "0"
        print(f"| {r['batching']} | {r['policy']} | {r['mean_unique']:.1f} | {r['experts_per_token']:.2f} | "
              f"{r['delta_ce']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {'yes' if r['significant_loss'] else 'no'} | {changed} | "
              f"{r['latency_ratio']:.2f} |")
    if engine:
        from ..measure import serve_bench

        print(f"\nvLLM {engine['conditions']['vllm']} end to end on {engine['conditions']['device']}, "
              f"{engine['conditions']['dtype']}, batch {BATCH}, {ENGINE_OUTPUT_LEN} output tokens:\n")
        print(serve_bench.table(engine))
    print(f"\nUniform routing would activate {report.uniform_expectation(128, 8, BATCH):.1f} experts per layer at batch 16.")
    print(f"Report with plots (same-domain batches): {out} ({elapsed:.0f} s)")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="the main job: every policy on the shipped reference model at batch 16, with a report")
    p.add_argument("--out", default="moe-reroute-report", help="report folder (default ./moe-reroute-report)")
    p.add_argument("--sequences", type=int, default=112, help="held-out sequences for the quality check, split "
                   "equally among the 7 domains; same-domain batches of 16 need 16 per domain (default 112)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--generate", type=int, default=24, help="greedy tokens in the generation check (default 24)")
    p.add_argument("--no-sweep", action="store_true", help="only the default of each policy, no parameter sweep")
    p.add_argument("--replay-steps", type=int, default=32, help="trace positions for U against batch size (default 32)")
    p.add_argument("--shape", default="qwen3-30b-a3b", help="MoE layer shape for the latency check (default qwen3-30b-a3b)")
    p.add_argument("--bench-steps", type=int, default=16, help="decode steps (trace position x layer) timed (default 16)")
    p.add_argument("--repeats", type=int, default=8, help="interleaved latency repeats (default 8)")
    p.add_argument("--engine", action="store_true", help="also time vLLM end to end on the reference model at batch "
                   "16 (`serve-bench`; needs vLLM: pip install 'moe-reroute[vllm]'; about 4 more minutes on 2 cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object, no tables or progress")
    p.set_defaults(run=_demo)
