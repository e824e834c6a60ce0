"""Paired statistics for "policy vs native" on the same items (sequences, questions).

N = items. Each item contributes one paired difference (policy - native), so item-to-item variation
in difficulty cancels; tokens inside one sequence are not independent, which is why the unit
resampled is the item, not the token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class PairedDiff:
    """Mean of policy - native over N items, its bootstrap confidence interval and standard error."""

    mean: float
    ci_low: float
    ci_high: float
    se: float
    confidence: float
    items: int

    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(
    policy: torch.Tensor, native: torch.Tensor, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> PairedDiff:
    """Percentile bootstrap of the mean paired difference.

    Args:
      policy, native: [N] per-item values (e.g. mean cross-entropy of each sequence), paired by index.
      resamples: bootstrap resamples of the N items (with replacement).
    """
    policy = torch.as_tensor(policy, dtype=torch.float64).flatten()
    native = torch.as_tensor(native, dtype=torch.float64).flatten()
    if policy.shape != native.shape:
        raise ValueError(f"paired values need the same number of items, got {policy.numel()} and {native.numel()}")
    n = policy.numel()
    if n < 2:
        raise ValueError(f"a paired bootstrap needs at least 2 items, got {n}; evaluate more sequences")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not torch.isfinite(policy).all() or not torch.isfinite(native).all():
        raise ValueError("paired values contain NaN or inf")
    diff = policy - native  # [N]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    means = diff[idx].mean(dim=1)  # [resamples]
    alpha = (1 - confidence) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    se = diff.std(unbiased=True).item() / math.sqrt(n)
    return PairedDiff(diff.mean().item(), lo, hi, se, confidence, n)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of [N] values."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    se = v.std(unbiased=True).item() / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")
    return v.mean().item(), se


def worse_by_se_rule(policy: torch.Tensor, native: torch.Tensor, higher_is_better: bool) -> bool:
    """The OEA paper's rule: a policy is worse only if its mean, one standard error in its favour, is
    still beyond the native mean one standard error the other way (mean + se < native mean - se for a
    higher-is-better score such as accuracy)."""
    m, s = mean_se(policy)
    mn, sn = mean_se(native)
    if higher_is_better:
        return m + s < mn - sn
    return m - s > mn + sn
