"""Measure the reference model for its model card: held-out cross-entropy next to unigram and bigram
baselines, routing statistics at decode batch 16, per-layer expert load, checksums."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from .corpus import sha256  # card.sha256: a shipped file's checksum

BATCH = 16


def heldout_ids(tokenizer, text: str) -> torch.Tensor:
    """[tokens] plain text encoded paragraph by paragraph, as the training split was."""
    ids = []
    for chunk in text.split("\n\n"):
        ids.extend(tokenizer(chunk + "\n\n")["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def domain_streams(tokenizer, docs) -> dict[str, torch.Tensor]:
    """{domain: [tokens]}: each domain's documents encoded as in training (end-of-text after each)."""
    from .train import document_ids

    streams: dict[str, list[int]] = {}
    for d in docs:
        streams.setdefault(d.domain, []).extend(document_ids(tokenizer, d.text))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in streams.items()}


def checksums(folder) -> dict[str, str]:
    """sha256 of every file of a model folder (subfolders too) but the card's own two."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): sha256(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name not in ("card.json", "MODEL_CARD.md")}


def by_domain(tokenizer, docs) -> dict:
    """Per domain of `docs`: documents, characters and tokens (as in training)."""
    streams = domain_streams(tokenizer, docs)
    return {dom: {"documents": sum(d.domain == dom for d in docs),
                  "chars": sum(len(d.text) for d in docs if d.domain == dom),
                  "tokens": len(ids)} for dom, ids in streams.items()}


def parts_summary(tokenizer, folder) -> dict:
    """The held-out split's tuning and validation parts for the card: `by_domain` of each."""
    from . import heldout_documents

    return {part: {"by_domain": by_domain(tokenizer, heldout_documents(folder, part))}
            for part in ("tuning", "validation")}


def calibration_summary(tokenizer, docs) -> dict:
    """The calibration sample's size for the card: documents, characters and tokens (as in training) per
    domain, and the `corpus.calibration_sample` limits it was drawn with."""
    from .corpus import CALIBRATION_CHARS, CALIBRATION_DOC_CHARS

    return {"by_domain": by_domain(tokenizer, docs), "max_chars_per_domain": CALIBRATION_CHARS,
            "max_chars_per_document": CALIBRATION_DOC_CHARS}


@torch.no_grad()
def cross_entropy(model, ids: torch.Tensor, seq_len: int = 256, max_tokens: int | None = None) -> float:
    """Mean next-token cross-entropy (nats) over consecutive windows of `seq_len` tokens."""
    n = (len(ids) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    x = ids[: n * seq_len + 1]
    inputs = x[:-1].view(n, seq_len)
    targets = x[1:].view(n, seq_len)
    total = 0.0
    for i in range(0, n, 8):
        logits = model(input_ids=inputs[i : i + 8]).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[i : i + 8].reshape(-1), reduction="sum"
        ).item()
    return total / (n * seq_len)


class NgramBaselines:
    """Unigram (add-one) and Witten-Bell interpolated bigram models fitted on the training tokens."""

    def __init__(self, train: torch.Tensor, vocab: int):
        uni = torch.bincount(train, minlength=vocab).double() + 1
        self.p_uni = uni / uni.sum()  # [V]
        self.pairs = Counter(zip(train[:-1].tolist(), train[1:].tolist()))
        self.count = torch.bincount(train[:-1], minlength=vocab).double()  # [V]
        self.types = torch.zeros(vocab, dtype=torch.float64)  # [V] distinct successors of each token
        for (a, _b) in self.pairs:
            self.types[a] += 1

    def cross_entropy(self, held: torch.Tensor) -> dict[str, float]:
        """{"unigram", "bigram"}: mean cross-entropy (nats) of the held-out tokens."""
        ce_uni = -self.p_uni[held].log().mean().item()
        total = 0.0
        for a, b in zip(held[:-1].tolist(), held[1:].tolist()):
            c, t = self.count[a].item(), self.types[a].item()
            lam = c / (c + t) if c > 0 else 0.0
            p = (lam * self.pairs.get((a, b), 0) / c if c > 0 else 0.0) + (1 - lam) * self.p_uni[b].item()
            total -= math.log(p)
        return {"unigram": ce_uni, "bigram": total / (len(held) - 1)}


def ngram_baselines(train: torch.Tensor, held: torch.Tensor, vocab: int) -> dict[str, float]:
    """Unigram (add-one) and Witten-Bell interpolated bigram cross-entropy (nats) on the held-out tokens."""
    return NgramBaselines(train, vocab).cross_entropy(held)


def trace_sequences(streams: dict[str, torch.Tensor], rows: int, steps: int, batching: str) -> list[torch.Tensor]:
    """[rows, steps] held-out sequences to record a trace from: one tensor per domain ("same-domain") or
    one whose rows cycle through the domains ("mixed"); windows of `steps` tokens from each stream's start."""
    domains = list(streams)
    if batching == "same-domain":
        return [streams[d][: rows * steps].view(rows, steps) for d in domains]
    if batching != "mixed":
        raise ValueError(f"batching must be 'same-domain' or 'mixed', got {batching!r}")
    D = len(domains)
    return [torch.stack([streams[domains[r % D]][(r // D) * steps :][:steps] for r in range(rows)])]


def uniform_u(E: int, K: int, B: int) -> float:
    """Expected distinct experts of B tokens each routed to K of E experts uniformly at random."""
    return E * (1 - (1 - K / E) ** B)


@torch.no_grad()
def _pass(model, seqs: torch.Tensor, keep: str):
    """Router records of one forward of [B, L] sequences: {layer: LayerRecord}."""
    from ..hf import Recorder

    with Recorder(model, keep=keep) as rec:
        model(input_ids=seqs)
    return rec.steps[0].layers


@torch.no_grad()
def routing_stats(model, streams: dict[str, torch.Tensor], seq_len: int = 128) -> dict:
    """Decode-batch statistics at B=16 on the held-out split: each position's 16 tokens one batch.

    Every domain gives the same number of sequences of `seq_len` tokens (as many as its smallest held-out
    stream allows). Same-domain batches: 16 sequences of one domain; mixed batches: the domains in turn.
    Expert load and router-mass shares are over all these tokens (the whole held-out mixture).
    """
    from ..contract import RouterSpec
    from ..measure.evaluate import batch_order, domain_sequences

    spec = RouterSpec.from_config(model.config)
    E, K = spec.num_experts, spec.top_k
    D = len(streams)
    per = min(len(ids) // seq_len for ids in streams.values()) // BATCH * BATCH
    seqs, labels = domain_sequences(streams, seq_len, per * D)  # [D*per, L]
    u_domain: dict[str, dict[int, list[float]]] = {d: {} for d in streams}
    load: dict[int, torch.Tensor] = {}
    share: dict[int, torch.Tensor] = {}
    order = batch_order(labels, BATCH, "same-domain")
    for g in range(0, len(order), BATCH):
        idx = order[g : g + BATCH]
        domain = labels[int(idx[0])]
        for layer, r in _pass(model, seqs[idx], "logits").items():
            u_domain[domain].setdefault(layer, []).append(float(r.native_unique.double().mean()))
            counts = torch.bincount(r.native_ids.flatten(), minlength=E)  # [E]
            load[layer] = load.get(layer, torch.zeros(E, dtype=torch.long)) + counts
            probs = torch.softmax(r.logits.double(), -1).sort(-1, descending=True).values.cumsum(-1)  # [N, E]
            share[layer] = share.get(layer, torch.zeros(3, dtype=torch.float64)) + probs[:, [0, 2, K - 1]].sum(0)
    u_mixed: dict[int, list[float]] = {}
    order = batch_order(labels, BATCH, "mixed")
    for g in range(0, len(order), BATCH):
        for layer, r in _pass(model, seqs[order[g : g + BATCH]], "counts").items():
            u_mixed.setdefault(layer, []).append(float(r.native_unique.double().mean()))
    layers = sorted(load)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    same = {d: {str(layer): round(mean(u[layer]), 2) for layer in layers} for d, u in u_domain.items()}
    same_mean = {str(layer): round(mean([mean(u_domain[d][layer]) for d in streams]), 2) for layer in layers}
    uniform = uniform_u(E, K, BATCH)
    per_layer_load = {}
    for layer in layers:
        ratio = load[layer].double() / (load[layer].sum().double() / E)
        per_layer_load[str(layer)] = {"min_x_uniform": round(ratio.min().item(), 3),
                                      "max_x_uniform": round(ratio.max().item(), 3)}
    tokens = len(labels) * seq_len
    return {
        "batch": BATCH,
        "seq_len": seq_len,
        "sequences_per_domain": per,
        "tokens": tokens,
        "uniform_expectation": round(uniform, 2),
        "same_domain_mean_u": same_mean,
        "same_domain_mean_u_by_domain": same,
        "mixed_mean_u": {str(layer): round(mean(u_mixed[layer]), 2) for layer in layers},
        "mass_share_top1_top3_topK": {str(layer): [round(x, 4) for x in (share[layer] / tokens).tolist()]
                                      for layer in layers},
        "per_layer_load": per_layer_load,
    }


TARGET_U = (0.50, 0.75)  # same-domain mean U per layer, x uniform (Qwen3-30B-A3B: 48.8 / 82.42 = 0.59x)
TARGET_LOAD = (0.25, 4.0)  # each expert's load over the held-out mixture, x uniform, every layer


def targets(result: dict) -> dict:
    """Whether the card's routing targets are met, with the values reached."""
    r = result["routing"]
    uni = r["uniform_expectation"]
    ratios = [u / uni for u in r["same_domain_mean_u"].values()]
    loads = r["per_layer_load"].values()
    lo, hi = min(ld["min_x_uniform"] for ld in loads), max(ld["max_x_uniform"] for ld in loads)
    return {
        "same_domain_u_x_uniform": [round(min(ratios), 3), round(max(ratios), 3)],
        "same_domain_u_met": all(TARGET_U[0] <= x <= TARGET_U[1] for x in ratios),
        "load_x_uniform": [lo, hi],
        "load_met": lo >= TARGET_LOAD[0] and hi <= TARGET_LOAD[1],
    }


def _schedule_gap(cfg: dict, changes: list[dict]) -> float:
    """Largest relative difference of the cosine learning-rate factor between the run as made (train_tokens
    changed at resumes) and a run with the final train_tokens throughout."""
    def factor(step: int, tokens: int) -> float:
        steps = math.ceil(tokens / (cfg["seq_len"] * cfg["batch_size"]))
        return 0.5 * (1 + math.cos(math.pi * step / steps))

    gap, last = 0.0, 0
    for ch in changes:
        if "train_tokens" in ch:
            before = ch["train_tokens"][0]
            gap = max([gap] + [abs(factor(s, before) - factor(s, cfg["train_tokens"])) / factor(s, cfg["train_tokens"])
                               for s in range(last, ch["step"])])
            last = ch["step"]
    return gap


def reproduce(cfg: dict, changes: list[dict]) -> list[str]:
    """The `moe-reroute train-reference` commands that make this run, resumes and changes included."""
    keys = {"train_tokens": "--tokens", "balance_coef": "--balance-coef", "revive_below": "--revive-below"}
    values = {k: cfg.get(k, 0.0) for k in keys}
    for ch in reversed(changes):  # the values in force before each change
        for k in keys:
            if k in ch:
                values[k] = ch[k][0]
    cmds = []
    for ch in changes:
        cmds.append(" ".join(f"{flag} {values[k]}" for k, flag in keys.items()) + f" --stop-after {ch['step']}")
        for k in keys:
            if k in ch:
                values[k] = ch[k][1]
    cmds.append(" ".join(f"{flag} {values[k]}" for k, flag in keys.items()))
    return [f"moe-reroute train-reference {c}" for c in cmds]


def render(result: dict, training: dict) -> str:
    """The model card as Markdown, from `moe-reroute reference-card`'s measurements and training.json."""
    cfg, corpus = training["config"], training["corpus"]
    r = result["routing"]
    uni = r["uniform_expectation"]
    t = targets(result)
    train_tokens = result.get("train_split_tokens_by_domain", {})
    ce = result["heldout_ce_by_domain"]
    z = f", router z-loss x{cfg['z_loss_coef']}" if cfg.get("z_loss_coef") else ", no router z-loss"
    lines = [
        "# moe-reroute reference model",
        "",
        "A small Qwen3-MoE language model trained from scratch by `moe-reroute train-reference`, shipped so that",
        "everything runs offline. Its router copies Qwen3-30B-A3B's geometry: 128 routed experts, top-8,",
        "softmax with renormalised top-k weights. Weights are stored in bfloat16; `moe_reroute.reference.load()`",
        "returns the model in float32 on CPU. This is the second reference model: trained on seven domains",
        "with global-batch load balancing, so that its experts specialise by domain as a large model's do.",
        "",
        "Numbers below: `moe-reroute reference-card` (CPU, float32, decode batch 16), which writes `card.json`",
        "beside this file.",
        "",
        "## Model",
        "",
        f"- {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_heads']} heads ({cfg['num_kv_heads']} KV),"
        f" {cfg['num_experts']} experts of intermediate size {cfg['moe_intermediate_size']}, top-{cfg['top_k']},"
        f" vocabulary {cfg['vocab_size']} (byte-level BPE trained on the training split of all seven domains), tied embeddings.",
        f"- Parameters: {result['parameters']:,}.",
        f"- Training: {cfg['train_tokens']:,} tokens (windows of {cfg['seq_len']}, batch {cfg['batch_size']}, each"
        f" batch's rows cycling through the domains), AdamW lr {cfg['lr']} cosine, seed {cfg['seed']};"
        f" global-batch load balancing x{cfg['balance_coef']} per layer, expert frequencies over the last"
        f" {cfg['balance_window']} steps ({cfg['balance_window'] * cfg['batch_size'] * cfg['seq_len']:,} tokens){z},"
        f" idle experts revived below {cfg.get('revive_below', 0.0)}x of uniform load;"
        f" {training.get('wall_minutes', '?')} minutes on {training.get('hardware', '?')}.",
        f"- Reproduce (seed {cfg['seed']}): "
        + ", then ".join(f"`{c}`" for c in reproduce(cfg, training.get("schedule_changes", [])))
        + "; then `moe-reroute reference-card`.",
    ]
    changes = training.get("schedule_changes", [])
    if changes:
        said = "; ".join(f"at step {ch['step']}, " + ", ".join(f"{k} {v[0]:,} -> {v[1]:,}" for k, v in ch.items()
                                                              if k != "step") for ch in changes)
        why = []
        if any("train_tokens" in ch for ch in changes):
            why.append("train_tokens shortened so that the run finishes in the time available on the training"
                       f" machine (learning rates before a change within {_schedule_gap(cfg, changes):.1%} of a run"
                       " with the final length throughout)")
        if any("balance_coef" in ch for ch in changes):
            why.append("the balance coefficient raised when the checkpoint of that step routed no token at all to"
                       " some experts of every layer (on 4,096 held-out tokens per domain)")
        if any("revive_below" in ch for ch in changes):
            why.append("revival of idle experts switched on when, with the balance loss alone, every layer still"
                       " had experts under 0.25x of uniform load over the balance window at each checkpoint")
        lines.append(f"- The run was resumed with changes ({said}): " + "; ".join(why) + ".")
    revived = training.get("revived", [])
    if revived:
        per_layer: dict[str, int] = {}
        for ev in revived:
            for layer, pairs in ev["experts_reset"].items():
                per_layer[str(layer)] = per_layer.get(str(layer), 0) + len(pairs)
        lines.append(f"- Idle experts (under {cfg['revive_below']}x of uniform load since the previous checkpoint)"
                     " were split from the busiest ones (router row with a little noise, expert weights) at steps "
                     + ", ".join(str(ev["step"]) for ev in revived) + "; experts split per layer: "
                     + ", ".join(f"layer {k} {v}" for k, v in sorted(per_layer.items())) + ".")
    lines += [
        "",
        "## Data",
        "",
        "Every source is a package pinned by name, version and sha256 (`moe_reroute/reference/corpus.py`);"
        " the held-out split is whole documents of each domain, never seen in training.",
        "",
        "| domain | source | licence | train documents | train tokens | held-out documents | held-out tokens |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    cal = result.get("calibration")
    if cal:
        lines[-2] += " calibration documents | calibration tokens |"
        lines[-1] += " ---: | ---: |"
    for d, info in corpus["domains"].items():
        src = corpus["sources"][d]
        row = (f"| {d} | {src['from']} | {src['licence']} | {info['train_documents']} |"
               f" {train_tokens.get(d, 0):,} | {info['heldout_documents']} | {ce[d]['tokens']:,} |")
        if cal:
            c = cal["by_domain"].get(d, {"documents": 0, "tokens": 0})
            row += f" {c['documents']} | {c['tokens']:,} |"
        lines.append(row)
    total_train = result["train_split_tokens"]
    lines += [
        "",
        f"Training split: {total_train:,} tokens ({corpus['train_chars']:,} characters); training saw"
        f" {cfg['train_tokens']:,} ({cfg['train_tokens'] / total_train:.1f} passes). Held-out split:"
        f" {sum(v['tokens'] for v in ce.values()):,} tokens ({corpus['heldout_chars']:,} characters), in"
        " `heldout.jsonl` (one document per line with its domain) and, as plain text, `heldout.txt`.",
    ]
    parts = result.get("heldout_parts")
    if parts:
        tun, val = (parts[k]["by_domain"].values() for k in ("tuning", "validation"))
        per = "; ".join(f"{d} {parts['tuning']['by_domain'][d]['documents']} / "
                        f"{parts['validation']['by_domain'][d]['documents']}" for d in parts["tuning"]["by_domain"])
        lines.append(
            f"- The held-out split in two disjoint parts (`corpus.heldout_parts`), by document within each domain:"
            f" tuning, {sum(c['tokens'] for c in tun):,} tokens in `tuning.jsonl`, to tune and calibrate on; validation,"
            f" {sum(c['tokens'] for c in val):,} tokens in `validation.jsonl`, what `eval`, `demo` and `tune`'s check"
            " evaluate on by default. Per domain a stable pseudo-random order of its documents gives about a third"
            " of its characters to tuning; a domain with one held-out document (shakespeare) has it cut at the"
            " paragraph end nearest two thirds, the head (`NAME#head`) validation text, the tail (`NAME#tail`)"
            f" tuning text. Documents tuning / validation: {per}. The model saw neither part in training.")
    if cal:
        by = cal["by_domain"].values()
        lines.append(
            f"- Calibration sample: {sum(c['tokens'] for c in by):,} tokens ({sum(c['chars'] for c in by):,}"
            f" characters) of the training split, in `calibration.jsonl` (same format as `heldout.jsonl`): per"
            " domain, training documents in a stable pseudo-random order, the first"
            f" {cal['max_chars_per_document']:,} characters of each at most (cut at a paragraph end), up to"
            f" {cal['max_chars_per_domain']:,} characters per domain (`corpus.calibration_sample`). Text the model was"
            " trained on: never evaluate on it. `tune` calibrates on `tuning.jsonl` by default, not on this sample:"
            " re-routing may cost the model less on text it was trained on, and a budget met here need not hold on"
            " unseen text.")
    lines += [
        "- SERE's expert similarity (`sere/similarity.safetensors`, linear CKA per layer) was calibrated on 2,048"
        " tokens of the training split (16 evenly spaced windows across the domains), never on held-out text.",
        "",
        "## Quality (held-out cross-entropy, nats per token)",
        "",
        "Baselines fitted on the whole training split: unigram (add-one) and Witten-Bell interpolated bigram.",
        "",
        "| domain | tokens | this model | bigram | unigram |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for d, v in ce.items():
        lines.append(f"| {d} | {v['tokens']:,} | {v['ce']} | {v['bigram']} | {v['unigram']} |")
    base = result["baselines"]
    lines += [
        f"| all | {sum(v['tokens'] for v in ce.values()):,} | {result['heldout_ce']} | {base['bigram']} | {base['unigram']} |",
        "",
        f"## Routing at decode batch {r['batch']}",
        "",
        f"Held-out text, {r['sequences_per_domain']} sequences of {r['seq_len']} tokens per domain; at each position"
        f" the {r['batch']} tokens of {r['batch']} sequences are one decode batch. Same-domain: the {r['batch']}"
        " sequences come from one domain (mean over the domains, each weighted equally); mixed: the batch"
        f" cycles through the domains. Mean unique experts U per layer against {uni} under uniform routing"
        f" (E*(1-(1-K/E)^{r['batch']})); Qwen3-30B-A3B measures 48.8 (0.59x). Load: each expert's share of all"
        " top-8 slots over the whole held-out mixture, as a multiple of uniform. Mass: share of router"
        " probability in each token's top-1 / top-3 / top-8 experts.",
        "",
        "| layer | U same-domain | U mixed | load min (x uniform) | load max (x uniform) | mass top-1 / top-3 / top-8 |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for layer, u in r["same_domain_mean_u"].items():
        ld = r["per_layer_load"][layer]
        m = r["mixed_mean_u"][layer]
        s1, s3, s8 = r["mass_share_top1_top3_topK"][layer]
        lines.append(f"| {layer} | {u} ({u / uni:.2f}x) | {m} ({m / uni:.2f}x) | {ld['min_x_uniform']} |"
                     f" {ld['max_x_uniform']} | {s1} / {s3} / {s8} |")
    layers = list(r["same_domain_mean_u"])
    lines += [
        "",
        "Same-domain U by domain:",
        "",
        "| domain | " + " | ".join(f"layer {x}" for x in layers) + " |",
        "| --- | " + " | ".join("---:" for _ in layers) + " |",
    ]
    for d, us in r["same_domain_mean_u_by_domain"].items():
        lines.append(f"| {d} | " + " | ".join(str(us[x]) for x in layers) + " |")
    lo_u, hi_u = t["same_domain_u_x_uniform"]
    lo_l, hi_l = t["load_x_uniform"]
    lines += [
        "",
        "## Targets",
        "",
        f"- Same-domain mean U per layer between {TARGET_U[0]:.2f}x and {TARGET_U[1]:.2f}x of uniform:"
        f" {'met' if t['same_domain_u_met'] else 'not met'} (layers reach {lo_u:.2f}x to {hi_u:.2f}x).",
        f"- Each expert's load over the held-out mixture within {TARGET_LOAD[0]}x-{TARGET_LOAD[1]}x of uniform in"
        f" every layer: {'met' if t['load_met'] else 'not met'} (range {lo_l}x to {hi_l}x).",
        "- The first reference model (Shakespeare, Milton and the KJV only; load balanced per micro-batch;"
        " 10M tokens) measured mean U 76.8-79.7 per layer at batch 16 on consecutive held-out sequences"
        " (0.93x-0.97x of uniform), with 34% of router mass in each token's top-8: a narrow"
        " corpus and per-batch balancing leave nothing to specialise on. This model changes both.",
        "",
        "## Limits",
        "",
        "A test bed, not a forecast for production models: it is small ("
        f"{cfg['num_layers']} layers, {result['parameters'] / 1e6:.1f}M parameters) and trained briefly on a CPU, so its routing is flatter than a large model's (compare the router mass outside each"
        " token's top-8). Policies' quality costs and U reductions on it show how the methods behave on learned,"
        " domain-specialised routing; measure your own model with `moe-reroute eval --model PATH`.",
        "",
    ]
    return "\n".join(lines)
