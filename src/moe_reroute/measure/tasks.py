"""A user's own tasks from a local JSONL file, scored with each policy against native routing.

Two kinds, told apart by their fields:
- multiple choice: {"context": str, "choices": [str, ...], "answer": int}. A choice's score is the
  log-likelihood of its tokens after the context; the highest wins. Each (context + choice) is one
  sequence; B sequences go through one teacher-forced forward and, at each position, their tokens
  form one decode batch (`phase="decode-sim"`, padding excluded).
- generation: {"prompt": str, "target": str}. Greedy generate() of B prompts at once (left-padded),
  decode re-routed, prefill native; exact match when the completion starts with the target.
Per item, policy and native are paired: the difference in accuracy gets a bootstrap CI.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..policies import Policy
from .stats import mean_se, paired_bootstrap, worse_by_se_rule


def load_jsonl(path: str | Path) -> tuple[str, list[dict]]:
    """(kind, items) with kind "multiple_choice" or "generation"; every line is checked."""
    from ..files import json_lines, read_regular_text

    path = Path(path)
    text = read_regular_text(path, str(path), "give a JSONL task file (one JSON object per line)",
                             how_to_fix="save the task file as UTF-8 JSONL")
    items, kinds = [], set()
    for n, item in json_lines(text, lambda n, why: ValueError(f"{path}:{n}: not JSON ({why})")):
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{n}: a task line must be a JSON object, got a {type(item).__name__}")
        if {"context", "choices", "answer"} <= item.keys():
            if not isinstance(item["choices"], list) or len(item["choices"]) < 2:
                raise ValueError(f"{path}:{n}: 'choices' must be a list of at least 2 strings")
            if not isinstance(item["answer"], int) or not 0 <= item["answer"] < len(item["choices"]):
                raise ValueError(f"{path}:{n}: 'answer' must be the index of the right choice (0..{len(item['choices']) - 1})")
            kinds.add("multiple_choice")
        elif {"prompt", "target"} <= item.keys():
            kinds.add("generation")
        else:
            raise ValueError(f"{path}:{n}: a task line needs either context/choices/answer (multiple choice) "
                             f"or prompt/target (generation); got keys {sorted(item)}")
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no task items")
    if len(kinds) > 1:
        raise ValueError(f"{path} mixes multiple-choice and generation items; use one file per kind")
    return kinds.pop(), items


def _pad_id(tokenizer, model) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
              getattr(tokenizer, "eos_token_id", None)):
        if v is not None:
            return int(v if not isinstance(v, list) else v[0])
    return 0


@torch.no_grad()
def _choice_scores(model, tokenizer, items, policy: Policy | None, batch_size: int) -> torch.Tensor:
    """[items] 1.0 where the highest-likelihood choice is the answer."""
    from ..hf import apply

    # batches hold B different questions (choice j of questions i..i+B), as a server's batch holds B
    # different requests; the choices of one question side by side would share their context's routing
    order = sorted(((j, i) for i, item in enumerate(items) for j in range(len(item["choices"]))))
    seqs, owners, starts = [], [], []
    for j, i in order:
        ctx = tokenizer(items[i]["context"])["input_ids"]
        cont = tokenizer(items[i]["choices"][j])["input_ids"]
        if not ctx or not cont:
            raise ValueError(f"task item {i}: context and every choice must encode to at least one token")
        seqs.append(ctx + cont)
        owners.append((i, j))
        starts.append(len(ctx))
    pad = _pad_id(tokenizer, model)
    scores = torch.empty(len(seqs), dtype=torch.float64)
    for g in range(0, len(seqs), batch_size):
        chunk = seqs[g : g + batch_size]
        L = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for r, s in enumerate(chunk):  # right padding: positions line up like decode steps
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        if policy is None:
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        else:
            with apply(model, policy, phase="decode-sim"):
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = F.log_softmax(logits, dim=-1)
        for r, s in enumerate(chunk):
            start = starts[g + r]
            target = torch.tensor(s[start:])
            scores[g + r] = logp[r, start - 1 : len(s) - 1].gather(-1, target[:, None]).sum().item()
    best = {}  # question -> (score, choice)
    for (i, j), sc in zip(owners, scores.tolist()):
        if i not in best or sc > best[i][0]:  # ties: the lower choice index, which comes first in `order`
            best[i] = (sc, j)
    return torch.tensor([float(best[i][1] == item["answer"]) for i, item in enumerate(items)], dtype=torch.float64)


@torch.no_grad()
def _exact_match(model, tokenizer, items, policy: Policy | None, batch_size: int, max_new_tokens: int) -> torch.Tensor:
    from ..hf import apply

    pad = _pad_id(tokenizer, model)
    out = torch.zeros(len(items), dtype=torch.float64)
    for g in range(0, len(items), batch_size):
        chunk = items[g : g + batch_size]
        enc = [tokenizer(it["prompt"])["input_ids"] for it in chunk]
        L = max(len(e) for e in enc)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for r, e in enumerate(enc):  # left padding for generation
            ids[r, L - len(e):] = torch.tensor(e)
            mask[r, L - len(e):] = 1
        kw = dict(attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        if policy is None:
            gen = model.generate(ids, **kw)
        else:
            with apply(model, policy, phase="decode"):
                gen = model.generate(ids, **kw)
        for r, it in enumerate(chunk):
            text = tokenizer.decode(gen[r, L:], skip_special_tokens=True)
            out[g + r] = float(text.strip().startswith(it["target"].strip()))
    return out


def evaluate_task(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    policies: dict[str, Policy],
    batch_sizes: tuple[int, ...] = (16,),
    max_new_tokens: int = 32,
    resamples: int = 2000,
    confidence: float = 0.95,
) -> dict:
    """Accuracy (multiple choice) or exact match (generation) of each policy against native, per batch size."""
    kind, items = load_jsonl(path)
    if len(items) < 2:
        raise ValueError(f"{path}: paired statistics need at least 2 items")
    rows = []
    for B in batch_sizes:
        def score(policy):
            if kind == "multiple_choice":
                return _choice_scores(model, tokenizer, items, policy, B)
            return _exact_match(model, tokenizer, items, policy, B, max_new_tokens)

        native = score(None)
        for label, policy in [("native", None), *policies.items()]:
            acc = native if policy is None else score(policy)
            d = paired_bootstrap(acc, native, resamples, confidence)
            m, se = mean_se(acc)
            rows.append({
                "policy": label, "batch_size": B, "items": len(items), "metric": "accuracy" if kind == "multiple_choice"
                else "exact_match", "score": m, "score_se": se, "delta": d.mean, "delta_ci": [d.ci_low, d.ci_high],
                "significant_loss": d.ci_high < 0, "worse_by_se_rule": worse_by_se_rule(acc, native, higher_is_better=True),
            })
    return {"kind": kind, "task": str(path), "rows": rows}
