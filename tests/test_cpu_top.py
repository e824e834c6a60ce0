"""The compiled CPU top-m kernel against a plain sort of each row, and its fallbacks."""

import math
import warnings

import pytest
import torch

from moe_reroute import RouterSpec
from moe_reroute.kernels import cpu_top
from moe_reroute.policies import unique

needs_kernel = pytest.mark.skipif(not cpu_top.available()[0], reason=f"no CPU kernel: {cpu_top.available()[1]}")


def reference(x: torch.Tensor, m: int) -> tuple[list[list[float]], list[list[int]]]:
    """Each row's m largest by a plain sort: NaN above everything, -0.0 below +0.0, lowest id first among equals."""
    def key(v: float):
        if math.isnan(v):
            return (2, 0.0)
        return (1, v, math.copysign(1.0, v))

    vals, ids = [], []
    for row in x.reshape(-1, x.shape[-1]).float().tolist():
        order = sorted(range(len(row)), key=lambda j: (tuple(-c for c in key(row[j])), j))[:m]
        vals.append([row[j] for j in order])
        ids.append(order)
    return vals, ids


def same(a: list[list[float]], b: list[list[float]]) -> bool:
    return all((math.isnan(u) and math.isnan(v)) or u == v for ra, rb in zip(a, b) for u, v in zip(ra, rb))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E,m", [(1, 1), (7, 3), (128, 9), (128, 1), (130, 64), (5000, 5)])
def test_matches_plain_sort_with_ties(dtype, E, m):
    g = torch.Generator().manual_seed(E * 100 + m)
    x = torch.randn(37, E, generator=g)
    x[::3] = torch.round(x[::3] * 2) / 2  # many ties in every third row
    x = x.to(dtype)
    vals, ids = cpu_top.topk(x, m)
    assert vals.dtype == torch.float32 and ids.dtype == torch.int64 and vals.shape == ids.shape == (37, m)
    ref_vals, ref_ids = reference(x, m)
    assert ids.tolist() == ref_ids
    assert same(vals.tolist(), ref_vals)
    # and torch.topk's values (its ids among equal values are in no stated order)
    assert torch.equal(vals, torch.topk(x, m, dim=-1).values.float())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_special_values(dtype):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([
        [0.0, -0.0, 1.0, -1.0, inf, -inf, nan, 2.0],
        [-0.0, 0.0, -0.0, 0.0, -inf, -inf, -inf, -inf],
        [-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf],
        [nan, nan, 3.0, nan, -5.0, 1e-7, -1e-7, 4.0],
    ]).to(dtype)
    x[3, 1] = -x[3, 1]  # a NaN with its sign bit set is still a NaN, above everything
    for m in (1, 4, 8):
        vals, ids = cpu_top.topk(x, m)
        ref_vals, ref_ids = reference(x, m)
        assert ids.tolist() == ref_ids, m
        assert same(vals.tolist(), ref_vals), m
    assert ids[1, :2].tolist() == [1, 3]  # +0.0 ranks above -0.0
    assert torch.isnan(cpu_top.topk(x, 1)[0][0, 0])
    if dtype == torch.float16:  # a subnormal half converts exactly
        tiny = torch.tensor([[2.0 ** -24, 3 * 2.0 ** -24, -(2.0 ** -20)]], dtype=torch.float16)
        assert cpu_top.topk(tiny, 3)[0].tolist() == [[3 * 2.0 ** -24, 2.0 ** -24, -(2.0 ** -20)]]


@needs_kernel
def test_layouts_and_threads():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 40, 2 * 128, generator=g).to(torch.bfloat16)
    strided = base[:, ::2, ::2]  # neither dimension contiguous
    vals, ids = cpu_top.topk(strided, 5)
    ref = torch.topk(strided.float(), 5, dim=-1)
    assert vals.shape == (6, 20, 5)
    assert torch.equal(vals, ref.values)
    assert torch.equal(strided.float().gather(-1, ids), vals)
    assert cpu_top.topk(torch.empty(0, 8), 2)[0].shape == (0, 2)
    # rows split between threads give the single-thread answer
    big = torch.randn(2 * cpu_top.MIN_ROWS_PER_THREAD + 3, 128, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_top.topk(big, 9)
        torch.set_num_threads(2)
        two = cpu_top.topk(big, 9)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.equal(one[0], torch.topk(big, 9, dim=-1).values)


def test_not_applicable_returns_none():
    x = torch.randn(4, 16)
    assert cpu_top.topk(x, 0) is None and cpu_top.topk(x, 17) is None
    assert cpu_top.topk(x, cpu_top.MAX_M + 1) is None
    assert cpu_top.topk(x.double(), 2) is None
    assert cpu_top.topk(x.requires_grad_(), 2) is None


def test_turned_off_and_failed_build(monkeypatch, tmp_path):
    x = torch.randn(64, 128)
    try:
        monkeypatch.setenv("MOE_REROUTE_CPU_KERNEL", "0")
        cpu_top.reset()
        assert cpu_top.topk(x, 9) is None
        assert cpu_top.available() == (False, "turned off by MOE_REROUTE_CPU_KERNEL=0")
        monkeypatch.delenv("MOE_REROUTE_CPU_KERNEL")
        monkeypatch.setenv("MOE_REROUTE_CACHE", str(tmp_path))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        cpu_top.reset()
        with pytest.warns(RuntimeWarning, match="CPU top-k kernel is unavailable.*using torch.topk"):
            assert cpu_top.topk(x, 9) is None
        monkeypatch.setenv("CC", "false")  # a compiler that fails
        cpu_top.reset()
        with pytest.warns(RuntimeWarning, match="failed to compile"):
            assert cpu_top.topk(x, 9) is None
        assert not list(tmp_path.glob("cpu_top-*.so"))
        # head_union falls back to torch.topk with the same answer
        spec = RouterSpec(128, 8)
        logits = torch.randn(8, 16, 128)
        valid = torch.ones(8, 16, dtype=torch.bool)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            without = unique.head_union(logits, spec, valid, "model", 3)
        monkeypatch.delenv("CC")
        cpu_top.reset()
        if cpu_top.available()[0]:
            assert list(tmp_path.glob("cpu_top-*.so"))  # built into the cache directory given
            assert torch.equal(unique.head_union(logits, spec, valid, "model", 3), without)
    finally:
        cpu_top.reset()
