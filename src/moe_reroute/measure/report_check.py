"""Checks of every field `moe-reroute report` reads from its input files, before anything is written.

Each checker takes the parsed JSON and the file's name and raises `ReportInputError` naming the file and
the field (`eval.json: rows[3].batch_size: ...`). Values a report could only plot as nonsense are refused
too: sizes out of range (a batch of 10^30, num_experts < 1, top_k > num_experts), NaN or infinite numbers,
strings where numbers belong.
"""

from __future__ import annotations

import math
from typing import Any

MAX_BATCH = 1 << 20  # decode batch sizes and concurrencies
MAX_EXPERTS = 1 << 16
MAX_COUNT = 10 ** 12  # tokens, resamples, steps


class ReportInputError(ValueError):
    """An input file of `report` holds a field it cannot use; the message names the file and field."""


class _Check:
    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, where: str, problem: str) -> None:
        raise ReportInputError(f"{self.file}: {where}: {problem}")

    def obj(self, v: Any, where: str) -> dict:
        if not isinstance(v, dict):
            self.fail(where, f"must be a JSON object, got {_shown(v)}")
        return v

    def list(self, v: Any, where: str, nonempty: bool = True) -> list:
        if not isinstance(v, list) or (nonempty and not v):
            self.fail(where, f"must be a {'non-empty ' if nonempty else ''}JSON array, got {_shown(v)}")
        return v

    def str(self, v: Any, where: str) -> str:
        if not isinstance(v, str):
            self.fail(where, f"must be a string, got {_shown(v)}")
        return v

    def bool(self, v: Any, where: str) -> bool:
        if not isinstance(v, bool):
            self.fail(where, f"must be true or false, got {_shown(v)}")
        return v

    def num(self, v: Any, where: str, low: float | None = None, high: float | None = None,
            optional: bool = False) -> float | None:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(where, f"must be a finite number, got {_shown(v)}")
        if low is not None and v < low or high is not None and v > high:
            self.fail(where, f"must be in {_range(low, high)}, got {v!r}")
        return v

    def int(self, v: Any, where: str, low: int | None = None, high: int | None = None,
            optional: bool = False) -> int | None:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(where, f"must be a whole number, got {_shown(v)}")
        return int(self.num(v, where, low, high))

    def pair(self, v: Any, where: str, optional: bool = False) -> None:
        if v is None and optional:
            return
        if not isinstance(v, list) or len(v) != 2:
            self.fail(where, f"must be [low, high], got {_shown(v)}")
        lo, hi = (self.num(x, f"{where}[{i}]") for i, x in enumerate(v))
        if lo > hi:
            self.fail(where, f"low {lo} is above high {hi}")


def _shown(v: Any) -> str:
    kind = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}
    text = repr(v)
    return f"{kind.get(type(v), type(v).__name__)} {text[:40]}{'...' if len(text) > 40 else ''}"


def _range(low, high) -> str:
    if high is None:
        return f">= {low}"
    if low is None:
        return f"<= {high}"
    return f"{low}..{high}"


def check_eval(data: dict, file: str) -> None:
    """An `eval --out` result (eval.json), every field the report reads."""
    c = _Check(file)
    c.obj(data, "the file")
    cond = c.obj(data.get("conditions"), "conditions")
    c.str(cond.get("model"), "conditions.model")
    E = c.int(cond.get("num_experts"), "conditions.num_experts", 1, MAX_EXPERTS)
    c.int(cond.get("top_k"), "conditions.top_k", 1, E)
    c.int(cond.get("bootstrap_resamples"), "conditions.bootstrap_resamples", 1, MAX_COUNT)
    if "command" in data and data["command"] is not None:
        c.str(data["command"], "command")
    for i, r in enumerate(c.list(data.get("rows"), "rows")):
        w = f"rows[{i}]"
        c.obj(r, w)
        c.str(r.get("policy"), f"{w}.policy")
        c.int(r.get("batch_size"), f"{w}.batch_size", 1, MAX_BATCH)
        c.num(r.get("mean_unique"), f"{w}.mean_unique", 0, E)
        c.num(r.get("experts_per_token"), f"{w}.experts_per_token", 0, E)
        c.num(r.get("cross_entropy"), f"{w}.cross_entropy", 0)
        c.num(r.get("delta_ce"), f"{w}.delta_ce")
        c.pair(r.get("delta_ce_ci"), f"{w}.delta_ce_ci")
        c.bool(r.get("significant_loss"), f"{w}.significant_loss")
        c.bool(r.get("worse_by_se_rule"), f"{w}.worse_by_se_rule")
        c.num(r.get("top1_agreement"), f"{w}.top1_agreement", 0, 1)
        c.num(r.get("kl_native_policy"), f"{w}.kl_native_policy")
        layers = c.obj(r.get("unique_per_layer"), f"{w}.unique_per_layer")
        if not layers:
            c.fail(f"{w}.unique_per_layer", "holds no layer")
        for k, v in layers.items():
            if not (k.isascii() and k.isdigit()) or int(k) > MAX_COUNT:
                c.fail(f"{w}.unique_per_layer", f"key {k[:20]!r} is not a layer number")
            c.num(v, f"{w}.unique_per_layer[{k!r}]", 0, E)
    generation = data.get("generation")
    if generation is not None:
        for i, g in enumerate(c.list(generation, "generation", nonempty=False)):
            w = f"generation[{i}]"
            c.obj(g, w)
            c.str(g.get("policy"), f"{w}.policy")
            B = c.int(g.get("batch_size"), f"{w}.batch_size", 1, MAX_BATCH)
            n = c.int(g.get("generated_tokens"), f"{w}.generated_tokens", 0, MAX_COUNT)
            c.int(g.get("differing_tokens"), f"{w}.differing_tokens", 0, n)
            c.int(g.get("identical_sequences"), f"{w}.identical_sequences", 0, B)
            for j, s in enumerate(c.list(g.get("first_divergence_step"), f"{w}.first_divergence_step", False)):
                c.int(s, f"{w}.first_divergence_step[{j}]", 0, MAX_COUNT, optional=True)


def check_bench(data: dict, file: str) -> None:
    """The JSON of `moe-reroute bench --json`, every field the report reads."""
    c = _Check(file)
    c.obj(data, "the file")
    shape = c.obj(data.get("shape"), "shape")
    c.str(shape.get("name"), "shape.name")
    for k in ("hidden", "intermediate"):
        c.int(shape.get(k), f"shape.{k}", 1, MAX_COUNT)
    E = c.int(shape.get("num_experts"), "shape.num_experts", 1, MAX_EXPERTS)
    c.int(shape.get("top_k"), "shape.top_k", 1, E)
    c.num(shape.get("bytes_per_expert"), "shape.bytes_per_expert", 0)
    c.str(data.get("routing"), "routing")
    bw = c.obj(data.get("bandwidth"), "bandwidth")
    c.num(bw.get("gbps"), "bandwidth.gbps", 0)
    c.str(bw.get("method"), "bandwidth.method")
    if "command" in data and data["command"] is not None:
        c.str(data["command"], "command")
    results = c.obj(data.get("results"), "results")
    for B, res in results.items():
        w = f"results[{B[:20]!r}]"
        if not (B.isascii() and B.isdigit()) or not 1 <= int(B) <= MAX_BATCH:
            c.fail(w, f"the key must be a batch size 1..{MAX_BATCH}")
        c.obj(res, w)
        for k in ("dtype", "device", "kernel", "kernel_note", "cache"):
            c.str(res.get(k), f"{w}.{k}")
        if res.get("aliasing") is not None:
            c.str(res["aliasing"], f"{w}.aliasing")
        policies = c.obj(res.get("policies"), f"{w}.policies")
        if not policies:
            c.fail(f"{w}.policies", "holds no policy")
        for name, t in policies.items():
            p = f"{w}.policies[{name[:40]!r}]"
            c.obj(t, p)
            c.num(t.get("mean_unique"), f"{p}.mean_unique", 0, E)
            for k in ("median_ms", "iqr_ms", "achieved_gbps"):
                c.num(t.get(k), f"{p}.{k}", 0)
            c.num(t.get("ratio_vs_native"), f"{p}.ratio_vs_native", 0, optional=True)
    fit = data.get("cost_model")
    if fit is not None:
        c.obj(fit, "cost_model")
        for k in ("b", "a", "c", "r2"):
            c.num(fit.get(k), f"cost_model.{k}", optional=True)


def check_serve(data: dict, file: str) -> None:
    """A `moe-reroute serve-bench` results.json, every field the report reads."""
    c = _Check(file)
    c.obj(data, "the file")
    mode = data.get("mode")
    if mode not in ("offline", "serve"):
        c.fail("mode", f'must be "offline" or "serve", got {_shown(mode)}')
    c.str(data.get("command"), "command")
    cond = c.obj(data.get("conditions"), "conditions")
    for k in ("model", "vllm", "device", "dtype"):
        c.str(cond.get(k), f"conditions.{k}")
    if cond.get("model_note") is not None:
        c.str(cond["model_note"], "conditions.model_note")
    c.bool(cond.get("enforce_eager"), "conditions.enforce_eager")
    for k in ("prompt_len", "output_len", "repeats"):
        c.int(cond.get(k), f"conditions.{k}", 1, MAX_COUNT)
    if mode == "serve":
        c.int(cond.get("num_prompts"), "conditions.num_prompts", 1, MAX_COUNT)
        if cond.get("prompts") is not None:  # --prompts: the user's own requests
            p = c.obj(cond["prompts"], "conditions.prompts")
            for k in ("file", "sha256"):
                c.str(p.get(k), f"conditions.prompts.{k}")
            for k in ("requests", "prompt_tokens_max", "output_tokens_max"):
                c.int(p.get(k), f"conditions.prompts.{k}", 1, MAX_COUNT)
            for k in ("prompt_tokens_mean", "output_tokens_mean"):
                c.num(p.get(k), f"conditions.prompts.{k}", 0, MAX_COUNT)
        if not isinstance(cond.get("request_rate"), (str, int, float)) or isinstance(cond.get("request_rate"), bool):
            c.fail("conditions.request_rate", f"must be a number or \"inf\", got {_shown(cond.get('request_rate'))}")
    labels = data.get("labels")
    if labels is not None:
        for k, v in c.obj(labels, "labels").items():
            c.str(v, f"labels[{k[:40]!r}]")
    offline = mode == "offline"
    for i, r in enumerate(c.list(data.get("rows"), "rows")):
        w = f"rows[{i}]"
        c.obj(r, w)
        c.str(r.get("policy"), f"{w}.policy")
        c.int(r.get("batch" if offline else "concurrency"), f"{w}.{'batch' if offline else 'concurrency'}", 1, MAX_BATCH)
        numbers = (("tpot_ms", "tpot_ms_min", "tpot_ms_max", "decode_tokens_per_s", "prefill_ms") if offline else
                   ("output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms"))
        for k in numbers:
            c.num(r.get(k), f"{w}.{k}", 0)
        ratio = "tpot_ratio" if offline else "throughput_ratio"
        c.num(r.get(ratio), f"{w}.{ratio}", 0, optional=True)
        c.pair(r.get(ratio + "_ci"), f"{w}.{ratio}_ci", optional=True)
        if c.num(r.get("unique"), f"{w}.unique", 0, optional=True) is not None:
            c.num(r.get("unique_native"), f"{w}.unique_native", 0)
        if not offline:
            for k in ("steps_rerouted", "steps_seen", "tokens_rerouted"):
                c.int(r.get(k), f"{w}.{k}", 0, MAX_COUNT)
            if r.get("decode_tokens"):
                c.int(r["decode_tokens"], f"{w}.decode_tokens", 0, MAX_COUNT)
                c.int(r.get("decode_tokens_rerouted"), f"{w}.decode_tokens_rerouted", 0, MAX_COUNT)
