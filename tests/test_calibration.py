"""SERE similarity against plain-loop formulas, and the properties CKA must have."""

from __future__ import annotations

import math

import pytest
import torch

from moe_reroute.calibration import expert_similarity


def loop_cka(X, Y):
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    num = torch.linalg.matrix_norm(Yc.T @ Xc) ** 2
    den = torch.linalg.matrix_norm(Xc.T @ Xc) * torch.linalg.matrix_norm(Yc.T @ Yc)
    return float(num / den)


def loop_cosine(X, Y):
    total = 0.0
    for n in range(X.shape[0]):
        total += float(X[n] @ Y[n] / (X[n].norm() * Y[n].norm()))
    return (total / X.shape[0] + 1) / 2


def outputs(E=6, N=40, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, d, generator=g, dtype=torch.float64)
    # experts that share structure to different degrees
    return torch.stack([base * (e % 3) + torch.randn(N, d, generator=g, dtype=torch.float64) for e in range(E)])


@pytest.mark.parametrize("method", ["cka", "cosine", "frobenius"])
def test_against_loops(method):
    O = outputs()
    E = O.shape[0]
    sim = expert_similarity(O, method, block=7)  # blocks that do not divide N
    assert sim.shape == (E, E) and sim.dtype == torch.float32
    dist = [[math.dist(O[i].flatten().tolist(), O[j].flatten().tolist()) for j in range(E)] for i in range(E)]
    top = max(max(row) for row in dist)
    for i in range(E):
        for j in range(E):
            if i == j:
                want = 1.0
            elif method == "cka":
                want = loop_cka(O[i], O[j])
            elif method == "cosine":
                want = loop_cosine(O[i], O[j])
            else:
                want = 1 - dist[i][j] / top
            assert float(sim[i, j]) == pytest.approx(want, abs=1e-5), (i, j)
    assert torch.allclose(sim, sim.T)


def test_cka_invariances():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(50, 8, generator=g)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    O = torch.stack([X, 3.0 * X @ Q + 1.0, torch.randn(50, 8, generator=g)])
    sim = expert_similarity(O, "cka")
    assert float(sim[0, 1]) == pytest.approx(1.0, abs=1e-5)  # rotation, scale and shift invariant
    assert float(sim[0, 2]) < 0.5


def test_errors():
    with pytest.raises(ValueError, match="unknown similarity method"):
        expert_similarity(torch.randn(2, 4, 3), "l2")
    with pytest.raises(ValueError, match=r"\[E, N, d\]"):
        expert_similarity(torch.randn(4, 3), "cka")
    with pytest.raises(ValueError, match="NaN or inf"):
        expert_similarity(torch.full((2, 4, 3), float("nan")), "cosine")
