"""The fused Triton kernels against the torch policies (ties="lower-id", the kernels' rule).

Without a GPU the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py before Triton is imported). Ids must be identical; weights within 1e-6 relative (float32
rounding: the kernels compute their own exp). Each call is at most two launches (three for lynx; one where the
batch fits one program), and besides them a call issues no ATen op but allocations and views.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import reference as ref
from conftest import distinct_logits
from moe_reroute import RouterSpec, Routing, kernels, make_policy
from moe_reroute import metrics
from moe_reroute.metrics import unique_experts
from test_policies_vs_reference import check_against, tol

pytest.importorskip("triton")
if not kernels.available("cpu")[0] and not torch.cuda.is_available():
    pytest.skip(f"kernels unavailable: {kernels.available('cpu')[1]}", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.interpreting() else "cpu"
# The interpreter is slow: examples are derandomised (the same ones every run) and sized for CI.
FAST = settings(max_examples=int(os.environ.get("MOE_REROUTE_KERNEL_EXAMPLES", "20")), deadline=None,
                derandomize=os.environ.get("MOE_REROUTE_KERNEL_RANDOM", "0") == "0", suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

POLICY_NAMES = ["native", "cap", "oea", "sere", "budget"]


def similarity(E: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(E, E, generator=g)
    s = (s + s.T) / 2
    s.fill_diagonal_(1.0)
    return s


@st.composite
def specs(draw, E=None):
    scoring = draw(st.sampled_from(["softmax", "softmax", "sigmoid", "topk_softmax"]))
    E = E or draw(st.sampled_from([8, 60, 64, 128, 256, 384]))
    K = draw(st.integers(1, min(8, E)))
    if scoring == "sigmoid":
        groups = [g for g in (1, 2, 4, 8) if E % g == 0 and E // g >= 2]
        G = draw(st.sampled_from(groups))
        tg = draw(st.integers(1, G))
        while tg * (E // G) < K:
            tg += 1
        bias = None
        if draw(st.booleans()):
            g = torch.Generator().manual_seed(draw(st.integers(0, 10**6)))
            bias = torch.randn(E, generator=g) * 0.1
        return RouterSpec(E, K, "sigmoid", draw(st.booleans()), n_group=G, topk_group=tg,
                          routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])), e_score_correction_bias=bias)
    renorm = True if scoring == "topk_softmax" else draw(st.booleans())
    return RouterSpec(E, K, scoring, renorm)


@st.composite
def batches(draw, spec=None):
    spec = spec or draw(specs())
    E = spec.num_experts
    T = draw(st.one_of(st.integers(1, 40), st.sampled_from([64, 100, 257, 1024])))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 10**6))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["distinct", "ties", "neg-inf", "large"]))
    if kind == "ties":  # few distinct values: many equal scores in every row
        x = torch.randint(-2, 3, (T, E), generator=g).float()
    else:
        x = distinct_logits(T, E, torch.float32, seed) if E <= 4000 else torch.randn(T, E, generator=g)
        if kind == "neg-inf" and spec.scoring != "sigmoid":
            drop = torch.rand(T, E, generator=g) < 0.3
            drop[:, 0] = False  # every row keeps finite logits
            x = x.masked_fill(drop, float("-inf"))
        if kind == "large":
            x = x * (2000.0 if dtype == torch.float16 else 1e4)
    valid = None
    if draw(st.booleans()):
        valid = torch.rand(T, generator=g) > 0.3
        garbage = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e4]))
        x[~valid] = garbage  # padding rows hold anything; they must not change a valid row
    return spec, x.to(dtype), valid


def params_for(name, spec, data):
    K, E = spec.top_k, spec.num_experts
    if name == "cap":
        return {"k": data.draw(st.integers(1, K)), "renormalize": data.draw(st.sampled_from([None, True, False]))}
    if name == "oea":
        k0 = data.draw(st.integers(1, K))
        p = {"k0": k0}
        if data.draw(st.booleans()):
            p.update(p=data.draw(st.sampled_from([0.3, 0.8, 1.0])), k_max=data.draw(st.integers(k0, K)),
                     max_rank=data.draw(st.sampled_from([E, max(K, E // 4), K])))
        return p
    if name == "sere":
        return {"similarity": similarity(E, data.draw(st.integers(0, 99))), "primary": data.draw(st.integers(1, K)),
                "threshold": data.draw(st.sampled_from([0.0, 0.1, 0.6]))}
    if name == "budget":
        return {"budget": data.draw(st.sampled_from([1, K, E // 4 or 1, E // 2 or 1, E]))}
    return {}


def assert_same(torch_r, kern_r, spec, logits, valid, rows_native=False):
    """rows_native: `native` routes padding rows as the model would, garbage in, garbage out: compare valid rows."""
    assert kern_r.ids.dtype == torch.int64 and kern_r.weights.dtype == torch.float32
    assert kern_r.ids.shape == torch_r.ids.shape == (logits.shape[0], spec.top_k)
    a, b = torch_r.ids.cpu(), kern_r.ids.cpu()
    wa, wb = torch_r.weights.cpu(), kern_r.weights.cpu()
    if rows_native and valid is not None:
        a, b, wa, wb = a[valid], b[valid], wa[valid], wb[valid]
    if not torch.equal(a, b):
        bad = (a != b).any(-1).nonzero().flatten()[:4].tolist()
        raise AssertionError(f"ids differ in rows {bad}: torch {a[bad].tolist()} kernel {b[bad].tolist()}")
    rel = 1e-6
    if spec.scoring == "topk_softmax" and logits.dtype != torch.float32:
        rel = 2 ** -7  # the model's softmax is rounded to the logits' dtype: one ulp of it either way
    assert torch.allclose(wa, wb, rtol=rel, atol=1e-7), f"weights differ by {(wa - wb).abs().max():.3g}"


def run_both(name, spec, logits, valid, params, fixed=None):
    dev = torch.device(DEVICE)
    x = logits.to(dev)
    v = valid.to(dev) if valid is not None else None
    f = fixed.to(dev) if fixed is not None else None
    if spec.e_score_correction_bias is not None:
        spec = spec.with_bias(spec.e_score_correction_bias.to(dev))
    ref = make_policy(name, backend="torch", ties="lower-id", check_inputs=False, **params)(x, spec, v, fixed=f)
    with kernels.counting() as c:
        got = make_policy(name, backend="triton", check_inputs=False, **params)(x, spec, v, fixed=f)
    return ref, got, c.count, spec


@pytest.mark.parametrize("name", POLICY_NAMES)
@FAST
@given(batch=batches(), data=st.data())
def test_kernel_matches_torch(name, batch, data):
    spec, logits, valid = batch
    params = params_for(name, spec, data)
    ref, got, launches, spec = run_both(name, spec, logits, valid, params)
    assert_same(ref, got, spec, logits, valid, rows_native=name == "native")
    T, E = logits.shape
    fits = T <= kernels.block_tokens(T, E, torch.device(DEVICE))
    limit = 1 if (name in ("native", "cap") or fits) else 2
    assert launches <= limit, f"{launches} launches"


@pytest.mark.parametrize("name", POLICY_NAMES)
@FAST
@given(batch=batches(), share=st.sampled_from([0.0, 0.3, 0.7, 1.0]), data=st.data())
def test_kernel_matches_torch_with_fixed_rows(name, batch, share, data):
    """Random fixed rows (on padding rows too): the kernel's answer is the torch policy's, fixed rows are
    the kernel's native routing, and an all-False mask routes as no mask, bit for bit."""
    spec, logits, valid = batch
    T, E = logits.shape
    fixed = torch.rand(T, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))) < share
    params = params_for(name, spec, data)
    ref, got, launches, spec = run_both(name, spec, logits, valid, params, fixed)
    assert_same(ref, got, spec, logits, valid, rows_native=name == "native")
    fits = T <= kernels.block_tokens(T, E, torch.device(DEVICE))
    assert launches <= (1 if (name in ("native", "cap") or fits) else 2), f"{launches} launches"
    dev = got.ids.device
    rows = fixed.to(dev) if valid is None else fixed.to(dev) & valid.to(dev)
    nat = make_policy("native", backend="triton", check_inputs=False)(logits.to(dev), spec)
    assert torch.equal(got.ids[rows], nat.ids[rows])  # the kernel's native (weights: the same code in another kernel variant)
    assert torch.allclose(got.weights[rows], nat.weights[rows], rtol=1e-6, atol=1e-7)
    if share == 0.0:
        _, plain, _, _ = run_both(name, spec, logits, valid, params)
        assert torch.equal(got.ids, plain.ids)  # (native's padding rows may hold NaN weights: garbage in)
        torch.testing.assert_close(got.weights, plain.weights, rtol=0, atol=0, equal_nan=True)


def ep_params(name, spec, data):
    """`oea` or `budget` with `ep`: D ranks, a contiguous, random or per-layer placement, a rank_cap or not;
    (params, layer)."""
    E = spec.num_experts
    params = params_for(name, spec, data)
    D = data.draw(st.sampled_from([d for d in (1, 2, 3, 4, 8, 16) if d <= E]))
    params["ep"] = D
    layer = None
    how = data.draw(st.sampled_from(["contiguous", "random", "per-layer"]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    if how == "random":
        params["placement"] = torch.randint(0, D, (E,), generator=g)
    elif how == "per-layer":
        params["placement"] = torch.randint(0, D, (3, E), generator=g)
        layer = data.draw(st.integers(0, 2))
    if data.draw(st.booleans()):
        params["rank_cap"] = data.draw(st.integers(1, 6))
    return params, layer


@pytest.mark.parametrize("name", ["oea", "budget"])
@FAST
@given(batch=batches(), share=st.sampled_from([0.0, 0.0, 0.3]), data=st.data())
def test_ep_kernel_matches_torch(name, batch, share, data):
    """`ep` (the set under a cap on experts per rank) in the kernel: the torch policy's ids and weights, which
    tests/test_ep_policies.py checks against the plain-loop references; fixed rows too; one launch where the
    batch fits one program, two otherwise."""
    spec, logits, valid = batch
    T, E = logits.shape
    params, layer = ep_params(name, spec, data)
    fixed = None
    if share:
        fixed = torch.rand(T, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))) < share
    dev = torch.device(DEVICE)
    x, v = logits.to(dev), valid.to(dev) if valid is not None else None
    f = fixed.to(dev) if fixed is not None else None
    if spec.e_score_correction_bias is not None:
        spec = spec.with_bias(spec.e_score_correction_bias.to(dev))
    want = make_policy(name, backend="torch", ties="lower-id", check_inputs=False, **params)(x, spec, v, layer, fixed=f)
    with kernels.counting() as c:
        got = make_policy(name, backend="triton", check_inputs=False, **params)(x, spec, v, layer, fixed=f)
    assert_same(want, got, spec, logits, valid)
    if E <= kernels.MAX_EXPERTS:
        assert c.count == (1 if T <= kernels.block_tokens(T, E, dev) else 2), f"{c.count} launches"


def test_ep_kernel_changes_the_set_as_torch_does():
    """A case where the cap binds (so the test above is not only the plain policy): at D=8 over E=64 the
    busiest rank of `oea` holds fewer experts with `ep` than without, and kernel and torch agree."""
    spec = RouterSpec(64, 8)
    x = distinct_logits(16, 64, seed=9)
    x[:, :8] += 3.0  # most tokens want experts 0..7, all on rank 0 (contiguous)
    x = x.to(DEVICE)
    for name, params in [("oea", {"k0": 3}), ("budget", {"budget": 24})]:
        plain = make_policy(name, backend="triton", **params)(x, spec)
        got = make_policy(name, backend="triton", ep=8, **params)(x, spec)
        want = make_policy(name, backend="torch", ties="lower-id", ep=8, **params)(x, spec)
        assert torch.equal(got.ids, want.ids)
        busiest = [int(metrics.max_unique_per_rank(r, 64, 8)) for r in (plain, got)]
        assert busiest[1] < busiest[0], (name, busiest)


@pytest.mark.parametrize("name", ["oea", "sere", "budget"])
def test_fixed_rows_across_programs(name):
    """T=300 over several programs (two launches): a fixed row's experts in one program are used by the
    re-routed rows of the others, as in the torch policy."""
    spec = RouterSpec(128, 4)
    logits = distinct_logits(300, 128, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    valid = torch.rand(300, generator=g) > 0.1
    fixed = torch.rand(300, generator=g) < 0.2
    params = {"oea": {"k0": 1}, "sere": {"similarity": similarity(128, 3), "primary": 1, "threshold": 0.0},
              "budget": {"budget": 16}}[name]
    ref, got, launches, spec = run_both(name, spec, logits, valid, params, fixed)
    assert_same(ref, got, spec, logits, valid)
    assert launches == (1 if 300 <= kernels.block_tokens(300, 128, torch.device(DEVICE)) else 2)
    alone, _, _, _ = run_both(name, spec, logits, valid, params)
    assert not torch.equal(ref.ids[valid & ~fixed], alone.ids[valid & ~fixed])  # the fixed rows' experts are used


@pytest.mark.parametrize("name,params", [
    ("oea", {"k0": 3}), ("oea", {"k0": 2, "p": 0.7, "max_rank": 40}), ("sere", {"primary": 2}),
    ("budget", {"budget": 96}), ("cap", {"k": 5}),
])
def test_serving_size_two_launches(name, params):
    """T=1024 at E=MAX_EXPERTS (512, the kernels' bound, as Qwen3-Next; above it routing falls back to torch,
    see test_gpu_ready.py): two launches, the torch policy's answer."""
    from moe_reroute.kernels import MAX_EXPERTS as E

    spec = RouterSpec(E, 8)
    logits = distinct_logits(1024, E, torch.bfloat16, seed=11)
    valid = torch.rand(1024, generator=torch.Generator().manual_seed(3)) > 0.1
    if name == "sere":
        params = dict(params, similarity=similarity(E, 0))
    ref, got, launches, spec = run_both(name, spec, logits, valid, params)
    assert_same(ref, got, spec, logits, valid)
    assert launches == (1 if name == "cap" else 2)


@pytest.mark.parametrize("name,params", [
    ("native", {}), ("cap", {"k": 6}), ("oea", {"k0": 4}), ("sere", {"primary": 3}), ("budget", {"budget": 160}),
    ("oea", {"k0": 4, "ep": 16}), ("budget", {"budget": 160, "ep": 8, "rank_cap": 24}),
    ("xshare", {"budget": 64, "k0": 2, "group_budget": 8, "group_size": 8}), ("lynx", {"alpha": 3, "beta": 2}),
])
def test_qwen3_next_shape(name, params):
    """E = 512, K = 10 (Qwen3-Next, at the kernels' bound), several programs a step: the torch policy's answer."""
    spec = RouterSpec(512, 10)
    logits = distinct_logits(300, 512, torch.bfloat16, seed=12)
    valid = torch.rand(300, generator=torch.Generator().manual_seed(4)) > 0.1
    if name == "sere":
        params = dict(params, similarity=similarity(512, 1))
    ref, got, launches, spec = run_both(name, spec, logits, valid, params)
    assert_same(ref, got, spec, logits, valid, rows_native=name == "native")
    fits = 300 <= kernels.block_tokens(300, 512, torch.device(DEVICE))
    assert launches == (1 if fits or name in ("native", "cap") else 3 if name == "lynx" else 2)


@pytest.mark.parametrize("scoring", ["softmax", "topk_softmax"])
def test_budget_keeps_a_native_expert_of_minus_inf_logit(scoring):
    """A row with fewer than K finite logits: its native top-K holds experts of weight 0, which budget keeps
    allowed (`scoring.route_within_set`), so budget = E is native routing exactly, on the kernel as in torch."""
    spec = RouterSpec(8, 4, scoring, True)
    x = distinct_logits(6, 8, seed=13)
    x[2, 2:] = float("-inf")  # two finite logits, K = 4
    x[4, [1, 3, 5, 6, 7]] = float("-inf")
    x = x.to(torch.bfloat16)
    for budget in (4, 8):
        ref, got, _, _ = run_both("budget", spec, x, None, {"budget": budget})
        assert_same(ref, got, spec, x, None)
    native = make_policy("native", backend="triton", check_inputs=False)(x.to(DEVICE), spec)
    assert torch.equal(got.ids, native.ids)  # budget = E (the last one): native routing


def test_padding_rows_cannot_change_valid_rows():
    """The audit's case: a NaN padding row must not change the budget set (and so on for every policy)."""
    spec = RouterSpec(8, 2, "softmax", True)
    lg = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([True, True, True, False])
    for name, params in [("budget", {"budget": 3}), ("oea", {"k0": 1}), ("sere", {"similarity": similarity(8, 1)}),
                         ("cap", {"k": 1})]:
        pol = make_policy(name, backend="triton", check_inputs=False, **params)
        alone = pol(lg.to(DEVICE), spec)
        for garbage in (float("nan"), float("inf"), -float("inf"), 1e30):
            pad = torch.cat([lg, torch.full((1, 8), garbage)])
            r = pol(pad.to(DEVICE), spec, valid.to(DEVICE))
            assert torch.equal(r.ids[:3], alone.ids), (name, garbage)
            assert torch.equal(r.weights[:3], alone.weights)
            assert set(r.ids[3].tolist()) <= set(alone.ids.flatten().tolist()) and (r.weights[3] == 0).all()


class OpLog(TorchDispatchMode):
    """ATen ops issued outside the kernel launches."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_fixed", [False, True])
@pytest.mark.parametrize("name", POLICY_NAMES + ["xshare", "lynx", "oea-ep", "budget-ep"])
def test_a_call_is_launches_and_allocations_only(name, with_fixed, monkeypatch):
    """No torch op runs around the kernels (no sort, no copy, no host read): only empty() and views."""
    from moe_reroute.kernels import triton_route

    log = OpLog()
    real = triton_route.route_kernel

    class Counted:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                log.paused += 1
                try:
                    return real[grid](*args, **kw)
                finally:
                    log.paused -= 1
            return launch

    monkeypatch.setattr(triton_route, "route_kernel", Counted())
    spec = RouterSpec(128, 8)
    params = {"cap": {"k": 4}, "oea": {"k0": 3}, "sere": {"similarity": similarity(128, 0)}, "budget": {"budget": 32},
              "xshare": {"budget": 16, "k0": 1, "group_budget": 4, "group_size": 5}, "lynx": {"alpha": 3, "beta": 2},
              "oea-ep": {"k0": 3, "ep": 8}, "budget-ep": {"budget": 32, "ep": 4, "placement": [e % 4 for e in range(128)]}}
    pol = make_policy(name.split("-")[0], backend="triton", check_inputs=False, **params.get(name, {}))
    x = distinct_logits(16, 128, seed=2).to(DEVICE)
    valid = torch.ones(16, dtype=torch.bool, device=DEVICE)
    fixed = (torch.arange(16, device=DEVICE) % 3 == 0) if with_fixed else None
    pol(x, spec, valid, fixed=fixed)  # warm: similarity converted once and cached
    with kernels.counting() as c, log:
        pol(x, spec, valid, fixed=fixed)
    assert c.count == 1  # T=16, E=128 fits one program
    assert set(log.ops) <= {"empty", "view", "detach", "empty_strided"}, log.ops  # detach: view(dtype)


def test_bad_input_is_refused_before_the_launch():
    spec = RouterSpec(16, 4)
    pol = make_policy("oea", backend="triton", k0=2)
    with kernels.counting() as c:
        with pytest.raises(ValueError, match="NaN or inf"):
            pol(torch.full((2, 16), float("nan"), device=DEVICE), spec)
        with pytest.raises(ValueError, match="E=8 experts"):
            pol(torch.zeros(2, 8, device=DEVICE), spec)
        with pytest.raises(ValueError, match="oea k0=6 > the model's K=4"):
            make_policy("oea", backend="triton", k0=6)(torch.zeros(2, 16, device=DEVICE), spec)
        with pytest.raises(ValueError, match=r"valid must have shape"):
            pol(torch.zeros(2, 16, device=DEVICE), spec, torch.ones(3, dtype=torch.bool, device=DEVICE))
        with pytest.raises(ValueError, match=r"fixed must have shape \[T\]=\[2\]"):
            pol(torch.zeros(2, 16, device=DEVICE), spec, fixed=torch.ones(3, dtype=torch.bool, device=DEVICE))
        with pytest.raises(ValueError, match="fixed must be a bool tensor"):
            pol(torch.zeros(2, 16, device=DEVICE), spec, fixed=torch.ones(2, device=DEVICE))
    assert c.count == 0
    # NaN only in a padding row is accepted with checks on
    r = pol(torch.cat([torch.zeros(1, 16), torch.full((1, 16), float("nan"))]).to(DEVICE), spec,
            torch.tensor([True, False], device=DEVICE))
    assert (r.weights[1] == 0).all()


def test_backend_selection():
    with pytest.raises(ValueError, match="backend must be one of"):
        make_policy("oea", k0=1, backend="cuda")
    with pytest.raises(ValueError, match="lower expert id"):
        make_policy("oea", k0=1, backend="triton", ties="model")
    auto = make_policy("oea", k0=1)
    x = torch.zeros(2, 8)
    assert auto.backend == "auto" and not auto.uses_kernels(x)  # CPU tensors: torch under auto
    assert make_policy("oea", k0=1, backend="triton").uses_kernels(x.to(DEVICE))


def test_unsupported_triton_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_status", lambda: (False, "Triton 2.1 is older than the kernels support"))
    monkeypatch.setattr(kernels, "_warned", set())
    with pytest.warns(UserWarning, match="older than the kernels support"):
        pol = make_policy("oea", k0=2, backend="triton")
    assert pol.backend == "torch"
    spec = RouterSpec(16, 4)
    x = distinct_logits(4, 16, seed=1)
    assert torch.equal(pol(x, spec).ids, make_policy("oea", k0=2, backend="torch")(x, spec).ids)


@pytest.mark.long
def test_kernel_compiles_for_hopper():
    """Triton's compiler (not the interpreter) builds the kernel for sm_90 on this CPU: one case of each
    structure (one launch, both phases of a batch-wide set, grouped sigmoid scoring, the set under `ep`, which
    oea+ep also builds with plain oea's code). `python tests/kernel_compile.py` compiles every policy x scoring
    x phase."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernel_compile.py")
    cases = ["cap:softmax", "oea+ep:softmax:0", "budget:softmax:2", "budget+ep:softmax:2", "sere:sigmoid:1"]
    out = subprocess.run([sys.executable, str(script), *cases], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") == 5


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_a_step_without_valid_rows_routes_as_torch_does(name):
    """Every row padding, sigmoid scoring with a bias (the anchor cannot be a valid row's expert): the kernels
    and the torch policies point the padding at the same expert, and both return `valid` as a tensor."""
    bias = torch.tensor([-0.83, 0.10, 0.19, 1.31, 0.56, 0.08, 0.71, 1.33], device=DEVICE)
    spec = RouterSpec(8, 3, "sigmoid", True, n_group=4, topk_group=3, e_score_correction_bias=bias)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, generator=g).to(DEVICE)
    valid = torch.tensor([[False] * 5, [True, False, True, False, False]], device=DEVICE)
    params = {"cap": {"k": 1}, "oea": {"k0": 1}, "sere": {"similarity": similarity(8, 0), "primary": 1},
              "budget": {"budget": 3}}.get(name, {})
    a = make_policy(name, backend="torch", ties="lower-id", **params)(x, spec, valid)
    b = make_policy(name, backend="triton", **params)(x, spec, valid)
    assert torch.equal(a.ids, b.ids)
    for r in (make_policy(name, backend="triton", **params)(x[0], spec), make_policy(name, backend="torch", **params)(x[0], spec)):
        assert isinstance(r.valid, torch.Tensor) and r.valid.shape == (5,) and bool(r.valid.all())


# ---- xshare (softmax and topk_softmax routers only): its own specs and options ----

@st.composite
def softmax_specs(draw):
    scoring = draw(st.sampled_from(["softmax", "topk_softmax"]))
    E = draw(st.sampled_from([8, 16, 60, 64]))
    K = draw(st.integers(1, min(6, E)))
    return RouterSpec(E, K, scoring, True if scoring == "topk_softmax" else draw(st.booleans()))


def xshare_params(spec, T, data):
    """Every option of xshare, each on or off; group sizes up to T (the step's rows)."""
    K, E = spec.top_k, spec.num_experts
    p = {}
    which = data.draw(st.sampled_from(["budget", "alpha", "default"]))
    if which == "budget":
        p["budget"] = data.draw(st.sampled_from([1, max(1, K - 1), K, E // 4 or 1, E // 2, E]))
    elif which == "alpha":
        p["alpha"] = data.draw(st.sampled_from([0.0, 0.1, 0.3, 1.0]))
    if data.draw(st.booleans()):
        p["k0"] = data.draw(st.integers(0, min(E, K + 1)))
    if data.draw(st.booleans()):
        p["group_budget"] = data.draw(st.integers(1, max(1, E // 2)))
        p["group_size"] = data.draw(st.integers(1, T))
    if data.draw(st.booleans()):
        p["max_batch"] = data.draw(st.sampled_from([0, T, max(1, T - 1)]))
        p["min_batch"] = data.draw(st.integers(0, p["max_batch"] or 2 * T))
    p["guarantee"] = data.draw(st.booleans())
    return p


@st.composite
def xshare_batches(draw):
    spec = draw(softmax_specs())
    E = spec.num_experts
    T = draw(st.one_of(st.integers(1, 24), st.sampled_from([40, 100])))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 10**6))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["distinct", "ties", "neg-inf"]))
    if kind == "ties":  # few distinct values: equal logits, equal sums
        x = torch.randint(-2, 3, (T, E), generator=g).float()
    else:
        x = distinct_logits(T, E, torch.float32, seed)
        if kind == "neg-inf":  # some rows with fewer than K finite logits
            drop = torch.rand(T, E, generator=g) < 0.6
            drop[:, 0] = False
            x = x.masked_fill(drop, float("-inf"))
    valid = None
    if draw(st.booleans()):
        valid = torch.rand(T, generator=g) > 0.3
        x[~valid] = draw(st.sampled_from([float("nan"), float("inf"), 3e4]))
    fixed = None
    if draw(st.booleans()):
        fixed = torch.rand(T, generator=g) < draw(st.sampled_from([0.2, 0.6, 1.0]))
    return spec, x.to(dtype), valid, fixed


@FAST
@given(batch=xshare_batches(), data=st.data())
def test_xshare_kernel_matches_torch(batch, data):
    """Every option, padding, fixed rows, ties and -inf logits: the kernel's ids are the torch policy's."""
    spec, logits, valid, fixed = batch
    params = xshare_params(spec, logits.shape[0], data)
    ref, got, launches, spec = run_both("xshare", spec, logits, valid, params, fixed)
    assert_same(ref, got, spec, logits, valid)
    assert launches == 1  # T <= 100 fits one program


def three_steps(E, T=9):
    """Logits [3, T, E] of three steps, their valid rows (the second step padding only) and fixed rows."""
    S = 3
    x = torch.stack([distinct_logits(T, E, torch.float32, seed=s) for s in range(S)])
    g = torch.Generator().manual_seed(1)
    valid = torch.rand(S, T, generator=g) > 0.25
    valid[1] = False  # a step of padding only
    fixed = torch.rand(S, T, generator=g) < 0.3
    return x, valid, fixed


def steps_match_torch_in_one_launch(name, spec, x, valid, fixed, params):
    """[S, T, E] steps, with and without fixed rows: the kernel's ids equal torch's in one launch, and each
    step routes as that batch alone."""
    for f in (None, fixed):
        ref, got, launches, _ = run_both(name, spec, x, valid, params, f)
        assert torch.equal(ref.ids, got.ids), params
        assert torch.allclose(ref.weights, got.weights, rtol=1e-6, atol=1e-7)
        assert launches == 1
        for s in range(x.shape[0]):
            alone, _, _, _ = run_both(name, spec, x[s], valid[s], params, None if f is None else f[s])
            assert torch.equal(got.ids[s], alone.ids)


def test_xshare_kernel_steps_and_by_batch():
    """[S, T, E] steps (each its own batch: its own sums, groups and padding) with per-step valid and fixed
    rows, and parameters by batch size, resolved on the host."""
    spec = RouterSpec(16, 3)
    x, valid, fixed = three_steps(16)
    for params in ({"budget": 4, "k0": 1, "group_budget": 2, "group_size": 4},
                   {"alpha": 0.0, "group_budget": 3, "group_size": 2, "guarantee": False},
                   {"budget": {"by_batch": {"8": 2, "max": 5}}, "k0": {"by_batch": {"4": 3, "max": 1}}}):
        steps_match_torch_in_one_launch("xshare", spec, x, valid, fixed, params)


def over_programs(T=600, E=128):
    """bfloat16 logits [T, E] of a batch the kernels split over several programs, valid and fixed rows."""
    assert T > kernels.block_tokens(T, E, torch.device(DEVICE))
    logits = distinct_logits(T, E, torch.bfloat16, seed=7)
    g = torch.Generator().manual_seed(8)
    valid = torch.rand(T, generator=g) > 0.1
    fixed = torch.rand(T, generator=g) < 0.1
    return logits, valid, fixed


def test_xshare_kernel_across_programs():
    """T=600 over two programs (two launches): the batch's sums, the fixed rows' experts and groups that
    straddle two programs are the torch policy's."""
    spec = RouterSpec(128, 4)
    logits, valid, fixed = over_programs()
    for params in ({"budget": 6, "k0": 1, "group_budget": 4, "group_size": 7}, {"alpha": 0.05, "guarantee": False}):
        ref, got, launches, spec = run_both("xshare", spec, logits, valid, params, fixed)
        assert_same(ref, got, spec, logits, valid)
        assert launches == 2


def test_xshare_kernel_refuses_what_torch_refuses():
    spec = RouterSpec(16, 4)
    pol = make_policy("xshare", backend="triton", budget=4, group_budget=2, group_size=6)
    with kernels.counting() as c, pytest.raises(ValueError, match="group_size=6 > the step's 4 rows"):
        pol(torch.zeros(4, 16, device=DEVICE), spec)
    assert c.count == 0


# ---- lynx (variants "quant" with beta and "quant_flatten_remove"; softmax and topk_softmax routers only) ----

def lynx_params(data):
    return {"alpha": data.draw(st.sampled_from([0.7, 1, 1.5, 2, 3, 4])), "beta": data.draw(st.integers(1, 5)),
            "variant": data.draw(st.sampled_from(["quant", "quant_flatten_remove"]))}


@FAST
@given(batch=xshare_batches(), data=st.data())
def test_lynx_kernel_matches_torch_and_the_loops(batch, data):
    """Padding (holding NaN/inf), fixed rows, ties, -inf logits, E not a power of 2: the kernel's ids are the
    torch policy's and the plain-loop reference's (tests/reference.py `ref_lynx`), exactly."""
    spec, logits, valid, fixed = batch
    params = lynx_params(data)
    torch_r, got, launches, spec = run_both("lynx", spec, logits, valid, params, fixed)
    assert_same(torch_r, got, spec, logits, valid)
    assert launches == 1  # T <= 100 fits one program
    T = logits.shape[0]
    vl = [True] * T if valid is None else valid.tolist()
    loops = ref.ref_lynx if params.pop("variant") == "quant" else ref.ref_lynx_flatten_remove
    expected = loops(logits, spec, vl, fixed=None if fixed is None else fixed.tolist(), **params)
    check_against(Routing(weights=got.weights.cpu(), ids=got.ids.cpu()), expected, spec, valid,
                  tol(spec, logits))


def test_lynx_kernel_steps_and_by_batch():
    """[S, T, E] steps (each its own batch: its own B, counts, votes and padding) with per-step valid and
    fixed rows, and alpha and beta by batch size and per layer, resolved on the host."""
    spec = RouterSpec(60, 4)
    x, valid, fixed = three_steps(60)
    for params in ({"alpha": 3, "beta": 2}, {"alpha": 2, "beta": 1, "variant": "quant_flatten_remove"},
                   {"alpha": {"by_batch": {"8": 1, "max": 2.5}}, "beta": {"by_batch": {"4": 4, "max": 1}}}):
        steps_match_torch_in_one_launch("lynx", spec, x, valid, fixed, params)
    x, valid, fixed = x.to(DEVICE), valid.to(DEVICE), fixed.to(DEVICE)
    pol = make_policy("lynx", backend="triton", alpha=3, beta=2)
    with kernels.counting() as c:
        u = pol.unique(x, spec, valid, fixed=fixed)
    assert c.count == 1 and u.tolist() == unique_experts(pol(x, spec, valid, fixed=fixed), 60).tolist()
    per_layer = make_policy("lynx", backend="triton", alpha=[1, 3], beta=[4, 2])
    want = make_policy("lynx", backend="torch", ties="lower-id", alpha=3, beta=2)(x, spec, valid)
    assert torch.equal(per_layer(x, spec, valid, layer=1).ids, want.ids)


def test_lynx_kernel_across_programs():
    """T=600 over several programs (three launches: bucket counts, votes, routing): the counts, votes and
    fixed rows' experts of every program are the torch policy's."""
    spec = RouterSpec(128, 8, renormalize=False)
    logits, valid, fixed = over_programs()
    for params in ({"alpha": 3, "beta": 2}, {"alpha": 1, "beta": 4, "variant": "quant_flatten_remove"}):
        ref, got, launches, spec = run_both("lynx", spec, logits, valid, params, fixed)
        assert_same(ref, got, spec, logits, valid)
        assert launches == 3


def test_lynx_beyond_the_expert_bound_falls_back_with_one_warning():
    """E above MAX_EXPERTS: one warning, the torch policy's answer, no launch."""
    E = kernels.MAX_EXPERTS + 128
    spec = RouterSpec(E, 4)
    x = distinct_logits(6, E, seed=3)
    kernels._warned.discard(kernels.too_many_experts(E))
    pol = make_policy("lynx", backend="triton", alpha=3, beta=2)
    with kernels.counting() as c, pytest.warns(UserWarning, match=f"E={E} experts exceeds the kernels' bound"):
        r = pol(x, spec)
    assert c.count == 0
    assert torch.equal(r.ids, make_policy("lynx", backend="torch", ties="lower-id", alpha=3, beta=2)(x, spec).ids)


def test_lynx_a_step_without_valid_rows_routes_as_torch_does():
    spec = RouterSpec(8, 3)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    valid = torch.tensor([[False] * 5, [True, False, True, False, False]], device=DEVICE)
    a = make_policy("lynx", backend="torch", ties="lower-id", alpha=2, beta=2)(x, spec, valid)
    b = make_policy("lynx", backend="triton", alpha=2, beta=2)(x, spec, valid)
    assert torch.equal(a.ids, b.ids)


@pytest.mark.parametrize("name,params", [("budget", {"budget": 24}), ("oea", {"k0": 3, "ep": 8})])
def test_batch_sizes_share_one_compiled_variant(name, params, monkeypatch):
    """Triton compiles one kernel per specialisation of its arguments; the batch size (T, the programs, the step
    stride) is not specialised, so every T that fits one program binds to one specialisation, and every larger
    T to one per phase: Triton's own binder for an sm_90 target, on the arguments `kernels.route` passes
    (captured, not launched). Without `do_not_specialize` T = 1 and T = 16 would each be a variant."""
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    from moe_reroute.kernels import triton_route

    real = triton_route.route_kernel
    if isinstance(real, jit.JITFunction):
        compiled = real
    else:  # the interpreter's wrapper keeps the decorator's options
        compiled = jit.JITFunction(real.fn, **getattr(real, "kwargs", {}))
    try:
        binder = jit.create_function_from_signature(compiled.signature, compiled.params,
                                                    make_backend(GPUTarget("cuda", 90, 32)))
    except (AttributeError, TypeError) as e:
        pytest.skip(f"this Triton binds arguments otherwise: {e}")
    calls = []

    class Record:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((args, kw))

    monkeypatch.setattr(triton_route, "route_kernel", Record())
    spec = RouterSpec(128, 8)
    policy = make_policy(name, backend="torch", **params)

    def keys(T):
        calls.clear()
        kernels.route(policy, distinct_logits(T, 128, seed=T), spec, torch.ones(T, dtype=torch.bool),
                      policy.config.at_layer(None, T), None)
        return [str(binder(*a, **kw)[1]) for a, kw in calls]  # one specialisation per launch (phase)

    bt = kernels.block_tokens(1, 128, torch.device("cpu"))  # tokens per program (the interpreter's: larger)
    small = {tuple(keys(T)) for T in (1, 5, 16, bt - 1, bt)}
    large = {tuple(keys(T)) for T in (bt + 1, 2 * bt, 1024 + 3)}
    assert len(small) == 1 and len(next(iter(small))) == 1
    assert len(large) == 1 and len(next(iter(large))) == 2
    plain = jit.JITFunction(compiled.fn)  # the same kernel, every integer specialised
    plain_binder = jit.create_function_from_signature(plain.signature, plain.params, make_backend(GPUTarget("cuda", 90, 32)))
    calls.clear()
    keys(1)
    one = str(plain_binder(*calls[0][0], **calls[0][1])[1])
    calls.clear()
    keys(16)
    assert str(plain_binder(*calls[0][0], **calls[0][1])[1]) != one
