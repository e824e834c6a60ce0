"""`moe-reroute ep-replay`: each policy under expert parallelism over D ranks, replayed on a routing trace.

A step's MoE layer waits for its slowest rank, which reads its distinct experts: the command reports, per
batch size, D and policy, the mean over steps and MoE layers of max-rank U and mean-rank U (distinct
experts on the busiest rank, and on average), and a bandwidth-bound MoE-layer time (slowest rank's expert
bytes / HBM bandwidth + the all-to-all of the tokens' hidden states / interconnect bandwidth) at a real
model's layer shape. Prints tables; --out writes ep.json, ep.png and the placements used.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from .bench import UsageError, _batch_sizes, policy_specs

DEFAULT_POLICIES = ("native", "cap:k=4", "oea:k0=3", "sere", "budget:budget=32", "xshare:budget=32",
                    "lynx:alpha=3,beta=2")
DEFAULT_POSITIONS = 32
DEFAULT_SHAPE = "qwen3-30b-a3b"


def _policies(specs: list[str] | None, trace, reference: bool) -> tuple[dict, list[str]]:
    """{label: Policy}, native first, each checked on one step of every layer; and notes."""
    from ..policies.spec import parse_policy_spec, policy_from_spec

    specs, explicit, notes = policy_specs(specs, DEFAULT_POLICIES)
    E = trace.specs[trace.layers[0]].num_experts
    out = {}
    for text in specs:
        name, params = parse_policy_spec(text) if text else ("", {})
        if name == "sere" and "similarity" not in params:
            if not reference:
                if explicit:
                    raise UsageError(f"policy {text!r}: sere needs similarity=FILE for a trace of another model "
                                     "(`moe-reroute calibrate` writes one)")
                notes.append("sere left out: give --policy sere:similarity=FILE for this trace's model")
                continue
            from ..measure.evaluate import SIMILARITY_FILE
            from ..reference import path as reference_path

            text_eff = f"{text}{',' if ':' in text else ':'}similarity={reference_path() / SIMILARITY_FILE}"
        else:
            text_eff = text
        try:
            policy = policy_from_spec(text_eff, num_experts=E)
            for layer in trace.layers:
                policy(trace.logits[layer][0].float(), trace.specs[layer], trace.valid[0], layer=trace.moe_layer(layer))
        except (TypeError, ValueError, OSError) as e:
            if explicit:
                raise UsageError(f"policy {text!r}: {e}") from None
            notes.append(f"default policy {text} skipped: {e}")
            continue
        out[text] = policy
    return out, notes


def _model_shape(folder: str | None) -> str | None:
    """The real model a `synth-model` checkpoint stands for (its marker's shape name), or None."""
    if not folder:
        return None
    from ..measure.shapes import SHAPES
    from ..measure.synth import read_marker

    marker = read_marker(Path(folder)) or {}
    name = str(marker.get("shape", "")).split(" ")[0]
    return name if name in SHAPES else None


def _lcm(values) -> int:
    import math

    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def _run(args) -> int:
    try:
        return _ep_replay(args)
    except UsageError as e:
        raise SystemExit(f"moe-reroute ep-replay: error: {e}") from None


def _ep_replay(args) -> int:
    import torch

    from ..measure.costmodel import EPStepModel
    from ..measure.shapes import get_shape
    from .inputs import at_least, check_out_dir

    batch_sizes = _batch_sizes(args.batch_sizes, example="16,32,64,128,256")
    ranks = _batch_sizes(args.ep, "--ep", "8,16,32,64")
    at_least(args.positions, 1, "--positions")
    at_least(args.threads, 1, "--threads")
    at_least(args.dp, 1, "--dp")
    uneven = [B for B in batch_sizes if B % args.dp]
    if uneven:
        raise UsageError(f"--dp {args.dp}: batch sizes {uneven} do not split into {args.dp} data-parallel ranks of "
                         "equal size; give multiples of it")
    if args.out:
        check_out_dir(args.out)
    try:
        shape = get_shape(args.shape or _model_shape(args.model) or DEFAULT_SHAPE)
        step_model = EPStepModel(shape.bytes_per_expert(torch.bfloat16), shape.hidden, args.act_bytes,
                                 args.hbm_gbps, args.link_gbps)
    except ValueError as e:
        raise UsageError(str(e)) from None
    at_least(args.redundant, 0, "--redundant")
    if args.redundant and args.placement != "eplb":
        raise UsageError("--redundant adds EPLB's redundant experts, placed by its rearrangement: give --placement eplb "
                         "(a placement file lists its own slots)")
    if args.trace and args.model:
        raise UsageError("--trace and --model both give the routing to replay; give one")
    if args.text and not args.model:
        raise UsageError("--text is the text --model's trace is recorded on; give --model DIR too")
    if args.calibration_trace and args.placement != "eplb":
        raise UsageError("--calibration-trace gives the expert loads of --placement eplb; it does not apply to "
                         f"--placement {args.placement}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _replay(args, batch_sizes, ranks, shape, step_model)
    finally:
        torch.set_num_threads(threads)


def _replay(args, batch_sizes, ranks, shape, step_model) -> int:
    """The run proper, on checked options: the trace, the placements, the policies, the replay, the outputs."""
    from ..measure import parallel
    from ..placement import check_ranks, save_placement
    from ..progress import progress as progress_bar
    from ..replicas import Replicas
    from ..traces import load

    say = (lambda *a, **k: None) if args.json else print

    if args.trace:
        trace = load(args.trace)
        where = (f"trace {args.trace} (model {trace.meta.get('model', '?')}, {trace.batch_size} sequences x "
                 f"{trace.steps} steps)")
    elif args.model:
        trace, where = _model_trace(args.model, args.text, max(batch_sizes), args.positions)
    else:
        from ..measure import bench

        try:
            trace = bench.reference_trace(max(batch_sizes), args.positions)
        except (FileNotFoundError, ImportError, OSError) as e:
            raise UsageError(f"recording the shipped reference model's trace failed ({str(e).splitlines()[0]}); "
                             "give --trace PATH") from None
        where = (f"trace of the shipped reference model on the validation part of its held-out text ({max(batch_sizes)} "
                 f"sequences, the held-out "
                 f"domains in turn, x {args.positions} positions, teacher-forced, float32)")
    E = trace.specs[trace.layers[0]].num_experts
    if max(batch_sizes) > trace.batch_size:
        raise UsageError(f"--batch-sizes up to {max(batch_sizes)} need a trace of at least that many sequences; "
                         f"{where} has {trace.batch_size}")
    for D in ranks:
        try:
            check_ranks(E, D)
        except ValueError as e:
            raise UsageError(f"--ep {D}: {e}") from None
    uneven = [D for D in ranks if (E + args.redundant) % D]
    if args.redundant and uneven:
        raise UsageError(f"--redundant {args.redundant}: E + redundant = {E + args.redundant} slots do not split evenly "
                         f"over {uneven} ranks (each rank holds (E + redundant) / D); choose a redundant count that "
                         f"makes E + redundant a multiple of every --ep (e.g. {_lcm(ranks) - E % _lcm(ranks)})")
    if E != shape.num_experts:
        say(f"note: the trace's layers have E={E} experts, the --shape {shape.name} {shape.num_experts}: its expert "
            "bytes and hidden size are used for the predicted time only")
    load_note = ""
    loads = None
    if args.placement == "eplb":
        if args.calibration_trace:
            cal = load(args.calibration_trace)
            trace.check_compatible(cal.specs, what=f"--calibration-trace {args.calibration_trace}")
            loads = parallel.native_load(cal)
            load_note = f" (expert loads: native routing of {args.calibration_trace})"
        else:
            loads = parallel.native_load(trace)
            load_note = (" (expert loads: native routing of this same trace, so the placement has seen the steps it "
                         "is scored on)")
    try:
        by_ranks = parallel.placements(args.placement, trace, ranks, loads, args.redundant)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--placement {args.placement}: {e}") from None
    policies, notes = _policies(args.policy, trace, reference=not (args.trace or args.model))
    replicated = any(isinstance(p, Replicas) for p in by_ranks.values())
    slots_note = ""
    if replicated:
        P = next(iter(by_ranks.values())).num_physical
        slots_note = (f", {P} physical slots ({P - E} redundant experts; U per rank counts the slots each rank "
                      "reads, each token sent to a replica by vLLM's hash of its row)")
    say(f"moe-reroute ep-replay: {where}; E={E}, K={trace.specs[trace.layers[0]].top_k}, {len(trace.layers)} MoE "
        f"layers; placement {args.placement}{load_note}{slots_note}"
        + (f"; each batch from {args.dp} data-parallel ranks, each rank's tokens routed alone" if args.dp > 1 else ""))
    say(f"cost model ({shape.name} layer shape, bfloat16 weights): {step_model.describe()}")
    for note in notes:
        say(f"note: {note}")
    bar = progress_bar(len(batch_sizes) * len(policies), not (args.json or args.no_progress), "ep-replay",
                       unit="replays")
    rows = parallel.ep_replay(trace, policies, batch_sizes, by_ranks, step_model, tick=lambda: bar.update(1),
                              dp=args.dp)
    bar.close()
    label = args.placement if args.placement in ("contiguous", "eplb") else f"file {args.placement}"
    if args.redundant:
        label += f" (+{args.redundant} redundant)"
    say("")
    say(parallel.table(rows, label))
    command = "moe-reroute " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []))
    result = {"command": command, "trace": where, "placement": args.placement + load_note + slots_note,
              "conditions": {"batch_sizes": batch_sizes, "ranks": ranks, "dp": args.dp, "num_experts": E,
                             "redundant": args.redundant,
                             "layers": len(trace.layers), "steps": trace.steps, "sequences": trace.batch_size,
                             "shape": shape.name, "cost_model": step_model.describe()},
              "notes": notes, "rows": rows}
    if args.out:
        from ..files import write_text_atomic

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        written = [write_text_atomic(out / "ep.json", json.dumps(result, indent=1) + "\n")]
        if args.placement == "eplb":
            written += [write_text_atomic(out / f"placement-eplb-D{D}.json", json.dumps(p.to_json()) + "\n")
                        if isinstance(p, Replicas) else save_placement(p, out / f"placement-eplb-D{D}.json")
                        for D, p in by_ranks.items()]
        try:
            written.append(parallel.plot(rows, out / "ep.png", label))
        except ImportError as e:
            print(f"note: no plot: {e}", file=sys.stderr)
        say("written: " + ", ".join(str(p) for p in written))
    if args.json:
        print(json.dumps(result))
    return 0


def _model_trace(folder: str, text: str | None, rows: int, steps: int):
    """(trace, description): a local checkpoint's routing on `rows` sequences of `steps` tokens, recorded
    teacher-forced in one forward (float32), from --text or else the reference model's validation text
    (its documents' domains in turn), tokenised with the checkpoint's own tokenizer."""
    import torch

    from ..measure import bench
    from ..reference.card import domain_streams, trace_sequences
    from .measure import load_model

    model, tokenizer, given = load_model(folder, text, need_text=False)
    if text is not None:
        from ..reference.train import document_ids

        ids = torch.tensor(document_ids(tokenizer, given), dtype=torch.long)
        source = f"--text {text}"
        if len(ids) < rows * steps:
            raise UsageError(f"--text {text} holds {len(ids)} tokens, fewer than the {rows} x {steps} the trace needs; "
                             "give more text, or fewer --positions or smaller --batch-sizes")
        seqs = ids[: rows * steps].view(rows, steps)
    else:
        from ..reference import heldout_documents

        streams = domain_streams(tokenizer, heldout_documents())
        short = [d for d, s in streams.items() if len(s) < (rows // len(streams) + 1) * steps]
        if short:
            raise UsageError(f"the reference validation text is too short for {rows} sequences x {steps} positions in "
                             f"domain(s) {', '.join(short)}; give fewer --positions or --text FILE")
        seqs = trace_sequences(streams, rows, steps, "mixed")[0]
        source = "the reference model's validation text (its domains in turn)"
    vocab = int(model.config.vocab_size)
    if int(seqs.max()) >= vocab:
        raise UsageError(f"--model {folder}: its tokenizer gives ids up to {int(seqs.max())}, beyond the model's "
                         f"vocabulary of {vocab}; give a checkpoint whose tokenizer matches it")
    with torch.no_grad():
        trace = bench.reference_trace(rows, steps, model=model, ids=seqs)
    trace.meta["model"] = str(folder)
    return trace, (f"trace of {folder} on {source} ({rows} sequences x {steps} positions, teacher-forced, "
                   "float32)")


def add_parsers(sub) -> None:
    p = sub.add_parser("ep-replay", help="max-rank distinct experts per policy under expert parallelism, from a trace",
                       description=__doc__)
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="routing trace (default: recorded from the shipped reference model on held-out text)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="record the trace from this local transformers MoE checkpoint (e.g. a `synth-model` folder) "
                        "instead of the shipped reference model")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="with --model: the text to record on (default: the reference model's validation text)")
    p.add_argument("--positions", type=int, default=DEFAULT_POSITIONS,
                   help=f"without --trace: positions per sequence of the recorded trace (default {DEFAULT_POSITIONS})")
    p.add_argument("--batch-sizes", default="16,32,64,128,256", help="decode batch sizes (default 16,32,64,128,256)")
    p.add_argument("--ep", default="8,16,32,64", metavar="D,D", help="expert-parallel ranks (default 8,16,32,64)")
    p.add_argument("--placement", default="contiguous", metavar="contiguous|eplb|FILE",
                   help="experts on ranks: contiguous blocks (default), eplb (balanced by each expert's native load, "
                        "from this trace or --calibration-trace; with --redundant, replicas too), or a JSON file of one "
                        "rank per expert (or one such list per MoE layer), or of redundant experts "
                        "{\"ranks\": D, \"physical_to_logical\": [...]}")
    p.add_argument("--redundant", type=int, default=0, metavar="N",
                   help="with --placement eplb: N redundant experts (vLLM's num_redundant_experts): E + N physical "
                        "slots, the hottest experts replicated and the slots packed onto the ranks as vLLM's default "
                        "EPLB does; U per rank then counts slots (default 0)")
    p.add_argument("--calibration-trace", default=None, metavar="PATH",
                   help="with --placement eplb: take the expert loads from this trace's native routing")
    p.add_argument("--policy", action="append", default=None, metavar="SPEC",
                   help=f"policy spec, repeatable (default: {' '.join(DEFAULT_POLICIES)}; sere only on the reference "
                        "model's trace or with similarity=FILE)")
    p.add_argument("--shape", default=None, help="MoE layer shape for the predicted time (default: the shape a "
                   f"--model made by synth-model stands for, else {DEFAULT_SHAPE}; bfloat16 weights)")
    p.add_argument("--hbm-gbps", type=float, default=3350.0,
                   help="HBM bandwidth per rank, GB/s (default 3350: H100 SXM)")
    p.add_argument("--link-gbps", type=float, default=450.0,
                   help="all-to-all bandwidth per rank, GB/s one way (default 450: H100 NVLink 4)")
    p.add_argument("--act-bytes", type=int, default=2, help="bytes per activation value sent (default 2: bfloat16)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel ranks the batch comes from: each rank's B/DP "
                   "tokens routed alone, the experts of all ranks served (default 1: the whole batch in one view)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=None, help="folder for ep.json, ep.png (and the eplb placements)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object, no tables")
    p.set_defaults(run=_run, needs=("hf",))
