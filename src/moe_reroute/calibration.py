"""SERE's expert similarity, from expert outputs on calibration tokens (pure tensor functions).

Feed every calibration token's MoE input to every routed expert (no gate weights), stack the outputs
as `outputs` [E, N, d] (N tokens, d hidden size), and call `expert_similarity` once per layer. The
model side (running text through a model) lives in the transformers adapter.
"""

from __future__ import annotations

import torch

METHODS = ("cka", "cosine", "frobenius")


def expert_similarity(outputs: torch.Tensor, method: str = "cka", block: int = 512) -> torch.Tensor:
    """[E, E] float32 similarity of experts' outputs; diagonal 1; values in [0, 1].

    method:
      - "cka": linear CKA over the pooled tokens, ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), features
        centred over tokens.
      - "cosine": the per-token cosine of two experts' outputs, averaged over tokens, mapped by (x+1)/2.
      - "frobenius": 1 - ||O_i - O_j||_F / (largest such distance among the layer's pairs).
    block: tokens per block for CKA's Gram matrices; memory stays O(E * block^2).
    """
    if method not in METHODS:
        raise ValueError(f"unknown similarity method {method!r}; choose one of {METHODS}")
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 3:
        got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise ValueError(f"outputs must be [E, N, d] (experts, tokens, hidden), got {got}")
    E, N, d = outputs.shape
    if N < 2:
        raise ValueError(f"need at least 2 calibration tokens, got N={N}")
    if not bool(torch.isfinite(outputs).all()):
        raise ValueError("expert outputs contain NaN or inf; calibrate in float32")
    x = outputs.double()
    if method == "cosine":
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [E, N, d]
        flat = unit.reshape(E, N * d)
        sim = (flat @ flat.T / N + 1) / 2
    elif method == "frobenius":
        flat = x.reshape(E, N * d)
        sq = (flat * flat).sum(dim=-1)
        dist = (sq[:, None] + sq[None, :] - 2 * flat @ flat.T).clamp_min(0).sqrt()  # [E, E]
        dist.fill_diagonal_(0)
        top = dist.max()
        sim = 1 - dist / top if top > 0 else torch.ones_like(dist)
    else:
        xc = x - x.mean(dim=1, keepdim=True)  # [E, N, d]
        hsic = torch.zeros(E, E, dtype=torch.float64, device=x.device)
        for a in range(0, N, block):  # <K_i, K_j> summed over Gram blocks: exact, bounded memory
            for b in range(0, N, block):
                gram = xc[:, a : a + block] @ xc[:, b : b + block].transpose(1, 2)  # [E, n, n]
                flat = gram.reshape(E, -1)
                hsic += flat @ flat.T
        norm = hsic.diagonal().sqrt()
        sim = hsic / (norm[:, None] * norm[None, :]).clamp_min(1e-12)
    sim = sim.clamp(0, 1).float()
    sim.fill_diagonal_(1.0)
    return sim
