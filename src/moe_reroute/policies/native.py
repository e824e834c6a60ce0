"""`native`: the model's own routing, bit for bit what its transformers router computes.

`valid` and `fixed` are accepted but do not change any row (every row is native already): this is
the baseline every other policy is measured against. With ties="lower-id" equal scores are ordered by lower
expert id (the fused kernels' native). `Routing.weights` is float32; cast it with
`spec.model_weights_dtype(logits.dtype)` to get exactly the tensor the stock router hands its experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract import Routing
from ..scoring import native_topk
from .base import Policy, PolicyConfig
from .unique import head_union


@dataclass(frozen=True)
class NativeConfig(PolicyConfig):
    """No parameters."""


class Native(Policy):
    name = "native"
    Config = NativeConfig

    def route(self, router_logits, spec, valid, config, layer, native=None, fixed=None) -> Routing:
        weights, ids = native_topk(router_logits, spec, self.ties) if native is None else native
        return Routing(weights=weights, ids=ids, valid=valid)

    def count_unique(self, router_logits, spec, valid, config, layer, fixed=None) -> torch.Tensor:
        """U: the union of the valid rows' native top-K, their first K ranks."""
        return head_union(router_logits, spec, valid, self.ties, spec.top_k)


__all__ = ["Native", "NativeConfig", "native_topk"]
