"""Quality of a policy against native routing on held-out text, at the decode batch sizes a server sees.

How a decode batch is formed: the text is cut into N sequences of L tokens. For batch size B, the
sequences go B at a time through one teacher-forced forward [B, L] with the policy applied in
`phase="decode-sim"`: at every position, each MoE layer routes the B tokens at that position together,
exactly the B tokens a server's decode step would hold (B different sequences, one step each). The
native forward of the same [B, L] batch is the reference, so every comparison is paired by sequence.

Text with domain labels (the reference model's held-out split) can be batched two ways: "same-domain"
(each decode batch holds B sequences of one domain, as a server serving one kind of traffic) or "mixed"
(each batch cycles through the domains). Plain text is cut into consecutive windows ("stream").

B = batch size, L = tokens per sequence, V = vocabulary, N = sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import RouterSpec, Routing
from ..metrics import experts_per_token
from ..policies import Policy, make_policy
from ..progress import progress as progress_bar
from .stats import mean_se, paired_bootstrap, worse_by_se_rule

DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32, 64)
BATCHINGS = ("stream", "same-domain", "mixed")
SIMILARITY_FILE = "sere/similarity.safetensors"  # in a subfolder: vLLM loads every *.safetensors beside the weights


@dataclass(frozen=True)
class EvalConfig:
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    seq_len: int = 128
    num_sequences: int = 64
    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (one prediction needs two tokens), got {self.seq_len}")
        if self.num_sequences < 2:
            raise ValueError(f"num_sequences must be >= 2 for paired statistics, got {self.num_sequences}")


def build_policy(name: str, params: dict, model: nn.Module | None = None) -> Policy:
    """make_policy with model-aware parameters: SERE's `similarity` may be a file path, and without one
    the model folder's `sere/similarity.safetensors` (e.g. written by `moe-reroute calibrate --out`) is used."""
    params = dict(params)
    if name == "sere":
        from ..similarity import load_similarity

        E = RouterSpec.from_config(model.config).num_experts if model is not None else None
        sim = params.get("similarity")
        if sim is None:
            sim = model_similarity_file(model)
        if isinstance(sim, (str, Path)):
            params["similarity"] = load_similarity(sim, num_experts=E)
    return make_policy(name, **params)


def model_similarity_file(model: nn.Module | None) -> Path:
    """The model folder's SERE similarity file (`sere/similarity.safetensors`, as `moe-reroute calibrate
    --out` writes it), for a `sere` given none; ValueError saying how to make one when there is none."""
    folder = Path(getattr(model, "name_or_path", "") or ".") if model is not None else None
    if folder is None or not (folder / SIMILARITY_FILE).exists():
        raise ValueError("sere needs expert similarity: run `moe-reroute calibrate --model PATH --text FILE --out "
                         "sim.safetensors` and pass `sere:similarity=sim.safetensors`")
    return folder / SIMILARITY_FILE


def make_sequences(ids: torch.Tensor, seq_len: int, num_sequences: int) -> torch.Tensor:
    """[N, L]: consecutive, non-overlapping windows of the token stream (the first N that fit)."""
    available = ids.numel() // seq_len
    if available < 2:
        raise ValueError(
            f"the text gives {ids.numel()} tokens, fewer than 2 sequences of {seq_len}; give more text or "
            "a smaller --seq-len"
        )
    n = min(num_sequences, available)
    return ids[: n * seq_len].view(n, seq_len)


def domain_sequences(streams: dict[str, torch.Tensor], seq_len: int,
                     num_sequences: int) -> tuple[torch.Tensor, list[str]]:
    """([N, L] sequences, [N] domain labels): N = num_sequences consecutive windows, split as equally as
    possible among the domains (the first num_sequences % D domains give one more).

    Args:
      streams: {domain: [tokens]} held-out token stream of each domain.
    """
    D = len(streams)
    if num_sequences < D:
        raise ValueError(f"{num_sequences} sequences cannot cover {D} domains; give --sequences {D} or more")
    seqs, labels = [], []
    for i, (domain, ids) in enumerate(streams.items()):
        per = num_sequences // D + (i < num_sequences % D)
        if ids.numel() // seq_len < per:
            raise ValueError(f"domain {domain} gives {ids.numel()} tokens, fewer than {per} sequences of {seq_len}; "
                             "use fewer --sequences or a smaller --seq-len")
        seqs.append(ids[: per * seq_len].view(per, seq_len))
        labels += [domain] * per
    return torch.cat(seqs), labels


def batch_order(labels: list[str], B: int, batching: str) -> torch.Tensor:
    """Indices of the sequences in the order they are batched, B consecutive indices one decode batch.

    Algorithm:
      1. stream: 0..N-1 (consecutive windows together), cut to a multiple of B.
      2. same-domain: each domain's sequences in groups of B (a domain's leftover fewer than B is dropped);
         the groups of the domains taken in turn.
      3. mixed: the domains' sequences taken in turn, one at a time, cut to a multiple of B.
    """
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}")
    N = len(labels)
    if batching == "stream":
        return torch.arange(N // B * B)
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(labels):
        by_domain.setdefault(d, []).append(i)
    if batching == "same-domain":
        groups = {d: [ix[j : j + B] for j in range(0, len(ix) // B * B, B)] for d, ix in by_domain.items()}
        if not any(groups.values()):
            raise ValueError(f"same-domain batches of {B} need {B} sequences of one domain; the most any domain has "
                             f"is {max(len(v) for v in by_domain.values())}: give more --sequences "
                             f"({B * len(by_domain)} for every domain) or smaller batch sizes")
        order = [i for r in range(max(len(g) for g in groups.values())) for g in groups.values() if r < len(g)
                 for i in g[r]]
        return torch.tensor(order)
    order = [ix[r] for r in range(max(len(v) for v in by_domain.values())) for ix in by_domain.values() if r < len(ix)]
    return torch.tensor(order[: N // B * B])


def _check_batch_sizes(batch_sizes, n: int, seq_len: int) -> None:
    too_big = [b for b in batch_sizes if b > n]
    if too_big:
        raise ValueError(
            f"batch sizes {too_big} need more sequences than the {n} of {seq_len} tokens available; use "
            "smaller batch sizes, a smaller --seq-len, more --sequences or more text"
        )


class _Pass:
    """Per-token results of one policy over the sequences of one batch size."""

    def __init__(self, n: int, layers: list[int]) -> None:
        self.ce = torch.zeros(n, dtype=torch.float64)  # [N] mean CE of each sequence
        self.agree = torch.zeros(n, dtype=torch.float64)  # [N] top-1 agreement with native
        self.kl = torch.zeros(n, dtype=torch.float64)  # [N] mean KL(native || policy)
        self.u = {layer: [] for layer in layers}  # layer -> [S] U of each position, per batch
        self.kept: list[torch.Tensor] = []  # [N*L] experts per token, per layer


def _forward(model, batch: torch.Tensor, policy: Policy | None, keep: str):
    from ..hf import Recorder, apply

    with Recorder(model, keep=keep) as rec:
        if policy is None:
            logits = model(input_ids=batch).logits.float()
        else:
            with apply(model, policy, phase="decode-sim"):
                logits = model(input_ids=batch).logits.float()
    return logits, rec.steps[-1]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ids: torch.Tensor,
    policies: dict[str, Policy],
    config: EvalConfig = EvalConfig(),
    progress: bool = True,
    batching: str = "stream",
    desc: str = "evaluating",
) -> dict:
    """Compare every policy with native routing at every batch size.

    Args:
      ids: [tokens] held-out token stream, or {domain: [tokens]} with domain labels (the reference model's
        held-out split, `moe_reroute.reference.heldout_streams`).
      policies: {label: Policy}, e.g. {"oea:k0=3": make_policy("oea", k0=3)}.
      batching: "stream" for a token stream; "same-domain" or "mixed" for streams by domain.
      desc: what the progress lines say they count (the caller's phase).
    Returns: {"rows": [one dict per (policy, batch size)], "conditions": {...}}; each row holds
      cross-entropy and perplexity, the paired difference to native with its CI, the OEA paper's
      standard-error rule, top-1 agreement and KL to native, mean U per layer (policy and native;
      "unique_per_layer" is keyed by decoder-layer index) and mean experts kept per token.
    """
    if isinstance(ids, dict):
        if batching == "stream":
            raise ValueError("text with domain labels is batched 'same-domain' or 'mixed', not 'stream'")
        sequences, labels = domain_sequences(ids, config.seq_len, config.num_sequences)
    else:
        if batching != "stream":
            raise ValueError(f"batching {batching!r} needs text with domain labels; plain text is batched 'stream'")
        sequences = make_sequences(ids, config.seq_len, config.num_sequences)
        labels = ["text"] * sequences.shape[0]
    N, L = sequences.shape
    _check_batch_sizes(config.batch_sizes, N, L)
    orders = {B: batch_order(labels, B, batching) for B in config.batch_sizes}
    spec = RouterSpec.from_config(model.config)
    from ..hf.apply import moe_routers

    layers = [i for i, _ in moe_routers(model)]
    total = sum(len(orders[b]) // b * (1 + len(policies)) for b in config.batch_sizes)
    bar = progress_bar(total, progress, desc, unit="forward passes")
    rows = []
    for B in config.batch_sizes:
        ordered = sequences[orders[B]]  # [n, L], B consecutive sequences one decode batch
        n = ordered.shape[0]
        native = _Pass(n, layers)
        passes = {label: _Pass(n, layers) for label in policies}
        for g in range(0, n, B):
            batch = ordered[g : g + B]
            targets = batch[:, 1:]  # [B, L-1]
            ref_logits, ref_step = _forward(model, batch, None, "counts")
            bar.update(1)
            ref_logp = F.log_softmax(ref_logits[:, :-1], dim=-1)  # [B, L-1, V]
            ref_top1 = ref_logp.argmax(-1)
            native.ce[g : g + B] = -ref_logp.gather(-1, targets[..., None])[..., 0].double().mean(-1)
            native.agree[g : g + B] = 1.0
            for layer, rec in ref_step.layers.items():
                native.u[layer].append(rec.native_unique)
            for label, policy in policies.items():
                logits, step = _forward(model, batch, policy, "routing")
                bar.update(1)
                logp = F.log_softmax(logits[:, :-1], dim=-1)
                p = passes[label]
                p.ce[g : g + B] = -logp.gather(-1, targets[..., None])[..., 0].double().mean(-1)
                p.agree[g : g + B] = (logp.argmax(-1) == ref_top1).double().mean(-1)
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [B, L-1]
                p.kl[g : g + B] = kl.double().mean(-1)
                for layer, rec in step.layers.items():
                    p.u[layer].append(rec.unique)
                    p.kept.append(experts_per_token(Routing(rec.weights, rec.ids, None)).double())
        native_u = {layer: torch.cat(v).double().mean().item() for layer, v in native.u.items()}
        rows.append({**_row("native", B, native, native, native_u, native_u, None, config, spec), "batching": batching})
        for label, p in passes.items():
            u = {layer: torch.cat(v).double().mean().item() for layer, v in p.u.items()}
            kept = torch.cat(p.kept).mean().item() if p.kept else float(spec.top_k)
            rows.append({**_row(label, B, p, native, u, native_u, kept, config, spec), "batching": batching})
    bar.close()
    conditions = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_type": model.config.model_type,
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "sequences": N,
        "seq_len": L,
        "predicted_tokens_per_sequence": L - 1,
        "batching": batching,
        "domains": sorted(set(labels)) if batching != "stream" else None,
        "decode_batch": "teacher-forced [B, L] forward; at each position the B tokens of B different sequences "
        "are routed together as one decode batch (phase='decode-sim')",
        "confidence": config.confidence,
        "bootstrap_resamples": config.resamples,
        "bootstrap_unit": "sequence",
    }
    return {"rows": rows, "conditions": conditions}


def _row(label, B, p: _Pass, native: _Pass, u, native_u, kept, config: EvalConfig, spec) -> dict:
    n = p.ce.numel()
    diff = paired_bootstrap(p.ce, native.ce, config.resamples, config.confidence, config.seed)
    ce, ce_se = mean_se(p.ce)
    return {
        "policy": label,
        "batch_size": B,
        "sequences": n,
        "cross_entropy": ce,
        "cross_entropy_se": ce_se,
        "perplexity": float(torch.tensor(ce).exp()),
        "delta_ce": diff.mean,
        "delta_ce_ci": [diff.ci_low, diff.ci_high],
        "significant_loss": diff.ci_low > 0,
        "significant_gain": diff.ci_high < 0,
        "worse_by_se_rule": worse_by_se_rule(p.ce, native.ce, higher_is_better=False),
        "top1_agreement": p.agree.mean().item(),
        "kl_native_policy": p.kl.mean().item(),
        "mean_unique": sum(u.values()) / len(u),
        "native_mean_unique": sum(native_u.values()) / len(native_u),
        "unique_per_layer": {str(k): round(v, 3) for k, v in u.items()},
        "experts_per_token": kept if kept is not None else float(spec.top_k),
    }


@torch.no_grad()
def generation_check(
    model: nn.Module, prompts: torch.Tensor, policies: dict[str, Policy], max_new_tokens: int = 32,
    progress: bool = False, desc: str = "greedy generation",
) -> list[dict]:
    """Greedy generate() of a batch of prompts with each policy (decode re-routed, prefill native) against
    native greedy on the same batch: how many generated tokens differ and the first step that differs.

    Args:
      prompts: [B, P] token ids, all of the same length (no padding).
    """
    from ..hf import apply

    def run(policy):
        kw = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=max_new_tokens,
                  min_new_tokens=max_new_tokens, do_sample=False)
        if policy is None:
            out = model.generate(prompts, **kw)
        else:
            with apply(model, policy, phase="decode"):
                out = model.generate(prompts, **kw)
        return out[:, prompts.shape[1] :]  # [B, max_new_tokens]

    bar = progress_bar(1 + len(policies), progress, desc, unit="generate() calls")
    ref = run(None)
    bar.update(1)
    results = []
    for label, policy in policies.items():
        out = run(policy)
        bar.update(1)
        differ = out != ref  # [B, G]
        first = [int(torch.nonzero(row)[0]) if row.any() else None for row in differ]
        results.append({
            "policy": label,
            "batch_size": prompts.shape[0],
            "generated_tokens": int(differ.numel()),
            "differing_tokens": int(differ.sum()),
            "identical_sequences": sum(f is None for f in first),
            "first_divergence_step": first,
        })
    bar.close()
    return results
