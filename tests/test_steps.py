"""S steps in one call: router logits [S, T, E] route each step as its own batch.

Every policy, on random logits with random valid and fixed masks, against a Python loop of S separate
calls: ids identical, weights within float32 rounding (vectorised elementwise ops may round an element
differently by its position in the buffer). The fused kernels (under Triton's interpreter without a GPU)
against the same loop. Metrics give one value per step. Trace replay against the plain per-step loop.
"""

from __future__ import annotations

import pytest
import torch

from conftest import distinct_logits
from moe_reroute import RouterSpec, kernels, make_policy, metrics, traces
from moe_reroute.traces import Trace

E = 32


def similarity(n: int, seed: int) -> torch.Tensor:
    s = torch.rand(n, n, generator=torch.Generator().manual_seed(seed))
    s = (s + s.T) / 2
    return s.fill_diagonal_(1.0)


SPECS = {
    "softmax": RouterSpec(E, 4, "softmax", True),
    "softmax-raw": RouterSpec(E, 4, "softmax", False),
    "sigmoid": RouterSpec(E, 4, "sigmoid", True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                          e_score_correction_bias=torch.randn(E, generator=torch.Generator().manual_seed(9)) * 0.1),
    "topk_softmax": RouterSpec(E, 4, "topk_softmax", True),
}

BY_BATCH = {"by_batch": {"4": 3, "max": 1}}  # T = 3 takes 3, T = 9 takes 1
CASES = [
    ("native", {}),
    ("cap", {"k": 2}),
    ("cap", {"k": [1, 3], "renormalize": True}),
    ("cap", {"k": BY_BATCH}),
    ("oea", {"k0": 1}),
    ("oea", {"k0": 2, "k_max": 3}),
    ("oea", {"k0": 3, "p": 0.5}),
    ("oea", {"k0": [1, 2], "max_rank": 10}),
    ("oea", {"k0": BY_BATCH, "p": {"by_batch": {"4": 0.9, "max": 1.0}}}),
    ("sere", {"similarity": similarity(E, 0)}),
    ("sere", {"similarity": torch.stack([similarity(E, 1), similarity(E, 2)]), "primary": [1, 2],
              "threshold": 0.6}),
    ("sere", {"similarity": similarity(E, 3), "primary": BY_BATCH, "threshold": 0.0}),
    ("budget", {"budget": 6}),
    ("budget", {"budget": [4, E]}),
    ("budget", {"budget": {"by_batch": {"4": 8, "max": 5}}}),
    ("gain", {"budget": 6}),
    ("gain", {"budget": [4, E], "base": [2, 1]}),
    ("gain", {"budget": {"by_batch": {"4": 8, "max": 5}}}),
]


def steps_batch(S: int, T: int, seed: int, ties: bool = False, dtype=torch.float32):
    """[S, T, E] logits (some steps with many equal scores), [S, T] valid and fixed masks."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(-2, 3, (S, T, E), generator=g).float()
    else:
        x = distinct_logits(S * T, E, torch.float32, seed).view(S, T, E)
    valid = torch.rand(S, T, generator=g) > 0.25
    valid[0] = True  # a step with no padding, a step with only padding
    if S > 1:
        valid[1] = False
    x[~valid] = float("nan")  # padding may hold anything
    fixed = torch.rand(S, T, generator=g) < 0.3
    return x.to(dtype), valid, fixed


def assert_steps_equal(got, loop, what):
    ids = torch.stack([r.ids for r in loop])
    w = torch.stack([r.weights for r in loop])
    assert got.ids.shape == ids.shape and got.weights.shape == w.shape, what
    if not torch.equal(got.ids, ids):
        bad = (got.ids != ids).any(-1).nonzero()[:4].tolist()
        raise AssertionError(f"{what}: ids differ at (step, row) {bad}")
    torch.testing.assert_close(got.weights, w, rtol=1e-6, atol=1e-7, equal_nan=True, msg=what)  # native: NaN padding


def per_step(policy, x, spec, valid, fixed, layer):
    return [policy(x[s], spec, valid[s], layer=layer, fixed=None if fixed is None else fixed[s])
            for s in range(x.shape[0])]


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("scoring", sorted(SPECS))
def test_steps_equal_separate_calls(name, params, scoring):
    spec = SPECS[scoring]
    for seed, (T, ties, use_fixed, ties_rule, dtype) in enumerate([
        (3, False, False, "model", torch.float32), (9, False, True, "model", torch.bfloat16),
        (9, True, True, "model", torch.float32), (9, False, True, "lower-id", torch.float32),
        (1, True, False, "lower-id", torch.float16),
    ]):
        x, valid, fixed = steps_batch(5, T, seed, ties, dtype)
        fixed = fixed if use_fixed else None
        policy = make_policy(name, backend="torch", ties=ties_rule, **params)
        for layer in (0, 1):
            got = policy(x, spec, valid, layer=layer, fixed=fixed)
            assert torch.equal(got.valid, valid)
            assert_steps_equal(got, per_step(policy, x, spec, valid, fixed, layer),
                               f"{name} {params} T={T} ties={ties} fixed={use_fixed} {ties_rule} {dtype} layer={layer}")


def test_oea_fast_and_sorted_paths_agree():
    """oea without max_rank ranks by a top-k of integer keys, with max_rank by a full sort: a max_rank of
    E is no limit, so both must give the same routing, ties and -inf scores included."""
    spec = RouterSpec(E, 6)
    for seed in range(6):
        x, valid, fixed = steps_batch(4, 12, seed, ties=seed % 2 == 0, dtype=[torch.float32, torch.bfloat16][seed % 2])
        x[..., 5] = float("-inf") if seed % 3 == 0 else -0.0
        x[..., 7] = 0.0
        for params in ({"k0": 2}, {"k0": 1, "k_max": 4, "p": 0.6}, {"k0": 6}):
            fast = make_policy("oea", check_inputs=False, **params)(x, spec, valid, fixed=fixed if seed % 2 else None)
            ranked = make_policy("oea", check_inputs=False, max_rank=E, **params)(x, spec, valid, fixed=fixed if seed % 2 else None)
            assert torch.equal(fast.ids, ranked.ids), (seed, params)
            assert torch.equal(fast.weights, ranked.weights), (seed, params)


def test_one_step_is_the_plain_call():
    spec = SPECS["softmax"]
    x, valid, fixed = steps_batch(1, 7, 3)
    for name, params in CASES[::3]:
        policy = make_policy(name, backend="torch", **params)
        one = policy(x, spec, valid, layer=0, fixed=fixed)
        plain = policy(x[0], spec, valid[0], layer=0, fixed=fixed[0])
        assert torch.equal(one.ids[0], plain.ids) and torch.equal(one.weights[0], plain.weights)


def test_native_top_k_given_per_step():
    """An engine's native top-K for S steps is [S, T, K]."""
    spec = SPECS["softmax"]
    x, valid, fixed = steps_batch(3, 6, 1)
    x = torch.where(valid[..., None], x, 0.0)
    w, ids = torch.softmax(x, -1).topk(spec.top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    policy = make_policy("oea", k0=2)
    got = policy(x, spec, valid, native=(w, ids), fixed=fixed)
    loop = [policy(x[s], spec, valid[s], native=(w[s], ids[s]), fixed=fixed[s]) for s in range(3)]
    assert_steps_equal(got, loop, "oea with native")
    with pytest.raises(ValueError, match=r"native top-K must be .*\[S, T, K\]=\[3, 6, 4\].*\[T, K\] for router_logits"):
        policy(x, spec, valid, native=(w[0], ids[0]))


@pytest.mark.parametrize("valid_shape,fixed_shape,match", [
    ((5,), None, r"valid must have shape \[S, T\]=\[3, 5\].*\[T, E\] takes valid and fixed \[T\]"),
    ((5, 3), None, r"valid must have shape \[S, T\]=\[3, 5\]"),
    (None, (5,), r"fixed must have shape \[S, T\]=\[3, 5\].*\[S, T, E\] takes them \[S, T\]"),
    (None, (1, 5), r"fixed must have shape \[S, T\]=\[3, 5\]"),
])
def test_bad_mask_shapes_name_both_forms(valid_shape, fixed_shape, match):
    spec = RouterSpec(16, 2)
    x = torch.zeros(3, 5, 16)
    valid = torch.ones(valid_shape, dtype=torch.bool) if valid_shape else None
    fixed = torch.ones(fixed_shape, dtype=torch.bool) if fixed_shape else None
    for name in ("native", "oea"):
        with pytest.raises(ValueError, match=match):
            make_policy(name, **({"k0": 1} if name == "oea" else {}))(x, spec, valid, fixed=fixed)


def test_bad_logits_shapes_name_both_forms():
    spec = RouterSpec(16, 2)
    policy = make_policy("oea", k0=1)
    with pytest.raises(ValueError, match=r"2-D \[T, E\] \(one batch\) or 3-D \[S, T, E\].*got shape \(2, 3, 4, 16\)"):
        policy(torch.zeros(2, 3, 4, 16), spec)
    with pytest.raises(ValueError, match=r"2-D \[T, E\] \(one batch\) or 3-D \[S, T, E\]"):
        policy(torch.zeros(16), spec)
    with pytest.raises(ValueError, match="no tokens"):
        policy(torch.zeros(0, 3, 16), spec)
    with pytest.raises(ValueError, match=r"valid must have shape \[T\]=\[3\].*\[S, T\]"):
        policy(torch.zeros(3, 16), spec, torch.ones(2, 3, dtype=torch.bool))
    x = torch.zeros(2, 3, 16)
    x[1, 2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf \(first bad \(step, token row\)s: \[\(1, 2\)\]\)"):
        policy(x, spec)


def test_metrics_per_step():
    spec = SPECS["softmax"]
    x, valid, fixed = steps_batch(4, 6, 2)
    r = make_policy("oea", k0=1)(x, spec, valid, fixed=fixed)
    loop = [make_policy("oea", k0=1)(x[s], spec, valid[s], fixed=fixed[s]) for s in range(4)]
    u = metrics.unique_experts(r, E)
    assert u.shape == (4,) and u.tolist() == [int(metrics.unique_experts(q, E)) for q in loop]
    assert u[1] == 0  # a step of padding only activates nothing
    per_token = metrics.experts_per_token(r)
    assert torch.equal(per_token, torch.stack([metrics.experts_per_token(q) for q in loop]))
    ranks = metrics.unique_experts_per_rank(r, E, 4)
    assert torch.equal(ranks, torch.stack([metrics.unique_experts_per_rank(q, E, 4) for q in loop]))
    assert metrics.max_unique_per_rank(r, E, 4).tolist() == [int(metrics.max_unique_per_rank(q, E, 4)) for q in loop]
    xs = torch.where(valid[..., None], x, 0.0)
    mass = metrics.retained_mass(r, xs, spec)
    assert torch.allclose(mass, torch.stack([metrics.retained_mass(q, xs[s], spec) for s, q in enumerate(loop)]))


# --- the fused kernels: a grid over steps ---

def _kernels_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return kernels.available("cuda" if torch.cuda.is_available() else "cpu")[0]


@pytest.mark.skipif(not _kernels_usable(), reason="Triton kernels unavailable (no Triton, or no GPU and no interpreter)")
@pytest.mark.parametrize("name,params", [
    ("native", {}), ("cap", {"k": 2}), ("oea", {"k0": 1}), ("oea", {"k0": 2, "p": 0.6, "max_rank": 9}),
    ("sere", {"similarity": similarity(E, 4), "threshold": 0.3}), ("budget", {"budget": 7}),
    ("oea", {"k0": 2, "ep": 4}), ("budget", {"budget": 9, "ep": 4, "rank_cap": 2, "placement": [i % 4 for i in range(E)]}),
])
@pytest.mark.parametrize("T", [5, 300])  # one program per step; several (two launches) per step
def test_kernel_steps_equal_separate_calls(name, params, T):
    dev = "cuda" if torch.cuda.is_available() and not kernels.interpreting() else "cpu"
    spec = SPECS["softmax"]
    x, valid, fixed = steps_batch(3, T, 5)
    x, valid, fixed = x.to(dev), valid.to(dev), fixed.to(dev)
    policy = make_policy(name, backend="triton", check_inputs=False, **params)
    with kernels.counting() as c:
        got = policy(x, spec, valid, fixed=fixed)
    fits = T <= kernels.block_tokens(T, E, x.device)
    assert c.count == (1 if fits or name in ("native", "cap") else 2)  # one launch per phase for all steps
    loop = per_step(policy, x, spec, valid, fixed, None)
    if name == "native":  # native routes padding rows as the model would: garbage in, garbage out
        got = type(got)(torch.where(valid[..., None], got.weights, 0), torch.where(valid[..., None], got.ids, 0))
        loop = [type(q)(torch.where(valid[s, :, None], q.weights, 0), torch.where(valid[s, :, None], q.ids, 0))
                for s, q in enumerate(loop)]
    assert_steps_equal(got, loop, f"kernel {name}")
    ref = make_policy(name, backend="torch", ties="lower-id", check_inputs=False, **params)(x, spec, valid, fixed=fixed)
    if name != "native":
        assert torch.equal(ref.ids, got.ids)


# --- trace replay ---

def plain_replay(trace: Trace, policy) -> dict[int, torch.Tensor]:
    """The replay loop as it was: one policy call per step and layer, on float32 logits."""
    return {layer: torch.stack([
        metrics.unique_experts(policy(trace.logits[layer][s].float(), trace.specs[layer], trace.valid[s],
                                      layer=trace.moe_layer(layer)), trace.specs[layer].num_experts)
        for s in range(trace.steps)]) for layer in trace.layers}


def synthetic_trace(S=23, B=4, dtype=torch.bfloat16, scoring="softmax") -> Trace:
    g = torch.Generator().manual_seed(7)
    spec = SPECS[scoring]
    layers = (3, 4, 5)  # decoder layers; MoE layers 0, 1, 2
    logits = {k: (torch.randn(S, B, E, generator=g) * 2).to(dtype) for k in layers}
    valid = torch.rand(S, B, generator=g) > 0.2
    valid[4] = False
    bias = spec.e_score_correction_bias
    specs = {k: spec if bias is None else spec.with_bias(bias + 0.01 * k) for k in layers}  # one bias per layer
    return Trace(logits, valid, specs, {"model": "synthetic"})


@pytest.mark.parametrize("scoring", sorted(SPECS))
@pytest.mark.parametrize("name,params", [("native", {}), ("oea", {"k0": [1, 2, 3]}), ("sere", {"similarity": similarity(E, 5)}),
                                         ("budget", {"budget": BY_BATCH}), ("cap", {"k": 1}),
                                         ("gain", {"budget": BY_BATCH, "base": 2})])
def test_replay_equals_the_plain_loop(name, params, scoring, tmp_path):
    trace = synthetic_trace(scoring=scoring)
    policy = make_policy(name, **params)
    want = plain_replay(trace, policy)
    path = trace.save(tmp_path / "t.safetensors")
    for chunk in (None, 1, 5):
        for got in (trace.replay(policy, chunk_steps=chunk), traces.replay_file(path, policy, chunk_steps=chunk)):
            assert got.keys() == want.keys()
            for layer in want:
                assert torch.equal(got[layer], want[layer]), (layer, chunk)
    some = traces.replay_file(path, policy, layers=[5])
    assert list(some) == [5] and torch.equal(some[5], want[5])
    mean = traces.summary(want)
    assert mean == {k: pytest.approx(float(v.float().mean())) for k, v in want.items()}


def test_replay_file_errors(tmp_path):
    trace = synthetic_trace()
    path = trace.save(tmp_path / "t.safetensors")
    policy = make_policy("oea", k0=1)
    with pytest.raises(ValueError, match=r"layers \[9\] are not in this trace; it holds layers \[3, 4, 5\]"):
        traces.replay_file(path, policy, layers=[9])
    with pytest.raises(ValueError, match="chunk_steps must be a positive int"):
        traces.replay_file(path, policy, chunk_steps=0)
    with pytest.raises(ValueError, match="chunk_steps must be a positive int"):
        trace.replay(policy, chunk_steps=-1)
    with pytest.raises(FileNotFoundError, match="no file at"):
        traces.replay_file(tmp_path / "missing.safetensors", policy)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        traces.replay_file(tmp_path / "junk.safetensors", policy)


def test_default_chunk_is_bounded():
    assert traces.default_chunk_steps(16, 128) * 16 * 128 * 4 == traces.CHUNK_BYTES
    assert traces.default_chunk_steps(10**6, 10**4) == 1
