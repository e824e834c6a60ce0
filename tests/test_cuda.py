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
            ("sere", {"similarity": torch.rand(E, E, generator=torch.Generator().manual_seed(0))}),
            ("oea", {"k0": 3, "ep": 8})]  # the set under a cap on experts per rank, in the kernel too
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


@pytest.mark.parametrize("with_fixed", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("T", [16, 300])
@pytest.mark.parametrize("name,params", POLICIES, ids=lambda x: x if isinstance(x, str) else "")
def test_cuda_graph_capture(name, params, T, backend, with_fixed):
    spec = SPECS[0]
    if backend == "triton":
        pytest.importorskip("triton")
    policy = make_policy(name, check_inputs=False, backend=backend, **params)
    x = distinct_logits(T, E, seed=2).cuda()
    v = random_mask(T, 2).cuda()
    f = random_mask(T, 5, p_invalid=0.7).cuda() if with_fixed else None  # prefill rows of a mixed step
    if name == "sere":  # keep the matrix on the device: a host-to-device copy cannot be captured
        policy = make_policy(name, check_inputs=False, backend=backend, similarity=params["similarity"].cuda())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        policy(x, spec, v, fixed=f)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = policy(x, spec, v, fixed=f)
    y = distinct_logits(T, E, seed=3).cuda()
    x.copy_(y)
    graph.replay()
    want = policy(y, spec, v, fixed=f)
    assert torch.equal(out.ids, want.ids)
    torch.testing.assert_close(out.weights, want.weights)


@pytest.mark.parametrize("T,launches", [(16, 1), (1024, 2)])
@pytest.mark.parametrize("name,params", POLICIES, ids=lambda x: x if isinstance(x, str) else "")
def test_fused_call_is_one_or_two_kernels(name, params, T, launches):
    """Counted by the CUDA profiler: every kernel the call puts on the GPU."""
    pytest.importorskip("triton")
    from torch.profiler import ProfilerActivity, profile

    spec = SPECS[0]
    if name == "sere":
        params = {"similarity": params["similarity"].cuda()}
    policy = make_policy(name, check_inputs=False, backend="triton", **params)
    x = distinct_logits(T, E, seed=4).cuda()
    v = random_mask(T, 4).cuda()
    policy(x, spec, v)  # compile outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        policy(x, spec, v)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    want = 1 if name in ("native", "cap") else launches
    assert len(kernels) == want, [e.name for e in kernels]


LYNX = [{"alpha": 3, "beta": 2}, {"alpha": 1, "beta": 4, "variant": "quant_flatten_remove"}]


@pytest.mark.parametrize("params", LYNX, ids=lambda p: p.get("variant", "quant"))
@pytest.mark.parametrize("T,launches", [(16, 1), (1024, 3)])
def test_lynx_kernel_on_cuda(params, T, launches):
    """The compiled lynx kernel (not the interpreter) gives the torch policy's ids on the GPU, in one launch for
    a step that fits one program and three otherwise, and replays inside a captured CUDA graph."""
    pytest.importorskip("triton")
    from moe_reroute import kernels

    spec = RouterSpec(E, 8, renormalize=False)
    x = distinct_logits(T, E, torch.bfloat16, seed=6).cuda()
    v = random_mask(T, 6).cuda()
    f = random_mask(T, 7, p_invalid=0.9).cuda()
    policy = make_policy("lynx", check_inputs=False, backend="triton", **params)
    want = make_policy("lynx", backend="torch", ties="lower-id", **params)(x, spec, v, fixed=f)
    with kernels.counting() as c:
        got = policy(x, spec, v, fixed=f)
    assert c.count == launches
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-6, atol=1e-7)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = policy(x, spec, v, fixed=f)
    y = distinct_logits(T, E, torch.bfloat16, seed=8).cuda()
    x.copy_(y)
    graph.replay()
    assert torch.equal(out.ids, make_policy("lynx", backend="torch", ties="lower-id", **params)(y, spec, v, fixed=f).ids)


def _compiled_variants(kernel) -> int:
    """Compiled variants of a Triton kernel in this process (skips where this Triton keeps them elsewhere)."""
    caches = getattr(kernel, "device_caches", None)
    if not caches:
        pytest.skip("this Triton keeps no device_caches on its kernels")
    total = 0
    for entry in caches.values():
        table = entry[0] if isinstance(entry, tuple) else entry
        if not isinstance(table, dict):
            pytest.skip("this Triton's device_caches hold no dict of compiled kernels")
        total += len(table)
    return total


def test_batch_sizes_share_one_compiled_kernel():
    """T = 1, 5, 16, 24 and 32 (one program each at E = 128) run one compiled kernel: Triton does not
    specialise the batch size, so an engine capturing graphs for many sizes compiles a policy once per phase."""
    pytest.importorskip("triton")
    from moe_reroute.kernels import triton_route

    spec = SPECS[0]
    policy = make_policy("budget", budget=24, check_inputs=False, backend="triton")
    x = distinct_logits(32, E, seed=8).cuda()
    policy(x[:3], spec)
    before = _compiled_variants(triton_route.route_kernel)
    for T in (1, 5, 16, 24, 32):
        policy(x[:T].contiguous(), spec)
    assert _compiled_variants(triton_route.route_kernel) == before
