"""Reports: plots (PNG) and a Markdown page from the results of `evaluate` (and, optionally, the MoE-layer
latency benchmark), with the exact command and conditions that produced them.

Plots: quality (delta cross-entropy with its confidence interval) against U or measured latency, one
line per policy family over its parameter sweep; U against batch size; U per layer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def family(label: str) -> str:
    """"oea:k0=3" -> "oea"."""
    return label.split(":", 1)[0]


# the parameter a family's points are swept by (what `moe-reroute tune` tunes): one line per family and
# setting of its other parameters in the Pareto plot
SWEPT = {"oea": "k0", "cap": "k", "sere": "primary", "budget": "budget", "gain": "budget"}


def spec_items(label: str) -> list[tuple[str, str]]:
    """"gain:base=2,budget=[128,32]" -> [("base", "2"), ("budget", "[128,32]")]: the spec's parameters as
    written (commas inside brackets or braces do not split)."""
    args = label.split(":", 1)[1] if ":" in label else ""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(args + ","):
        depth += 1 if ch in "[{(" else -1 if ch in "]})" else 0
        if ch == "," and depth <= 0:
            key, _, value = args[start:i].partition("=")
            if key.strip():
                items.append((key.strip(), value.strip()))
            start = i + 1
    return items


def line_of(label: str) -> tuple[str, str]:
    """(line, point): the Pareto plot's line of a policy spec (its family and the parameters it is not
    swept by) and the point's own label on it (the swept parameter's value, or the whole spec)."""
    fam = family(label)
    swept = SWEPT.get(fam)
    items = spec_items(label)
    if swept is None or not any(k == swept for k, _ in items):
        return fam, label.split(":", 1)[1] if ":" in label else ""
    rest = ",".join(f"{k}={v}" for k, v in items if k != swept)
    return (f"{fam}:{rest}" if rest else fam), next(f"{k}={v}" for k, v in items if k == swept)


def md_text(value) -> str:
    """`value` as literal Markdown text on one line: a results file's strings (a model name, say) cannot
    add headings, links, HTML or table cells to the report."""
    text = " ".join(str(value).split())
    return re.sub(r"([\\`*_{}\[\]<>#!|~&])", r"\\\1", text)


def md_code(value) -> str:
    """`value` as an inline code span on one line, fenced by more backticks than it holds; `|` escaped
    so that it stays in its table cell."""
    text = " ".join(str(value).split()).replace("|", "\\|")
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def pick_batch_size(rows: list[dict], wanted: int | None = None) -> int:
    sizes = sorted({r["batch_size"] for r in rows})
    if wanted is not None:
        if wanted not in sizes:
            raise ValueError(f"batch size {wanted} was not evaluated; evaluated: {sizes}")
        return wanted
    return 16 if 16 in sizes else sizes[-1]


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'moe-reroute[plots]'") from e
    return plt


def latency_ratios(bench: dict | None) -> dict[int, dict[str, float]]:
    """{batch size: {policy: median latency / native}} from `moe-reroute bench --json` output; batch sizes
    whose timings were noise (see `latency_noise`) are left out."""
    out = {}
    noisy = latency_noise(bench)
    for B, res in (bench or {}).get("results", {}).items():
        if int(B) in noisy:
            continue
        out[int(B)] = {name: t["ratio_vs_native"] for name, t in res["policies"].items()
                       if t.get("ratio_vs_native") is not None}
    return out


def latency_noise(bench: dict | None) -> dict[int, float]:
    """{batch size: spread} for the batch sizes whose repeated calls varied more than the bench's noise
    limit (IQR / median; NaN: too few repeats to tell): their ratios are noise, not results. Results of
    older versions, without a spread, count as measured."""
    return {int(B): float(res.get("spread", float("nan"))) for B, res in (bench or {}).get("results", {}).items()
            if res.get("noisy")}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


# One colour and marker per policy family, the same in every plot; other families cycle through the rest.
FAMILY_STYLE = {"native": ("black", "*"), "cap": ("tab:blue", "o"), "oea": ("tab:orange", "s"),
                "sere": ("tab:green", "^"), "budget": ("tab:red", "D"),
                "gain": ("tab:brown", "P"), "tuned": ("tab:purple", "v")}
OTHER_STYLES = [("tab:pink", "X"), ("tab:olive", "h"), ("tab:cyan", "<"), ("tab:gray", ">")]
LINESTYLES = ["-", "--", ":", "-."]


def style(label: str, known: dict | None = None) -> tuple[str, str]:
    """(colour, marker) of the policy family of `label`."""
    fam = family(label)
    if fam in FAMILY_STYLE:
        return FAMILY_STYLE[fam]
    known = {} if known is None else known
    return known.setdefault(fam, OTHER_STYLES[len(known) % len(OTHER_STYLES)])


def _legend(ax, fig) -> None:
    """The legend right of the axes, off the data."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def plot_pareto(rows: list[dict], batch: int, path: Path, latency: dict[str, float] | None = None) -> Path:
    """Delta cross-entropy (with CI) against mean U, or against the latency ratio when given (then only
    the policies that have one are drawn: a plot named for latency shows latency)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    at = [r for r in rows if r["batch_size"] == batch]
    use_latency = latency is not None
    if use_latency:
        at = [r for r in at if r["policy"] in latency]
    others: dict = {}
    nth: dict[str, int] = {}  # lines drawn so far per family: each further line of a family gets its own style
    for line in dict.fromkeys(line_of(r["policy"])[0] for r in at):
        pts = [r for r in at if line_of(r["policy"])[0] == line]
        xs = [latency[r["policy"]] if use_latency else r["mean_unique"] for r in pts]
        order = sorted(range(len(pts)), key=lambda i: xs[i])
        xs = [xs[i] for i in order]
        pts = [pts[i] for i in order]
        ys = [r["delta_ce"] for r in pts]
        err = [[r["delta_ce"] - r["delta_ce_ci"][0] for r in pts], [r["delta_ce_ci"][1] - r["delta_ce"] for r in pts]]
        fam = family(line)
        colour, marker = style(fam, others)
        i = nth[fam] = nth.get(fam, -1) + 1
        ax.errorbar(xs, ys, yerr=err, marker=marker, color=colour, capsize=3, label=line,
                    ls=LINESTYLES[i % len(LINESTYLES)], markersize=10 if fam == "native" else 6)
        for x, r in zip(xs, pts):
            point = line_of(r["policy"])[1]
            if point:
                ax.annotate(point, (x, r["delta_ce"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("MoE-layer latency / native (measured)" if use_latency else "mean distinct experts per layer (U)")
    ax.set_ylabel("Δ cross-entropy vs native (nats, 95% CI)")
    ax.set_title(f"quality vs {'measured latency' if use_latency else 'experts activated'} at decode batch {batch}")
    _legend(ax, fig)
    return _save(fig, path)


def plot_u_vs_batch(u_by_batch: dict[str, dict[int, float]], path: Path, uniform: dict[int, float] | None = None,
                    title: str = "") -> Path:
    """U against batch size, one line per policy: {policy: {batch size: mean U per layer}}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    others: dict = {}
    for label, by_b in u_by_batch.items():
        pts = sorted(by_b.items())
        colour, marker = style(label, others)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour, label=label,
                lw=2 if label == "native" else 1)
    if uniform:
        xs = sorted(uniform)
        ax.plot(xs, [uniform[x] for x in xs], ls="--", color="grey", label="uniform routing")
    ax.set_xscale("log", base=2)
    xs = sorted({b for by_b in u_by_batch.values() for b in by_b})
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("mean distinct experts per layer (U)")
    ax.set_title("U against batch size" + (f" ({title})" if title else ""), fontsize=9)
    _legend(ax, fig)
    return _save(fig, path)


def plot_u_per_layer(rows: list[dict], batch: int, path: Path) -> Path:
    """Mean U of each decoder layer, one line per policy: its family's colour and marker, a line style
    per setting within the family."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    others: dict = {}
    nth: dict[str, int] = {}
    for r in (r for r in rows if r["batch_size"] == batch):
        layers = sorted(r["unique_per_layer"], key=int)
        colour, marker = style(r["policy"], others)
        i = nth[family(r["policy"])] = nth.get(family(r["policy"]), -1) + 1
        ax.plot([int(x) for x in layers], [r["unique_per_layer"][x] for x in layers], marker=marker, color=colour,
                ls=LINESTYLES[i % len(LINESTYLES)], label=r["policy"], lw=2 if r["policy"] == "native" else 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mean distinct experts (U)")
    ax.set_title(f"U per layer at decode batch {batch}")
    _legend(ax, fig)
    return _save(fig, path)


def uniform_expectation(num_experts: int, top_k: int, batch: int) -> float:
    """E[U] when every token picks K of E experts uniformly at random: E·(1 − (1 − K/E)^B)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def quality_table(rows: list[dict], latency: dict[int, dict[str, float]] | None = None,
                  noise: dict[int, float] | None = None) -> str:
    """Markdown table of the eval rows (latency ratio column when a bench result is given; `noise` in
    that column at the batch sizes of `noise`, whose timings were noise)."""
    noise = noise or {}
    head = ("| policy | batch | U / layer | experts / token | CE | Δ CE [95% CI] | significant loss | worse by se rule "
            "| top-1 agree | KL |")
    sep = "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: |"
    if latency or noise:
        head += " latency / native |"
        sep += " ---: |"
    lines = [head, sep]
    for r in rows:
        lo, hi = r["delta_ce_ci"]
        line = (f"| {md_code(r['policy'])} | {r['batch_size']} | {r['mean_unique']:.1f} | {r['experts_per_token']:.2f} | "
                f"{r['cross_entropy']:.4f} | {r['delta_ce']:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
                f"{'yes' if r['significant_loss'] else 'no'} | {'yes' if r['worse_by_se_rule'] else 'no'} | "
                f"{r['top1_agreement']:.3f} | {r['kl_native_policy']:.4f} |")
        if latency or noise:
            ratio = (latency or {}).get(r["batch_size"], {}).get(r["policy"])
            line += " noise |" if r["batch_size"] in noise else f" {ratio:.2f} |" if ratio is not None else " |"
        lines.append(line)
    return "\n".join(lines)


def write(
    out: Path,
    evaluation: dict,
    command: str,
    bench: dict | None = None,
    generation: list[dict] | None = None,
    batch: int | None = None,
    u_by_batch: dict[str, dict[int, float]] | None = None,
    serve: dict | None = None,
    more: dict[str, dict] | None = None,
    summary: str | None = None,
    phases: dict[str, float] | None = None,
) -> Path:
    """Write report.md, the PNG plots and results.json into `out`; returns the Markdown path.

    u_by_batch: U against batch size from elsewhere (e.g. replayed on a trace); default: the eval rows.
    serve: `moe-reroute serve-bench` results (results.json), for a section on end-to-end engine speed.
    more: further evaluations of the same model, {title: {"evaluation": ..., "bench": ... or None}} (the
      demo's mixed batches), each with its own quality table and latency section; the plots are of
      `evaluation`'s rows.
    summary: Markdown the command printed (its table), put first.
    phases: seconds per phase of the command that made the results.
    `write(out, **json.load(results.json))`-style rebuilding: see `rebuild`.
    """
    out = Path(out)
    rows = evaluation["rows"]
    cond = evaluation["conditions"]
    b = pick_batch_size(rows, batch)
    _plt()  # matplotlib missing: say so before anything is written
    out.mkdir(parents=True, exist_ok=True)
    latency_at = latency_ratios(bench)
    E, K = cond["num_experts"], cond["top_k"]
    replayed = u_by_batch is not None
    if u_by_batch is None:
        u_by_batch = {}
        for r in rows:
            u_by_batch.setdefault(r["policy"], {})[r["batch_size"]] = r["mean_unique"]
    sizes = sorted({b for by_b in u_by_batch.values() for b in by_b})
    uniform = {s: uniform_expectation(E, K, s) for s in sizes}
    u_title = "replayed on the model's native routing trace" if replayed else "measured in the evaluation"
    plots = {
        "pareto_u.png": plot_pareto(rows, b, out / "pareto_u.png"),
        "u_vs_batch.png": plot_u_vs_batch(u_by_batch, out / "u_vs_batch.png", uniform, u_title),
        "u_per_layer.png": plot_u_per_layer(rows, b, out / "u_per_layer.png"),
    }
    if len(latency_at.get(b, {})) >= 2:  # measured, not noise, and more than native alone
        plots["pareto_latency.png"] = plot_pareto(rows, b, out / "pareto_latency.png", latency_at[b])
    if serve:
        from .serve_bench import plot as serve_plot

        name = "engine_serve.png" if serve["mode"] == "serve" else "engine_tpot.png"
        if serve_plot(serve, out / name):
            plots[name] = out / name
    (out / "results.json").write_text(json.dumps(
        {"command": command, "evaluation": evaluation, "bench": bench, "generation": generation,
         "u_by_batch": u_by_batch if replayed else None, "serve_bench": serve, "more": more, "summary": summary,
         "phases": phases, "batch": b}, indent=1) + "\n")

    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", command)), default=0))
    md = [f"# moe-reroute report: {md_text(cond['model'])}", "", fence, command, fence, ""]
    if summary:
        md += ["## Summary (as printed by the command)", "", summary, ""]
    if phases:
        md += ["Elapsed: " + ", ".join(f"{md_text(k)} {v:.0f} s" for k, v in phases.items()) + "", ""]
    md += ["## Conditions", ""]
    for k, v in cond.items():
        md.append(f"- {md_text(k)}: {md_text(v)}")
    md += ["", f"Uniform routing would activate E·(1−(1−K/E)^B) = {uniform_expectation(E, K, b):.1f} experts at batch {b}.",
           "", "## Quality and cost", "",
           "Δ CE is the policy's mean held-out cross-entropy minus native's on the same sequences (nats); the "
           f"interval is a paired bootstrap over sequences ({cond['bootstrap_resamples']} resamples). "
           "'significant loss' means the whole interval is above zero; 'worse by se rule' is the OEA paper's rule "
           "(policy mean − se > native mean + se, on per-sequence cross-entropy).", "",
           quality_table(rows, latency_at or None, latency_noise(bench)), ""]
    for title, extra in (more or {}).items():
        ev, eb = extra["evaluation"], extra.get("bench")
        md += [f"## Quality and cost: {md_text(title)}", ""]
        differ = {k: v for k, v in ev["conditions"].items() if cond.get(k) != v}
        md += [f"- {md_text(k)}: {md_text(v)}" for k, v in differ.items()] + ([""] if differ else [])
        md += [quality_table(ev["rows"], latency_ratios(eb) or None, latency_noise(eb)), ""]
        if eb:
            md += [f"### MoE-layer latency: {md_text(title)}", "", _bench_section(eb), ""]
    md += [f"## U against batch size ({u_title})", "",
           "| policy | " + " | ".join(f"B={s}" for s in sizes) + " |", "| --- |" + " ---: |" * len(sizes)]
    md += [f"| {md_code(label)} | " + " | ".join(f"{by_b[s]:.1f}" if s in by_b else "" for s in sizes) + " |"
           for label, by_b in u_by_batch.items()]
    md += ["| uniform routing | " + " | ".join(f"{uniform[s]:.1f}" for s in sizes) + " |", ""]
    if bench:
        md += ["## MoE-layer latency", "", _bench_section(bench), ""]
    if serve:
        from .serve_bench import markdown_section

        mode = "serving: vLLM's OpenAI server under load" if serve["mode"] == "serve" else "offline batches"
        md += [f"## End-to-end engine speed (vLLM, {mode})", "", markdown_section(serve), ""]
    if generation:
        md += ["## Greedy generation against native", "",
               "| policy | batch | differing tokens | identical sequences | first divergence (median step) |",
               "| --- | ---: | ---: | ---: | ---: |"]
        for g in generation:
            steps = sorted(s for s in g["first_divergence_step"] if s is not None)
            med = steps[len(steps) // 2] if steps else "none"
            md.append(f"| {md_code(g['policy'])} | {g['batch_size']} | {g['differing_tokens']}/{g['generated_tokens']} | "
                      f"{g['identical_sequences']}/{g['batch_size']} | {med} |")
        md.append("")
    md += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _bench_section(bench: dict) -> str:
    shape = bench["shape"]
    lines = [f"- shape: {shape['name']} (H={shape['hidden']}, I={shape['intermediate']}, E={shape['num_experts']}, "
             f"K={shape['top_k']}), {shape['bytes_per_expert'] / 1e6:.1f} MB per expert",
             f"- routing: {bench['routing']}",
             f"- peak read bandwidth: {bench['bandwidth']['gbps']:.1f} GB/s ({bench['bandwidth']['method']})"]
    for B, res in bench.get("results", {}).items():
        spread = res.get("spread")
        lines += [f"- batch {B}: {res['dtype']} on {res['device']}, kernel {res['kernel']} ({res['kernel_note']}); "
                  f"{res['cache']}" + (f"; {res['aliasing']}" if res.get("aliasing") else "")]
        if spread is not None:
            told = "unknown: fewer than 3 repeats" if spread != spread else f"{100 * spread:.0f}%"
            lines.append(f"- spread of the same call between repeats (IQR / median): {told}"
                         + ("; **the ratios are noise, not results** (other work on the machine?): rerun on an idle "
                            "machine or with more repeats" if res.get("noisy") else ""))
        lines += ["",
                  "| policy | U | median ms | IQR ms | GB/s | latency / native |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, t in res["policies"].items():
            ratio = t.get("ratio_vs_native")
            ratio = "" if ratio is None else "noise" if res.get("noisy") else f"{ratio:.3f}"
            lines.append(f"| {md_code(name)} | {t['mean_unique']:.1f} | {t['median_ms']:.3f} | {t['iqr_ms']:.3f} | "
                         f"{t['achieved_gbps']:.1f} | {ratio} |")
        lines.append("")
    fit = bench.get("cost_model")
    if fit:
        lines.append("Cost model fitted on these measurements: latency = b·U + a·(T·K) + c with "
                     + ", ".join(f"{k} = {fit[k]:.4g}" for k in ("b", "a", "c", "r2") if isinstance(fit.get(k), float)))
        negative = [k for k in ("b", "a", "c") if isinstance(fit.get(k), float) and fit[k] < 0
                    and k not in fit.get("unidentified", [])]
        if negative:
            lines.append(f"\n**Not physical**: negative {', '.join(negative)}; the timings are noise or too few to "
                         "separate the terms: do not use its predictions.")
    return "\n".join(lines)


def rebuild(results: dict, out: Path, batch: int | None = None) -> Path:
    """A report from the results.json that `write` (the demo, or `moe-reroute report`) wrote."""
    return write(Path(out), results["evaluation"], str(results.get("command", "")), bench=results.get("bench"),
                 generation=results.get("generation"), batch=batch or results.get("batch"),
                 u_by_batch=results.get("u_by_batch") and {k: {int(B): u for B, u in v.items()}
                                                           for k, v in results["u_by_batch"].items()},
                 serve=results.get("serve_bench"), more=results.get("more"), summary=results.get("summary"),
                 phases=results.get("phases"))
