"""Calibrate SERE's expert similarity on a transformers model: run text, feed each MoE layer's input
to every routed expert, compare the experts' outputs (moe_reroute.calibration.expert_similarity).

The result is keyed by MoE-layer index (0 = the model's first MoE layer, dense layers not counted), the
index `sere` reads it by, in memory and in the file.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import METHODS, expert_similarity
from ..contract import RouterSpec
from ..progress import progress as progress_bar
from ..similarity import load_similarity, save_similarity  # noqa: F401  (the file format, re-exported)
from .apply import decoder, moe_routers


@torch.no_grad()
def calibrate_similarity(
    model: nn.Module,
    texts: list[str] | torch.Tensor,
    tokenizer=None,
    method: str = "cka",
    max_tokens: int = 512,
    experts_per_chunk: int = 8,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Per-layer [E, E] similarity of the routed experts, {MoE-layer index: matrix}, ready for `sere`
    (on DeepSeek-V3, whose decoder layers 0-2 are dense, key 0 is decoder layer 3).

    Args:
      texts: strings (with `tokenizer`) or a [B, L] tensor of token ids.
      max_tokens: calibration tokens kept per layer (the first ones, padding excluded).
      experts_per_chunk: experts run at once; memory grows with experts_per_chunk * max_tokens * hidden.
    """
    if method not in METHODS:
        raise ValueError(f"unknown similarity method {method!r}; choose one of {METHODS}")
    spec = RouterSpec.from_config(model.config)
    routers = list(moe_routers(model))
    if not routers:
        raise ValueError(f"{type(model).__name__} has no MoE layers to calibrate")
    if isinstance(texts, torch.Tensor):
        ids, mask = texts, torch.ones_like(texts)
    else:
        if tokenizer is None:
            raise ValueError("calibrate_similarity needs tokenizer=... to encode text (or pass token ids)")
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty list of strings")
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
        ids, mask = enc["input_ids"], enc["attention_mask"]
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)

    layers = decoder(model).layers
    inputs: dict[int, torch.Tensor] = {}
    keep = mask.reshape(-1).bool()

    def capture(layer: int):
        def hook(module, args):
            hidden = args[0].reshape(-1, args[0].shape[-1])[keep][:max_tokens]  # [N, H]
            inputs[layer] = hidden.detach()

        return hook

    handles = [layers[i].mlp.experts.register_forward_pre_hook(capture(i)) for i, _ in routers]
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    if not inputs:
        raise RuntimeError("no MoE layer input was captured; is this a supported transformers MoE model?")

    bar = progress_bar(len(routers), progress, f"calibrating {method} similarity", unit="layer")
    out = {}
    for moe, (layer, _) in enumerate(routers):  # the n-th MoE layer is MoE layer n
        experts = layers[layer].mlp.experts
        hidden = inputs.pop(layer)
        N = hidden.shape[0]
        if N < 2:
            raise ValueError(f"only {N} calibration token(s) reached decoder layer {layer}; give more text")
        outputs = []
        for start in range(0, spec.num_experts, experts_per_chunk):
            chunk = torch.arange(start, min(start + experts_per_chunk, spec.num_experts), device=hidden.device)
            c = len(chunk)
            x = hidden.repeat(c, 1)  # [c*N, H]: every token once per expert of the chunk
            index = chunk.repeat_interleave(N)[:, None]  # [c*N, 1]
            weight = torch.ones(c * N, 1, dtype=hidden.dtype, device=hidden.device)
            y = experts(x, index, weight)  # the expert's own output, gate weight 1
            outputs.append(y.float().reshape(c, N, -1).cpu())
        out[moe] = expert_similarity(torch.cat(outputs), method)
        bar.update(1)
    bar.close()
    return out
