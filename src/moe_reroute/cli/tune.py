"""`moe-reroute tune`: the cheapest per-layer, per-batch-size policy within a quality budget, as a policy
file (`MOE_REROUTE_POLICY_FILE`, `moe_reroute.load_policy`), validated on held-out text."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

from ..files import write_text_atomic
from .inputs import InputError, at_least, check_out_file, in_range, read_json_file
from .measure import command_line, int_list, load_model, read_text


def policy_json(obj: dict) -> str:
    """The policy file's text: indented, each list of numbers on one line."""
    text = json.dumps(obj, indent=1)
    numbers = re.compile(r"\[([-0-9.eE+,\s]*)\]")
    return numbers.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def _cost(args) -> tuple[str, float, float, str]:
    """(objective, b, a, where the coefficients came from)."""
    if args.cost and args.bench:
        raise InputError("--cost and --bench are exclusive: give the coefficients or the bench results they are fitted in")
    if args.objective == "experts":
        if args.cost or args.bench:
            raise InputError("--objective experts minimises U alone; drop --cost/--bench, or use --objective time")
        return "experts", 1.0, 0.0, "U alone"
    if args.cost:
        try:
            b, a = (float(x) for x in args.cost.split(","))
        except ValueError:
            raise InputError(f"--cost takes B,A (latency = B*U + A*T*K, e.g. 0.07,0.0004), got {args.cost!r}") from None
        return "time", b, a, f"--cost {args.cost}"
    if args.bench:
        bench = read_json_file(args.bench, "--bench", "the JSON of `moe-reroute bench --json`")
        model = bench.get("cost_model")
        if not isinstance(model, dict) or not all(isinstance(model.get(k), (int, float)) for k in ("b", "a")):
            raise InputError(f"--bench {args.bench}: no fitted cost model in it (run `moe-reroute bench` over several "
                             "batch sizes, e.g. --batch-sizes 1,4,16,64, so that one can be fitted), or give --cost B,A")
        return "time", float(model["b"]), float(model["a"]), f"the cost model of {args.bench}"
    return "time", 1.0, 0.0, "no cost model given: b=1, a=0 (U alone); give --bench or --cost for T*K's share"


def _sequences(tokenizer, text: str | None, seq_len: int, num: int, batching: str = "mixed", group: int = 1):
    """[N, L] calibration sequences in batch order: the tuning part of the reference model's held-out split
    by domain when `text` is None (mixed: the domains in turn; same-domain: groups of `group` sequences of
    one domain), else the text cut into consecutive sequences."""
    from ..measure.evaluate import batch_order, domain_sequences, make_sequences
    from ..reference.card import domain_streams, heldout_ids

    if text is None:
        from .. import reference

        docs = reference.heldout_documents(part="tuning")
        seqs, labels = domain_sequences(domain_streams(tokenizer, docs), seq_len, num)
        return seqs[batch_order(labels, group if batching == "same-domain" else 1, batching)]
    return make_sequences(heldout_ids(tokenizer, text), seq_len, num)


def _policy_params(name: str, params: dict, model) -> dict:
    """The fixed parameters as the policy file holds them: SERE's similarity as an absolute path."""
    params = dict(params)
    if name == "sere" and isinstance(params.get("similarity"), str):
        params["similarity"] = str(Path(params["similarity"]).resolve())  # the policy file is read elsewhere
    if name == "sere" and "similarity" not in params:
        from ..measure.evaluate import model_similarity_file

        params["similarity"] = str(model_similarity_file(model).resolve())
    return params


SEARCH_ARGS = ("model", "policy", "budget", "agreement", "batch_sizes", "text", "objective", "cost", "bench",
               "seq_len", "sequences", "rounds", "refine", "confidence", "batching")
OVERLAP_REFUSED = 0.5  # share of the calibration text's lines found in the validation text: refused from here
OVERLAP_WARNED = 0.01  # and said from here
MIN_LINE = 32  # characters: shorter lines (blank, headings, code braces) recur in unrelated text


def text_lines(text: str) -> set[str]:
    return {ln.strip() for ln in text.splitlines() if len(ln.strip()) >= MIN_LINE}


def overlap(calibration: str, validation: str) -> float:
    """The share of the calibration text's distinct lines (of MIN_LINE characters or more) that the
    validation text holds too: 0 for disjoint texts, 1 for the same text."""
    mine = text_lines(calibration)
    return len(mine & text_lines(validation)) / len(mine) if mine else 0.0


def default_state(args, out: Path) -> Path:
    """OUT.<digest of the search's arguments>.state: one state per search, so that a run with other
    arguments (another --budget, say) into the same --out starts its own search instead of being refused,
    and an interrupted run resumes when given the same arguments again."""
    import hashlib

    key = {k: getattr(args, k, None) for k in SEARCH_ARGS}
    for k in ("model", "text", "bench"):  # the same file however it is spelled
        if key[k] is not None:
            key[k] = str(Path(key[k]).absolute())
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return out.with_name(f"{out.name}.{digest}.state")


def _tune(args) -> int:
    from ..measure.tune import TuneConfig, tune

    batch_sizes = int_list(args.batch_sizes)
    for option, value, low in (("--seq-len", args.seq_len, 2), ("--sequences", args.sequences, 2),
                               ("--rounds", args.rounds, 1), ("--refine", args.refine, 0),
                               ("--resamples", args.resamples, 1)):
        at_least(value, low, option)
    from .measure import MAX_RESAMPLES

    in_range(args.resamples, 1, MAX_RESAMPLES, "--resamples")
    if args.budget is not None and args.agreement is not None:
        raise InputError("--budget and --agreement are exclusive: a cross-entropy budget or an agreement floor")
    budget = args.budget if args.agreement is None else None
    if budget is None and args.agreement is None:
        budget = 0.01
    if args.batching is not None and (args.model is not None or args.text is not None or args.heldout is not None):
        raise InputError("--batching orders the reference model's text by domain (tuning.jsonl and validation.jsonl); "
                         "drop it with --model, --text or --heldout, whose plain text is cut into consecutive sequences")
    if args.batching == "same-domain" and any(max(batch_sizes) % B for B in batch_sizes):
        raise InputError(f"--batching same-domain groups sequences by the largest batch size ({max(batch_sizes)}); "
                         "every batch size must divide it (e.g. 1,4,16,64)")
    out = check_out_file(args.out, example="tuned.json")
    state = Path(args.state) if args.state else default_state(args, out)
    check_out_file(state, "--state", example="tuned.json.state")
    for side in (out.with_name(out.stem + ".tune.json"), out.with_name(out.stem + ".validation.json")):
        check_out_file(side, f"--out {out}: its companion file")  # written beside it, checked now
    if args.model is not None and args.text is None:
        raise InputError("--text CALIB is needed with --model: calibration text the model was not trained on, "
                         "never the text you evaluate on")
    if args.no_validate and args.heldout is not None:
        raise InputError("--heldout is the text the tuned policy is validated on, and --no-validate skips that: "
                         "drop one of them")
    if args.model is not None and args.heldout is None and not args.no_validate:
        raise InputError("--heldout FILE is needed with --model to validate the tuned policy on text the search "
                         "never saw; or pass --no-validate")
    objective, b, a, cost_note = _cost(args)
    from ..policies.spec import parse_policy_spec

    family, fixed = parse_policy_spec(args.policy)
    config = TuneConfig(family=family, budget=budget, agreement=args.agreement, batch_sizes=batch_sizes,
                        objective=objective, cost_b=b, cost_a=a, params=fixed, rounds=args.rounds,
                        refine=args.refine, confidence=args.confidence)  # checked before the model loads
    calib = read_text(args.text) if args.text else None
    heldout = read_text(args.heldout, "--heldout") if args.heldout else None
    if calib is not None and not args.no_validate:
        if heldout is not None:
            validation, where = heldout, f"--heldout {args.heldout}"
        else:
            from ..reference import heldout_documents

            validation = "\n\n".join(d.text for d in heldout_documents())
            where = "the reference model's validation part (validation.jsonl)"
        shared = overlap(calib, validation)
        if shared >= OVERLAP_REFUSED:
            raise InputError(f"--text {args.text}: {shared:.0%} of its lines are in the text tune validates on "
                             f"({where}): a budget met on it says nothing about unseen text. Give calibration text "
                             "disjoint from it (with the reference model: leave --text out, or its tuning.jsonl)")
        if shared >= OVERLAP_WARNED:
            print(f"warning: --text {args.text}: {shared:.0%} of its lines are also in the text tune validates on "
                  f"({where}); the held-out check is then partly on calibration text", file=sys.stderr, flush=True)
    model, tokenizer, _ = load_model(args.model, None, need_text=False)
    config = dataclasses.replace(config, params=_policy_params(family, fixed, model))

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)
    say(f"cost: {cost_note}")
    sequences = _sequences(tokenizer, calib, args.seq_len, args.sequences, args.batching or "mixed", max(batch_sizes))
    if sequences.shape[0] < max(batch_sizes):
        raise InputError(f"the calibration text gives {sequences.shape[0]} sequences of {args.seq_len} tokens, fewer "
                         f"than batch size {max(batch_sizes)}; give more text, more --sequences or a smaller --seq-len")
    from ..measure.tune import check_bound

    try:
        check_bound(config, int(sequences.shape[0]))  # before any forward runs
    except ValueError as e:
        raise InputError(str(e)) from None
    result = tune(model, sequences, config, state_path=state, progress=not args.json, log=say)
    if args.model is None:  # the shipped model: named as such, not by this install's path
        result["policy"]["about"]["model"] = result["conditions"]["model"] = "moe-reroute reference model"
    result["command"] = command_line(args)
    result["conditions"]["calibration"] = args.text or ("the reference model's tuning.jsonl (the tuning part of its "
                                                        "held-out split)")
    result["conditions"]["cost_source"] = cost_note
    if calib is None:
        result["conditions"]["batching"] = args.batching or "mixed"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, policy_json(result["policy"]), "--out")
    say(f"policy written to {out}: serve it with MOE_REROUTE_POLICY_FILE={out}, or moe_reroute.load_policy({str(out)!r})")
    if not args.no_validate:
        result["validation"] = _validate(args, model, tokenizer, heldout, out, result, say)
    summary = out.with_name(out.stem + ".tune.json")
    write_text_atomic(summary, json.dumps(result, indent=1) + "\n")
    say(f"search and validation written to {summary}")
    if args.json:
        print(json.dumps(result))
    return 0


def _validate(args, model, tokenizer, heldout, policy_file: Path, result: dict, say) -> dict:
    """The tuned policy (read back from its file), the best uniform settings and native on held-out text."""
    from ..measure import report
    from ..measure.evaluate import EvalConfig, evaluate
    from ..measure.tune import TUNABLE
    from ..policies import load_policy
    from ..policies.spec import policy_from_object

    tuned = load_policy(policy_file)
    family = result["policy"]["name"]
    parameter = TUNABLE[family]
    fixed = {k: v for k, v in result["policy"].items() if k not in ("name", "about", parameter)}
    # the label names the fixed numbers too (oea:p=0.9,k0=6); a similarity file stays out of it
    shown = "".join(f"{k}={v}," for k, v in fixed.items() if isinstance(v, (int, float)))
    policies = {f"tuned:{policy_file.name}": tuned}
    uniform = {}
    for B, r in result["by_batch"].items():
        v = r["uniform"]["values"][0]
        label = f"{family}:{shown}{parameter}={v}"
        uniform[B] = label
        if label not in policies:
            policies[label] = policy_from_object({"name": family, **fixed, parameter: v}, origin=label)
    from ..reference.card import domain_streams, heldout_ids

    if heldout is None:
        from ..reference import heldout_documents

        ids, batching = domain_streams(tokenizer, heldout_documents()), args.batching or "mixed"
    else:
        ids, batching = heldout_ids(tokenizer, heldout), "stream"
    config = EvalConfig(batch_sizes=tuple(sorted(result["by_batch"])), seq_len=args.seq_len,
                        num_sequences=args.sequences, resamples=args.resamples)
    say(f"validating on held-out text: {args.sequences} sequences of {args.seq_len} tokens, native, the tuned "
        f"policy and the best uniform {parameter}")
    evaluation = evaluate(model, ids, policies, config, progress=not args.json, batching=batching)
    rows = evaluation["rows"]
    out = policy_file.with_name(policy_file.stem + ".validation.json")
    write_text_atomic(out, json.dumps({"command": command_line(args), **evaluation}, indent=1) + "\n")
    keep = [r for r in rows if r["policy"] == "native" or r["policy"].startswith("tuned:")
            or r["policy"] == uniform.get(r["batch_size"])]
    say(report.quality_table(keep))
    summary = {}
    for B in sorted(result["by_batch"]):
        at = {r["policy"]: r for r in rows if r["batch_size"] == B}
        t, u = at[f"tuned:{policy_file.name}"], at[uniform[B]]
        summary[B] = {"tuned_unique_ratio": t["mean_unique"] / t["native_mean_unique"],
                      "uniform_unique_ratio": u["mean_unique"] / u["native_mean_unique"],
                      "tuned_delta_ce": t["delta_ce"], "tuned_delta_ce_ci": t["delta_ce_ci"],
                      "tuned_significant_loss": t["significant_loss"], "uniform": uniform[B],
                      "uniform_delta_ce": u["delta_ce"], "uniform_significant_loss": u["significant_loss"]}
        searched = result["by_batch"][B]["tuned"]
        summary[B].update(calibration_delta_ce=searched["delta_ce"], calibration_loss=searched["loss"])
        say(f"batch {B}: tuned U {t['mean_unique']:.1f} ({summary[B]['tuned_unique_ratio']:.2f}x native), delta CE "
            f"{t['delta_ce']:+.4f} [{t['delta_ce_ci'][0]:+.4f}, {t['delta_ce_ci'][1]:+.4f}]"
            f"{' significant loss' if t['significant_loss'] else ''} (calibration: mean {searched['delta_ce']:+.4f}, loss {searched['loss']:+.4f}); "
            f"best uniform {uniform[B]} U {u['mean_unique']:.1f} ({summary[B]['uniform_unique_ratio']:.2f}x)")
        budget = result["conditions"]["budget"]
        if budget is not None and t["delta_ce"] > budget:
            say(f"batch {B}: the held-out delta CE {t['delta_ce']:+.4f} exceeds the budget {budget} by "
                f"{t['delta_ce'] - budget:.4f}: re-routing costs more on this text than on the calibration text "
                f"({searched['delta_ce']:+.4f}, bound {searched['loss']:+.4f}); calibrate on text more like it, "
                "or give a smaller --budget or a higher --confidence")
    say(f"held-out evaluation written to {out}; plot it with `moe-reroute report {out}`")
    return {"file": str(out), "by_batch": summary}


def add_parsers(sub) -> None:
    p = sub.add_parser("tune", help="the cheapest per-layer, per-batch-size policy within a quality budget, as a "
                       "policy file engines load")
    p.add_argument("--model", help="local transformers MoE checkpoint (default: the shipped reference model)")
    p.add_argument("--policy", required=True, help="family to tune, with any fixed parameters: oea, oea:p=0.9, cap, "
                   "budget, gain, gain:base=2, sere (its similarity: the model folder's, or sere:similarity=FILE)")
    p.add_argument("--budget", type=float, help="largest cross-entropy increase over native on the calibration "
                   "text, nats, > 0 (default 0.01); what must fit it is the --confidence upper bound of the mean")
    p.add_argument("--confidence", type=float, default=0.95, help="one-sided level of the upper bound of the mean "
                   "increase that must fit --budget (default 0.95; 0: the mean itself)")
    p.add_argument("--agreement", type=float, help="instead of --budget: smallest top-1 agreement with native (0..1)")
    p.add_argument("--batch-sizes", default="1,4,16,64", help="decode batch sizes to tune (default 1,4,16,64); a step "
                   "of T tokens takes the setting of the largest of them <= T")
    p.add_argument("--text", help="calibration text, plain or .jsonl documents (default with the reference model: "
                   "tuning.jsonl, the tuning part of its held-out split); needed with --model; text the model was not "
                   "trained on, never the text you validate on (refused when it mostly is)")
    p.add_argument("--heldout", help="held-out text to validate on (default with the reference model: validation.jsonl, "
                   "the validation part of its held-out split); needed with --model unless --no-validate")
    p.add_argument("--no-validate", action="store_true", help="skip the held-out validation")
    p.add_argument("--batching", choices=("mixed", "same-domain"), help="with the reference model's text: decode "
                   "batches mixing the domains (default) or of one domain, for the search and the validation")
    p.add_argument("--objective", choices=("time", "experts"), default="time",
                   help="minimise the predicted MoE time b*U + a*T*K (default) or U alone")
    p.add_argument("--cost", metavar="B,A", help="cost coefficients b (per expert) and a (per token-expert slot)")
    p.add_argument("--bench", help="JSON of `moe-reroute bench --json`: its fitted cost model gives b and a")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--sequences", type=int, default=64, help="calibration sequences, and held-out ones (default 64)")
    p.add_argument("--rounds", type=int, default=6, help="joint evaluations of the allocation step (default 6)")
    p.add_argument("--refine", type=int, default=8, help="evaluations of the refinement step (default 8; 0: none)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the validation (default 2000)")
    p.add_argument("--state", help="file of the search's evaluations, to resume an interrupted run (default: "
                   "OUT.<digest of the search's arguments>.state, one per search)")
    p.add_argument("--out", default="tuned.json", help="policy file to write (default tuned.json); the search "
                   "summary goes to OUT_STEM.tune.json and the held-out evaluation to OUT_STEM.validation.json")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress and log on stderr)")
    p.set_defaults(run=_tune, needs=("hf",))
