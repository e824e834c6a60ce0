"""On a CUDA device every policy gives the CPU's routing and stays valid inside a captured CUDA graph.
Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import distinct_logits, random_mask
from moe_reroute import RouterSpec, make_policy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

E = 128
POLICIES = [("native", {}), ("cap", {"k": 4}), ("oea", {"k0": 3}), ("budget", {"budget": 32}),
            ("sere", {"similarity": torch.rand(E, E, generator=torch.Generator().manual_seed(0))})]
SPECS = [RouterSpec(E, 8), RouterSpec(E, 8, "sigmoid", True, n_group=8, topk_group=4, routed_scaling_factor=2.5),
         RouterSpec(E, 4, "topk_softmax")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.scoring)
@pytest.mark.parametrize("name,params", POLICIES, ids=lambda x: x if isinstance(x, str) else "")
def test_cuda_matches_cpu(spec, name, params):
    x, v = distinct_logits(64, E, seed=1), random_mask(64, 1)
    cpu = make_policy(name, **params)(x, spec, v)
    gpu = make_policy(name, **params)(x.cuda(), spec, v.cuda())
    torch.testing.assert_close(torch.sort(gpu.ids.cpu(), -1).values, torch.sort(cpu.ids, -1).values, rtol=0, atol=0)
    torch.testing.assert_close(gpu.weights.sum(-1).cpu(), cpu.weights.sum(-1))


@pytest.mark.parametrize("name,params", POLICIES, ids=lambda x: x if isinstance(x, str) else "")
def test_cuda_graph_capture(name, params):
    spec = SPECS[0]
    policy = make_policy(name, check_inputs=False, **params)
    x = distinct_logits(16, E, seed=2).cuda()
    v = random_mask(16, 2).cuda()
    if name == "sere":  # keep the matrix on the device: a host-to-device copy cannot be captured
        policy = make_policy(name, check_inputs=False, similarity=params["similarity"].cuda())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        policy(x, spec, v)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = policy(x, spec, v)
    y = distinct_logits(16, E, seed=3).cuda()
    x.copy_(y)
    graph.replay()
    want = policy(y, spec, v)
    assert torch.equal(out.ids, want.ids)
    torch.testing.assert_close(out.weights, want.weights)
