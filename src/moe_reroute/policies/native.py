"""`native`: the model's own routing, bit for bit what its transformers router computes.

`valid` is accepted but does not change any row: this is the baseline every other policy is measured
against. `Routing.weights` is float32; cast it with `spec.model_weights_dtype(logits.dtype)` to get
exactly the tensor the stock router hands its experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract import RouterSpec, Routing
from ..scoring import grouped_choice
from .base import Policy, PolicyConfig


@dataclass(frozen=True)
class NativeConfig(PolicyConfig):
    """No parameters."""


def native_topk(router_logits: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K] float32, ids [T, K] int64), with the stock routers' exact operations."""
    K = spec.top_k
    if spec.scoring == "softmax":  # Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral
        probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
        top, ids = torch.topk(probs, K, dim=-1)
        if spec.renormalize:
            top /= top.sum(dim=-1, keepdim=True)
        return top, ids
    if spec.scoring == "topk_softmax":  # GPT-OSS: softmax in the logits' dtype
        top, ids = torch.topk(router_logits, K, dim=-1)
        return torch.softmax(top, dim=1, dtype=top.dtype).float(), ids
    scores = router_logits.float().sigmoid()  # DeepSeek-V3
    ids = torch.topk(grouped_choice(scores, spec), k=K, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if spec.renormalize:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * spec.routed_scaling_factor, ids


class Native(Policy):
    name = "native"
    Config = NativeConfig

    def route(self, router_logits, spec, valid, config, layer) -> Routing:
        weights, ids = native_topk(router_logits, spec)
        return Routing(weights=weights, ids=ids, valid=valid)
