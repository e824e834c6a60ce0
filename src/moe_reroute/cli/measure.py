"""`moe-reroute eval`, `moe-reroute report` and `moe-reroute calibrate`: quality against native routing,
reports with plots, and SERE's expert similarity for a model."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from .inputs import InputError, at_least, in_range, check_out_dir, check_out_file, read_json_file, read_text_file

DEFAULT_POLICIES = ("cap:k=4", "oea:k0=3", "sere", "budget:budget=32")
MAX_RESAMPLES = 1_000_000  # bootstrap resamples: each holds an index per sequence


def command_line(args) -> str:
    return "moe-reroute " + " ".join(shlex.quote(a) for a in args.argv)


def int_list(text: str, option: str = "--batch-sizes") -> tuple[int, ...]:
    """The batch sizes in `text` (comma-separated, each 1..MAX_SIZE), in the order given (`bench.sizes`)."""
    from .bench import UsageError, sizes

    try:
        return tuple(sizes(text, option, "1,4,16"))
    except UsageError as e:
        raise SystemExit(f"error: {e}") from None


def load_model(path: str | None, text: str | None, need_text: bool = True):
    """(model, tokenizer, held-out text) for --model/--text; the shipped reference model by default."""
    if path is None:
        from ..reference import load

        given = read_text(text) if text is not None else None  # a bad --text fails before the model loads
        model, tokenizer, heldout = load()
        return model, tokenizer, heldout if given is None else given
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: {folder} is not a local transformers checkpoint (no config.json); give a folder "
                         "with config.json, weights and tokenizer")
    if text is None and need_text:
        raise SystemExit("error: --text FILE is needed with --model: held-out text the model was not trained on")
    heldout = read_text(text) if text is not None else ""
    config = read_json_file(folder / "config.json", "--model", "a transformers config.json")
    if not isinstance(config.get("model_type"), str):
        raise SystemExit(f"error: --model {folder}: config.json has no \"model_type\"; it is not a transformers "
                         "checkpoint")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken checkpoint folder
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"error: --model {folder}: transformers cannot load it ({type(e).__name__}: {first}); "
                         "give a folder with config.json, weights and tokenizer files") from None
    check_moe(model)
    from ..measure.synth import read_marker

    marker = read_marker(folder)
    if marker:  # stderr: a --json output on stdout stays JSON
        print(f"note: {folder} is a synthetic checkpoint (`moe-reroute synth-model`, {marker.get('shape', '?')}) with "
              "random weights: its routing is close to uniform and its quality numbers say nothing about the real "
              "model's; use it for speed, and a trained model for quality", file=sys.stderr, flush=True)
    return model, tokenizer, heldout


def check_moe(model) -> None:
    from ..contract import SUPPORTED_ARCHITECTURES
    from ..hf.apply import moe_routers

    model_type = getattr(model.config, "model_type", None)
    try:
        found = list(moe_routers(model))  # (refuses an architecture it has no routers for)
    except ValueError:
        found = []
    if not found:
        raise SystemExit(f"error: {type(model).__name__} (model_type {model_type!r}) is not a supported MoE model; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def read_text(path: str, option: str = "--text") -> str:
    """The text of a --text file (or of `option`'s): plain text, or for a .jsonl file (one JSON object per
    line with its "text", as the reference model's heldout.jsonl, tuning.jsonl and validation.jsonl) the
    documents' texts, one after another."""
    text = read_text_file(path, option)
    if str(path).endswith(".jsonl"):
        from ..files import json_lines

        docs = []
        for n, doc in json_lines(text, lambda n, why: SystemExit(
                f"error: {option} {path}: line {n} is not JSON ({why}); a .jsonl file holds one JSON object with "
                "a \"text\" per line (rename a plain text file to .txt)")):
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise SystemExit(f"error: {option} {path}: line {n} has no \"text\" string; a .jsonl file holds one "
                                 "JSON object with a \"text\" per line")
            docs.append(doc["text"])
        text = "\n\n".join(docs)
    if not text.strip():
        raise SystemExit(f"error: {option} {path} is empty; give a file of plain text")
    return text


def default_policies(model) -> list[str]:
    """DEFAULT_POLICIES, without sere when the model folder has no calibrated similarity (said on stderr)."""
    from ..measure.evaluate import SIMILARITY_FILE

    folder = Path(getattr(model, "name_or_path", "") or ".")
    if (folder / SIMILARITY_FILE).exists():
        return list(DEFAULT_POLICIES)
    print(f"note: sere left out: {folder} has no {SIMILARITY_FILE}; make one with `moe-reroute calibrate` and "
          "pass --policy sere:similarity=FILE", file=sys.stderr)
    return [p for p in DEFAULT_POLICIES if not p.startswith("sere")]


def build_policies(specs, model, with_native: bool = False) -> dict:
    from ..measure.evaluate import build_policy
    from ..policies.spec import is_policy_file, parse_policy_spec

    out = {}
    for spec in specs:
        try:
            if is_policy_file(spec):  # a policy file (`moe-reroute tune --out`), named as given
                from ..contract import RouterSpec
                from ..policies import load_policy

                out[spec] = load_policy(spec, num_experts=RouterSpec.from_config(model.config).num_experts)
                continue
            name, params = parse_policy_spec(spec)
            out[spec] = build_policy(name, params, model)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise SystemExit(f"error: policy {spec!r}: {e}") from None
    if with_native:
        out = {"native": build_policy("native", {}, model), **{k: v for k, v in out.items() if k != "native"}}
    return out


def _eval(args) -> int:
    from ..measure import report
    from ..measure.evaluate import (EvalConfig, batch_order, domain_sequences, evaluate, generation_check,
                                    make_sequences)
    from ..reference.card import heldout_ids

    batch_sizes = int_list(args.batch_sizes)
    for option, value, low in (("--seq-len", args.seq_len, 2), ("--sequences", args.sequences, 2),
                               ("--resamples", args.resamples, 1), ("--generate", args.generate, 0),
                               ("--generation-batch", args.generation_batch, 1)):
        at_least(value, low, option)
    in_range(args.resamples, 1, MAX_RESAMPLES, "--resamples")
    if args.out:
        check_out_dir(args.out)
        for name in ("eval.json", "task.json", "lm_eval.json"):  # the result file, checked before the run
            check_out_file(Path(args.out) / name, f"--out {args.out}: its")
    if args.task:
        read_text_file(args.task, "--task")
    if args.lm_eval is not None and not args.lm_eval.strip(" ,"):
        raise SystemExit("error: --lm-eval needs task names (comma-separated, e.g. hellaswag,arc_easy)")
    if args.task and args.lm_eval:
        raise SystemExit("error: --task and --lm-eval are exclusive: give your JSONL file or lm-eval tasks")
    if args.lm_eval_include and not args.lm_eval:
        raise SystemExit("error: --lm-eval-include needs --lm-eval TASKS (the task names in that folder)")
    if args.lm_eval:
        from ..measure.harness import require_lm_eval

        try:
            require_lm_eval()
        except ImportError as e:
            raise SystemExit(f"error: {e}") from None
    model, tokenizer, text = load_model(args.model, args.text, need_text=not (args.task or args.lm_eval))
    policies = build_policies(args.policy or default_policies(model), model)
    policies.pop("native", None)  # native is always the reference row
    if args.task:
        return _eval_task(args, model, tokenizer, policies)
    if args.lm_eval:
        return _eval_harness(args, model, tokenizer, policies)
    labelled = args.model is None and args.text is None  # the reference model's held-out split, by domain
    if args.batching is not None and not labelled:
        raise SystemExit("error: --batching needs held-out text with domain labels (the reference model's, without "
                         "--model/--text); plain --text is cut into consecutive sequences")
    try:
        config = EvalConfig(batch_sizes=batch_sizes, seq_len=args.seq_len,
                            num_sequences=args.sequences, resamples=args.resamples)
        if labelled:
            from ..reference import heldout_documents
            from ..reference.card import domain_streams

            ids = domain_streams(tokenizer, heldout_documents())
            result = evaluate(model, ids, policies, config, progress=not args.json, batching=args.batching or "mixed")
        else:
            ids = heldout_ids(tokenizer, text)
            result = evaluate(model, ids, policies, config, progress=not args.json)
        generation = None
        if args.generate > 0:
            if labelled:  # prompts batched as the evaluation was
                seqs, labels = domain_sequences(ids, config.seq_len, config.num_sequences)
                gb = min(args.generation_batch, seqs.shape[0])
                seqs = seqs[batch_order(labels, gb, result["conditions"]["batching"])]
            else:
                seqs = make_sequences(ids, config.seq_len, config.num_sequences)
                gb = min(args.generation_batch, seqs.shape[0])
            prompts = seqs[:gb, : min(32, config.seq_len)]
            generation = generation_check(model, prompts, policies, max_new_tokens=args.generate)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    result["generation"] = generation
    if not args.json:
        print(report.quality_table(result["rows"]))
        for g in generation or []:
            print(f"generation {g['policy']}: {g['differing_tokens']}/{g['generated_tokens']} tokens differ from "
                  f"native greedy; {g['identical_sequences']}/{g['batch_size']} sequences identical")
    if args.out:
        path = write_results(args, "eval.json", result)
        if not args.json:
            print(f"results written to {path}; make plots with `moe-reroute report {path}`")
    if args.json:
        print(json.dumps(result))
    return 0


def write_results(args, name: str, result: dict) -> Path:
    """`result` with the command line, as JSON in --out; returns the file."""
    out = Path(args.out)
    from ..files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out / name, json.dumps({"command": command_line(args), **result}, indent=1) + "\n")


def _eval_task(args, model, tokenizer, policies) -> int:
    from ..measure.tasks import evaluate_task

    try:
        result = evaluate_task(model, tokenizer, args.task, policies, batch_sizes=int_list(args.batch_sizes),
                               max_new_tokens=args.generate or 32, resamples=args.resamples)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"| policy | batch | {result['rows'][0]['metric']} | Δ [95% CI] | significant loss |")
    print("| --- | ---: | ---: | --- | --- |")
    for r in result["rows"]:
        lo, hi = r["delta_ci"]
        print(f"| `{r['policy']}` | {r['batch_size']} | {r['score']:.3f} ± {r['score_se']:.3f} | "
              f"{r['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {'yes' if r['significant_loss'] else 'no'} |")
    if args.out:
        print(f"results written to {write_results(args, 'task.json', result)}")
    return 0


def _eval_harness(args, model, tokenizer, policies) -> int:
    from ..measure.harness import evaluate_harness

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    rows, conditions = [], None
    try:
        for B in int_list(args.batch_sizes):
            result = evaluate_harness(model, tokenizer, tasks, args.lm_eval_include, policies, batch_size=B,
                                      resamples=args.resamples)
            rows += result["rows"]
            conditions = result["conditions"]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    result = {"rows": rows, "conditions": {**conditions, "batch_size": int_list(args.batch_sizes)}}
    if args.json:
        print(json.dumps(result))
        return 0
    print("| task | metric | policy | batch | value ± stderr | Δ [95% CI] | significant loss |")
    print("| --- | --- | --- | ---: | ---: | --- | --- |")
    for r in rows:
        se = f" ± {r['stderr']:.3f}" if r["stderr"] is not None else ""
        ci = f" [{r['delta_ci'][0]:+.3f}, {r['delta_ci'][1]:+.3f}]" if r["delta_ci"] else " (no per-document values)"
        loss = "n/a" if r["significant_loss"] is None else "yes" if r["significant_loss"] else "no"
        print(f"| {r['task']} | {r['metric']} | `{r['policy']}` | {r['batch_size']} | {r['value']:.3f}{se} | "
              f"{r['delta']:+.3f}{ci} | {loss} |")
    if args.out:
        print(f"results written to {write_results(args, 'lm_eval.json', result)}")
    return 0


ROW_FIELDS = {"policy": str, "batch_size": int, "mean_unique": (int, float), "experts_per_token": (int, float),
              "cross_entropy": (int, float), "delta_ce": (int, float), "delta_ce_ci": list,
              "significant_loss": bool, "worse_by_se_rule": bool, "top1_agreement": (int, float),
              "kl_native_policy": (int, float), "unique_per_layer": dict}
CONDITION_FIELDS = {"model": str, "num_experts": int, "top_k": int, "bootstrap_resamples": int}
BENCH_FIELDS = {"shape": dict, "routing": str, "bandwidth": dict, "results": dict}


def _fields_problem(obj, fields: dict, where: str) -> str | None:
    if not isinstance(obj, dict):
        return f"{where} must be an object, got {type(obj).__name__}"
    for k, t in fields.items():
        v = obj.get(k)
        if v is None or isinstance(v, bool) and t is not bool or not isinstance(v, t):
            want = t.__name__ if isinstance(t, type) else "a number"
            return f"{where} needs {k!r} ({want}), got {v!r:.40}"
    return None


def read_results(path: str, option: str = "results file"):
    """The `eval --out` results in `path`, checked field by field before any report is written."""
    what = "eval.json written by `moe-reroute eval --out DIR` (held-out text, not --task or --lm-eval)"
    data = read_json_file(path, option, what)
    rows = data.get("rows")
    problem = "it has no \"rows\"" if not isinstance(rows, list) or not rows else None
    problem = problem or _fields_problem(data.get("conditions"), CONDITION_FIELDS, "\"conditions\"")
    for i, r in enumerate(rows or []):
        problem = problem or _fields_problem(r, ROW_FIELDS, f"row {i}")
        if not problem and len(r["delta_ce_ci"]) != 2:
            problem = f"row {i}: delta_ce_ci must be [low, high]"
    if problem:
        raise InputError(f"{option} {path}: {problem}; expected {what}")
    return data


REPORT_FILES = ("report.md", "results.json")  # a folder holding either holds a report


def _report(args) -> int:
    """Every input read and checked field by field, then the report written into a temporary folder
    beside --out and moved into place: a bad input leaves nothing behind, and a failure part-way leaves
    --out as it was."""
    from ..measure import report
    from ..measure.report_check import ReportInputError, check_bench, check_eval, check_serve

    data = read_json_file(args.eval_json, "results file", "eval.json of `moe-reroute eval --out DIR`, or the "
                          "results.json of a report")
    if isinstance(data, dict) and "evaluation" in data and "rows" not in data:
        return _rebuild_report(args, data)
    data = read_results(args.eval_json)
    try:
        check_eval(data, f"results file {args.eval_json}")
        bench = serve = None
        if args.bench:
            bench = read_json_file(args.bench, "--bench", "the JSON of `moe-reroute bench --json > FILE`")
            problem = _fields_problem(bench, BENCH_FIELDS, "it")
            if problem:
                raise InputError(f"--bench {args.bench}: {problem}; expected the JSON of `moe-reroute bench --json > FILE`")
            check_bench(bench, f"--bench {args.bench}")
        if args.serve_bench:
            serve = read_json_file(args.serve_bench, "--serve-bench", "results.json of `moe-reroute serve-bench`")
            check_serve(serve, f"--serve-bench {args.serve_bench}")
    except ReportInputError as e:
        raise InputError(str(e)) from None
    try:
        report.pick_batch_size(data["rows"], args.batch_size)
    except ValueError as e:
        raise InputError(f"--batch-size: {e}") from None
    out = check_out_dir(args.out)
    held = [name for name in REPORT_FILES if (out / name).exists()]
    if held and not args.force:
        raise InputError(f"--out {out} already holds a report ({', '.join(held)}); pass --force to replace it, or "
                         "give another folder")
    evaluation = {"rows": data["rows"], "conditions": data["conditions"]}
    command = str(data.get("command", "")) + (f"\n{bench.get('command', '')}" if bench else "")
    try:
        report._plt()  # matplotlib missing: say so before anything is made
        path = _write_report_into(out, lambda tmp: report.write(tmp, evaluation, command, bench=bench,
                                                                generation=data.get("generation"),
                                                                batch=args.batch_size, serve=serve))
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"report written to {path}")
    return 0


def _write_report_into(out: Path, write) -> Path:
    """`write(folder)` into a new temporary folder beside `out`, then into place: the whole folder renamed
    to `out` when `out` does not exist, else its files renamed into `out` one by one, report.md last (so a
    report.md is only ever beside complete plots and results). The temporary folder is removed on any
    error or interrupt. Returns the path of report.md in `out`."""
    import shutil
    import tempfile

    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        md = Path(write(tmp))
        if not out.exists():
            os.chmod(tmp, 0o777 & ~_umask())
            tmp.rename(out)
            return out / md.name
        from ..files import check_output

        names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == md.name)
        for name in names:
            check_output(out / name, f"--out {out}: {name}")
        for name in names:
            os.replace(tmp / name, out / name)
        return out / md.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _rebuild_report(args, data: dict) -> int:
    """`report results.json`: the report (the demo's, or an earlier `report`'s) rebuilt from its own results."""
    from ..measure import report

    if args.bench or args.serve_bench:
        raise InputError(f"{args.eval_json} is a report's results.json, which holds its own latency and engine "
                         "results: drop --bench and --serve-bench")
    where = f"results file {args.eval_json}"
    problem = _fields_problem(data["evaluation"], {"rows": list, "conditions": dict}, "its \"evaluation\"")
    rows = data["evaluation"].get("rows") if isinstance(data["evaluation"], dict) else None
    problem = problem or ("its evaluation has no rows" if not rows else None)
    problem = problem or _fields_problem(data["evaluation"]["conditions"], CONDITION_FIELDS, "\"conditions\"")
    for i, r in enumerate(rows or []):
        problem = problem or _fields_problem(r, ROW_FIELDS, f"row {i}")
    if problem:
        raise InputError(f"{where}: {problem}; expected the results.json written with a report")
    try:
        report.pick_batch_size(rows, args.batch_size)
    except ValueError as e:
        raise InputError(f"--batch-size: {e}") from None
    out = check_out_dir(args.out)
    held = [name for name in REPORT_FILES if (out / name).exists()]
    if held and not args.force:
        raise InputError(f"--out {out} already holds a report ({', '.join(held)}); pass --force to replace it, or "
                         "give another folder")
    try:
        report._plt()  # matplotlib missing: say so before anything is made
        path = _write_report_into(out, lambda tmp: report.rebuild(data, tmp, args.batch_size))
    except (ValueError, ImportError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {where}: {e}") from None
    print(f"report written to {path}")
    return 0


def _calibrate(args) -> int:
    from ..hf.calibrate import calibrate_similarity, save_similarity

    at_least(args.tokens, 2, "--tokens")
    out = check_out_file(args.out)
    model, tokenizer, text = load_model(args.model, args.text)
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    joined = "\n\n".join(paragraphs)
    tokens = min(args.tokens, len(tokenizer(joined).input_ids))  # what the calibration reads, and the file records
    if tokens < 2:
        raise InputError(f"--text gives {tokens} token{'s' * (tokens != 1)}; calibration needs at least 2 (give "
                         f"--tokens {args.tokens} tokens of text, or more)")
    if tokens < args.tokens:
        print(f"note: the text gives {tokens} tokens, fewer than --tokens {args.tokens}: calibrating on {tokens} "
              "(more text gives a steadier similarity)", file=sys.stderr)
    similarity = calibrate_similarity(model, [joined], tokenizer=tokenizer, method=args.method, max_tokens=tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = save_similarity(similarity, out, method=args.method, tokens=tokens)
    print(f"similarity of {len(similarity)} MoE layers written to {path}; use it with `--policy sere:similarity={path}`")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="quality of policies against native routing at decode batch sizes")
    p.add_argument("--model", help="local transformers MoE checkpoint (default: the shipped reference model)")
    p.add_argument("--text", help="held-out text file (default with the reference model: its held-out split)")
    p.add_argument("--policy", action="append", help="policy spec or policy file (the JSON `moe-reroute tune --out` "
                   "writes), repeatable: oea:k0=3, cap:k=4, sere:similarity=FILE, budget:budget=32, tuned.json "
                   "(default: " + " ".join(DEFAULT_POLICIES) + ")")
    p.add_argument("--task", help="JSONL task file instead of held-out text: multiple choice "
                   "({context, choices, answer}) or generation ({prompt, target})")
    p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks instead of "
                   "held-out text (needs `pip install 'moe-reroute[lmeval]'`)")
    p.add_argument("--lm-eval-include", metavar="PATH", help="folder of local lm-eval task YAMLs (e.g. "
                   "dataset_path: json with data_files), for --lm-eval")
    p.add_argument("--batch-sizes", default="1,4,8,16,32,64", help="decode batch sizes (default 1,4,8,16,32,64)")
    p.add_argument("--batching", choices=("same-domain", "mixed"), default=None,
                   help="reference model's held-out text: decode batches of one domain, or cycling through the "
                   "domains (default mixed); same-domain batches of B need B sequences per domain. Not with --text")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--sequences", type=int, default=64, help="sequences of held-out text (default 64; with "
                   "domain labels split equally among the domains)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--generate", type=int, default=32, help="greedy tokens per prompt for the generation check (0: skip)")
    p.add_argument("--generation-batch", type=int, default=16, help="prompts in the generation check (default 16)")
    p.add_argument("--out", help="folder for the results: eval.json, task.json or lm_eval.json")
    p.add_argument("--json", action="store_true", help="print one JSON object, no table or progress")
    p.set_defaults(run=_eval, needs=("hf",))

    p = sub.add_parser("report", help="plots and a Markdown report from `eval --out` (and `bench --json`) results")
    p.add_argument("eval_json", help="eval.json written by `moe-reroute eval --out DIR`, or a report's own "
                   "results.json (the demo's, say) to rebuild that report")
    p.add_argument("--bench", help="JSON written by `moe-reroute bench --json > FILE`")
    p.add_argument("--serve-bench", help="results.json written by `moe-reroute serve-bench` (end-to-end engine speed)")
    p.add_argument("--batch-size", type=int, help="batch size of the Pareto and per-layer plots (default 16)")
    p.add_argument("--out", default="moe-reroute-report", help="output folder (default ./moe-reroute-report)")
    p.add_argument("--force", action="store_true", help="replace the report already in --out")
    p.set_defaults(run=_report)

    p = sub.add_parser("calibrate", help="SERE expert similarity of a model, from calibration text")
    p.add_argument("--model", help="local transformers MoE checkpoint (default: the shipped reference model)")
    p.add_argument("--text", required=True, help="calibration text (not the text you evaluate on)")
    p.add_argument("--method", default="cka", choices=("cka", "cosine", "frobenius"),
                   help="how two experts' outputs are compared (SERE's default: cka)")
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens (default 512)")
    p.add_argument("--out", required=True, help="similarity file to write (.safetensors)")
    p.set_defaults(run=_calibrate, needs=("hf",))
