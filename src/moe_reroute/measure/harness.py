"""Policies against native routing through lm-evaluation-harness (the `lmeval` extra), e.g. on a local task.

Each run goes through one `lm_eval.simple_evaluate`, natively and once per policy, with a subclass of the
harness's `HFLM` that applies the policy per request type:
- loglikelihood requests (multiple choice, perplexity): the harness runs one teacher-forced forward over B
  right-padded sequences; the policy is applied in `phase="decode-sim"`, so at each position the B tokens
  there are routed together as one decode step would route them.
- generate_until requests: generate() with the policy in `phase="decode"` (prefill native, as a server).
The stock HFLM calls the model without an attention mask on loglikelihood batches, so its zero padding
would count as real tokens of the decode batch; the subclass passes the mask (padding never enlarges U).
The harness forms the batches (requests sorted by length), so one batch may hold several choices of one
question, whose shared context tokens route alike; `evaluate_task` batches B different questions instead.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..policies import Policy
from .stats import paired_bootstrap

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'moe-reroute[lmeval]'"


def require_lm_eval():
    """The `lm_eval` module, or an ImportError that says how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - needs accelerate, part of lm_eval[hf]
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return lm_eval


@functools.cache
def routed_lm_class():
    """HFLM that routes with `self.policy` (None: native) and masks the padding of loglikelihood batches."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import Collator

    from ..hf import apply

    class RoutedHFLM(HFLM):
        policy: Policy | None = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            # the harness pads these batches with zeros and passes no mask; rebuild its batches (same
            # Collator, same keys) to know each row's real length when _model_call sees the batch
            self._pending = self._expected_batches(requests, override_bs)
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._pending = []

        def _expected_batches(self, requests, override_bs) -> list[list[list[int]]]:
            if self.backend != "causal":
                return []
            if self.batch_size == "auto" and not override_bs:
                raise ValueError("give an integer batch size: the decode batch is what is being evaluated")
            batch_size = self.batch_size if self.batch_size != "auto" else override_bs
            collator = Collator(
                requests,
                sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])),
                group_by="contexts" if self.logits_cache else None,
                group_fn=lambda req: req[-2] + req[-1][:-1],
            )
            return [[(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
                    for chunk in collator.get_batched(n=batch_size)]

        def _padding_mask(self, inps: torch.Tensor) -> torch.Tensor:
            """[B, L] 1 on the real tokens of the harness's right-padded batch, checked against its requests."""
            rows = self._pending.pop(0) if getattr(self, "_pending", None) else None
            B, L = inps.shape
            if rows is None or len(rows) != B or max(map(len, rows)) != L or any(
                inps[r, : len(row)].tolist() != row for r, row in enumerate(rows)
            ):
                raise RuntimeError(
                    "lm_eval built a loglikelihood batch other than expected, so its padding is unknown; "
                    "moe_reroute.measure.harness is tested with lm_eval 0.4.13: pip install 'lm_eval[hf]==0.4.13'"
                )
            mask = torch.zeros(B, L, dtype=torch.long, device=inps.device)
            for r, row in enumerate(rows):
                mask[r, : len(row)] = 1
            return mask

        def _model_call(self, inps, attn_mask=None, labels=None):
            if self.backend != "causal":
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            mask = self._padding_mask(inps)
            scope = contextlib.nullcontext()
            if self.policy is not None:
                scope = apply(self.model, self.policy, phase="decode-sim")
            autocast = torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                      enabled=self.mixed_precision_dtype is not None)
            with torch.no_grad(), autocast, scope:
                return self.model(input_ids=inps, attention_mask=mask).logits

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self.policy is None:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            # generate() feeds finished sequences the tokenizer's pad id; the hooks read the pad id from
            # generation_config to mark those rows invalid, so the two must agree during this call
            config = self.model.generation_config
            saved = config.pad_token_id
            config.pad_token_id = self.tokenizer.pad_token_id
            try:
                with apply(self.model, self.policy, phase="decode"):
                    return super()._model_generate(context, max_length, stop, **generation_kwargs)
            finally:
                config.pad_token_id = saved

    return RoutedHFLM


def task_manager(tasks: list[str], include_path: str | None):
    """A TaskManager over `include_path`; the harness's built-in tasks are indexed too only when a task
    is not found there (indexing them takes seconds)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in manager.all_tasks for t in tasks):
            return manager
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" in {include_path} or" if include_path else ""
        raise ValueError(f"unknown lm-eval tasks {unknown}: not found{where} among the harness's tasks; give the "
                         "folder of your task YAMLs with --lm-eval-include")
    return manager


def evaluate_harness(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    include_path: str | None,
    policies: dict[str, Policy],
    batch_size: int,
    limit: int | None = None,
    resamples: int = 2000,
    confidence: float = 0.95,
) -> dict:
    """Every policy against native routing on lm-eval tasks, at one batch size.

    Args:
      tasks: lm-eval task names, e.g. the `task:` of a YAML in `include_path`.
      include_path: folder of local task YAMLs (e.g. `dataset_path: json` with `data_files`), or None.
      batch_size: requests per forward: B sequences per loglikelihood forward, B prompts per generate().
      limit: documents per task (None: all).
    Returns: {"rows": one dict per (task, metric, policy), "conditions": {...}}. Each row holds the value and
      the harness's stderr, native's value, and the paired difference to native with a bootstrap CI over
      documents where the harness logs a number per document (acc, exact_match); elsewhere the CI is None.
    """
    lm_eval = require_lm_eval()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    manager = task_manager(tasks, include_path)
    lm = routed_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    runs = []  # (label, result): native first, the reference of every paired comparison
    for label, policy in [("native", None), *policies.items()]:
        lm.policy = policy
        runs.append((label, lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                              log_samples=True, bootstrap_iters=1000)))
    lm.policy = None
    rows = []
    native = runs[0][1]
    for task, metrics in native["results"].items():
        for key, native_value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(native_value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            higher = native.get("higher_is_better", {}).get(task, {}).get(metric, True)
            ref = per_document(native, task, metric, filt)
            for label, run in runs:
                value = run["results"][task][key]
                stderr = run["results"][task].get(f"{metric}_stderr,{filt}")
                row = {"task": task, "metric": metric, "filter": filt, "policy": label, "batch_size": batch_size,
                       "value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None,
                       "native_value": native_value, "delta": value - native_value, "delta_ci": None,
                       "significant_loss": None}
                docs = per_document(run, task, metric, filt)
                if ref is not None and docs is not None and ref.keys() == docs.keys() and len(ref) >= 2:
                    ids = sorted(ref)
                    d = paired_bootstrap(torch.tensor([docs[i] for i in ids]), torch.tensor([ref[i] for i in ids]),
                                         resamples, confidence)
                    row.update(delta=d.mean, delta_ci=[d.ci_low, d.ci_high], documents=d.items,
                               significant_loss=d.ci_high < 0 if higher else d.ci_low > 0)
                rows.append(row)
    from importlib.metadata import version

    conditions = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "lm_eval": version("lm_eval"),
        "tasks": list(tasks),
        "include_path": include_path,
        "batch_size": batch_size,
        "limit": limit,
        "batching": "the harness's batches (requests sorted by length); loglikelihood: one right-padded "
        "[B, L] forward, padding masked, policy in phase='decode-sim'; generate_until: generate(), policy "
        "in phase='decode'",
        "confidence": confidence,
        "bootstrap_resamples": resamples,
        "bootstrap_unit": "document",
    }
    return {"rows": rows, "conditions": conditions}


def per_document(run: dict, task: str, metric: str, filt: str) -> dict[int, float] | None:
    """{doc_id: value} of one metric from `log_samples`, or None where a document's value is not a number
    (corpus-level metrics such as perplexity log tuples)."""
    out = {}
    for sample in run.get("samples", {}).get(task, []):
        if sample.get("filter", filt) != filt:
            continue
        value = sample.get(metric)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)):
            return None
        out[int(sample["doc_id"])] = float(value)
    return out or None
