"""`moe-reroute demo`: the main job on the shipped reference model, CPU, a few minutes.

Native routing and a default of each policy at decode batch 16: distinct experts per layer (U), held-out
cross-entropy against native with a paired 95% CI, greedy generation against native, and the MoE-layer
latency ratio measured at Qwen3-30B-A3B's layer shape with the routings these policies make on the
reference model's router logits (same 128-expert top-8 geometry). Then a report with plots: each policy
family swept over its parameter, and U against batch size replayed on the model's routing trace.
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


def _demo(args) -> int:
    import torch

    from ..measure import bench, report
    from ..measure.shapes import get_shape
    from ..measure.evaluate import EvalConfig, evaluate, generation_check, make_sequences
    from ..reference import load
    from ..reference.card import heldout_ids
    from .inputs import check_out_dir
    from .measure import build_policies

    check_out_dir(args.out)  # bad --out or --shape fail now, not after the run
    get_shape(args.shape)
    t0 = time.time()
    torch.manual_seed(0)
    say = (lambda *a: None) if args.json else print
    say("moe-reroute demo: the shipped reference model (Qwen3-MoE, 128 experts, top-8), CPU, float32, batch 16")
    model, tokenizer, heldout = load()
    ids = heldout_ids(tokenizer, heldout)
    defaults = build_policies(DEFAULT_POLICIES, model)
    with_native = {"native": build_policies(["native"], model)["native"], **defaults}
    sweep = build_policies(SWEEP if not args.no_sweep else (), model)
    progress = not args.json

    say(f"\n[1/4] quality: {args.sequences} held-out sequences of {args.seq_len} tokens, {1 + len(defaults) + len(sweep)} "
        "routings, each position's 16 tokens routed as one decode batch")
    config = EvalConfig(batch_sizes=(BATCH,), seq_len=args.seq_len, num_sequences=args.sequences, resamples=2000)
    evaluation = evaluate(model, ids, {**defaults, **sweep}, config, progress=progress)

    say(f"[2/4] greedy generation: {BATCH} prompts of 32 tokens, {args.generate} new tokens, against native")
    prompts = make_sequences(ids, 32, BATCH)
    generation = generation_check(model, prompts, defaults, max_new_tokens=args.generate)

    say("[3/4] U against batch size: every policy replayed on the model's routing trace")
    trace = bench.reference_trace(max(REPLAY_BATCHES), args.replay_steps, model, ids)
    u_by_batch = {}
    for label, policy in with_native.items():
        u_by_batch[label] = {}
        for B in REPLAY_BATCHES:
            per_layer = trace.rebatch(B).replay(policy)
            u_by_batch[label][B] = sum(u.double().mean().item() for u in per_layer.values()) / len(per_layer)

    shape = get_shape(args.shape)
    say(f"[4/4] MoE-layer latency: {shape.name} layer shape (H={shape.hidden}, I={shape.intermediate}, "
        f"E={shape.num_experts}, K={shape.top_k}) on CPU, routings from the reference model's router logits")
    routings = bench.routings_from_trace(bench.reference_trace(BATCH, 64, model, ids),  # steps spread over 64
                                         with_native, BATCH, args.bench_steps, shape=shape)
    result = bench.bench_policies(shape, routings, "cpu", repeats=args.repeats, warmup=2, progress=progress)
    measured = result.to_dict()
    bench_json = {"command": "", "shape": {**measured["shape"], "bytes_per_expert": shape.bytes_per_expert(torch.float32)},
                  "routing": f"the reference model's native router logits on held-out text, decode batch {BATCH}, "
                             f"{len(routings['native'])} (position, layer) steps",
                  "bandwidth": measured["bandwidth"], "results": {str(BATCH): measured}}

    command = "moe-reroute " + " ".join(shlex.quote(a) for a in args.argv)
    bench_json["command"] = command
    out = report.write(Path(args.out), evaluation, command, bench=bench_json, generation=generation, batch=BATCH,
                       u_by_batch=u_by_batch)
    rows = [r for r in evaluation["rows"] if r["policy"] in ("native", *defaults)]
    ratios = report.latency_ratios(bench_json)[BATCH]
    gen = {g["policy"]: g for g in generation}
    elapsed = time.time() - t0
    if args.json:
        print(json.dumps({"rows": rows, "latency_ratio": ratios, "generation": generation, "report": str(out),
                          "seconds": round(elapsed, 1)}))
        return 0
    print(f"\nBatch {BATCH}, reference model, CPU float32; latency: {shape.name} MoE layer, "
          f"{result.kernel} kernel, median of {args.repeats} interleaved repeats x {len(routings['native'])} steps\n")
    print("| policy | U / layer | experts / token | Δ CE [95% CI] | significant loss | greedy tokens changed | MoE latency / native |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: |")
    for r in rows:
        lo, hi = r["delta_ce_ci"]
        g = gen.get(r["policy"])
        changed = f"{g['differing_tokens']}/{g['generated_tokens']}" if g else "0"
        print(f"| {r['policy']} | {r['mean_unique']:.1f} | {r['experts_per_token']:.2f} | {r['delta_ce']:+.4f} "
              f"[{lo:+.4f}, {hi:+.4f}] | {'yes' if r['significant_loss'] else 'no'} | {changed} | "
              f"{ratios.get(r['policy'], float('nan')):.2f} |")
    print(f"\nUniform routing would activate {report.uniform_expectation(128, 8, BATCH):.1f} experts per layer at batch 16.")
    print(f"Report with plots: {out} ({elapsed:.0f} s)")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="the main job: every policy on the shipped reference model at batch 16, with a report")
    p.add_argument("--out", default="moe-reroute-report", help="report folder (default ./moe-reroute-report)")
    p.add_argument("--sequences", type=int, default=64, help="held-out sequences for the quality check (default 64)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--generate", type=int, default=24, help="greedy tokens in the generation check (default 24)")
    p.add_argument("--no-sweep", action="store_true", help="only the default of each policy, no parameter sweep")
    p.add_argument("--replay-steps", type=int, default=32, help="trace positions for U against batch size (default 32)")
    p.add_argument("--shape", default="qwen3-30b-a3b", help="MoE layer shape for the latency check (default qwen3-30b-a3b)")
    p.add_argument("--bench-steps", type=int, default=16, help="decode steps (trace position x layer) timed (default 16)")
    p.add_argument("--repeats", type=int, default=8, help="interleaved latency repeats (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object, no tables or progress")
    p.set_defaults(run=_demo)
