"""`moe-reroute check`: what this environment can do with moe-reroute, before a server starts."""

from __future__ import annotations

from .inputs import InputError

MARK = {"ok": "ok", "info": "--", "problem": "PROBLEM"}


def _check(args) -> int:
    from ..serving.check import PROBLEM, report

    rows = report(model=args.model, engines=not args.no_engines)
    width = max(len(r.what) for r in rows)
    found = max(len(r.found) for r in rows)
    for r in rows:
        line = f"{MARK[r.status]:>7}  {r.what:<{width}}  {r.found:<{found}}"
        print(f"{line}  {r.note}".rstrip() if r.note else line.rstrip())
    problems = [r for r in rows if r.status == PROBLEM]
    if problems:
        raise InputError(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}: "
                         + "; ".join(f"{r.what}: {r.note}" for r in problems))
    print("no problem found")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("check", help="what this environment can do: torch, GPU, fused kernels, vLLM and SGLang "
                                     "plugins, the policy the environment sets (and whether it fits a model)",
                       description="Report what this environment can do with moe-reroute, before a server starts: "
                                   "torch and the GPU, whether the fused kernels run, whether the installed vLLM "
                                   "and SGLang are releases the plugins support and will load them, and the "
                                   "policy MOE_REROUTE_POLICY / MOE_REROUTE_POLICY_FILE set, read as the engines "
                                   "read it. Exit status 2 when something would stop an engine at start-up.")
    p.add_argument("--model", metavar="DIR", help="a local model folder (its config.json): check that the "
                                                  "environment's policy fits its E, K and every MoE layer")
    p.add_argument("--no-engines", action="store_true", help="skip importing vLLM and SGLang (a few seconds each)")
    p.set_defaults(run=_check, needs=())
