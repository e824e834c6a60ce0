"""What the GPU run relies on, checked on CPU where it can be: the kernels' bound on E (through the
dispatch), the decode-step bench's step against a plain per-layer loop, its too-old-torch message,
`.ci/gpu --dry-run` end to end; and on CUDA (marked gpu) the whole decode step captured in one CUDA graph
against the eager step."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import distinct_logits
from moe_reroute import RouterSpec, kernels, make_policy
from moe_reroute.measure.layer import MoELayer
from moe_reroute.measure.shapes import LayerShape

ROOT = Path(__file__).resolve().parents[1]
spec_ = importlib.util.spec_from_file_location("decode_step", ROOT / "benchmarks" / "decode_step.py")
decode_step = importlib.util.module_from_spec(spec_)
sys.modules["decode_step"] = decode_step  # its dataclasses look their module up
spec_.loader.exec_module(decode_step)

POLICIES = [("native", {}), ("cap", {"k": 4}), ("oea", {"k0": 3}), ("budget", {"budget": 12})]


# ----------------------------------------------------------------------------------------- versions


@pytest.mark.parametrize("triton_v,numpy_v,ok", [("3.6.0", "2.4.6", False), ("3.6.0", "2.3.5", True),
                                                  ("3.7.0", "2.4.6", True), ("3.9.0", "2.5.2", True)])
def test_interpreter_refuses_triton_3_6_with_numpy_2_4(monkeypatch, triton_v, numpy_v, ok):
    """Triton 3.6's interpreter calls int() on a 1-element array where the kernel loops over its tokens
    (TypeError with numpy >= 2.4; seen on torch 2.11's Triton 3.6.0 with numpy 2.4.6); 3.7 squeezes it."""
    import types

    import numpy

    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=triton_v))
    monkeypatch.setattr(numpy, "__version__", numpy_v)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels._interpreter_status.cache_clear()
    kernels._triton_status.cache_clear()
    try:
        got_ok, why = kernels.available("cpu")
    finally:
        kernels._interpreter_status.cache_clear()
        kernels._triton_status.cache_clear()
    assert got_ok is ok
    if not ok:
        assert f"Triton {triton_v}" in why and f"numpy {numpy_v}" in why and "numpy<2.4" in why and "3.7" in why


# ----------------------------------------------------------------------------------------- E bound


def test_too_many_experts_fall_back_to_torch_with_one_warning(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "_warned", set())
    E = kernels.MAX_EXPERTS * 2
    spec = RouterSpec(E, 8)
    x = distinct_logits(6, E, seed=3)
    pol = make_policy("oea", k0=3, backend="triton")
    with kernels.counting() as c, pytest.warns(UserWarning, match=f"E={E} experts exceeds the kernels' bound"):
        got = pol(x, spec)
    assert c.count == 0  # no kernel launched (and none compiled)
    want = make_policy("oea", k0=3, backend="torch", ties="lower-id")(x, spec)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.weights, want.weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call does not warn again
        pol(x, spec)


def test_experts_at_the_bound_use_the_kernels(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "_warned", set())
    pol = make_policy("native", backend="triton")
    if not kernels.available(torch.device("cpu"))[0]:
        pytest.skip("kernels not runnable here")
    assert pol.uses_kernels(torch.zeros(1, kernels.MAX_EXPERTS))
    with pytest.warns(UserWarning, match="exceeds the kernels' bound"):
        assert not pol.uses_kernels(torch.zeros(1, kernels.MAX_EXPERTS + 1))


# ----------------------------------------------------------------------------------------- decode step


def _stack(L=3, E=128, K=8, device="cpu", dtype=torch.float32):
    shape = LayerShape("tiny", 32, 16, E, K)
    return decode_step.Stack(shape, L, torch.device(device), dtype, seed=1), shape


def _reference_step(stack, x, logits, specs, policy):
    """The step as a plain loop: each layer's loop kernel (one matmul pair per used expert), residual."""
    h = x
    for i, layer in enumerate(stack.layers):
        r = policy(logits[i], specs[i], layer=i)
        h = h + layer.forward(h, r, "loop")
    return h


@pytest.mark.parametrize("name,params", POLICIES, ids=[p[0] for p in POLICIES])
def test_decode_step_matches_a_plain_loop(name, params):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    stack, shape = _stack()
    specs = [RouterSpec(128, 8)] * stack.L
    logits = torch.stack([distinct_logits(5, 128, seed=10 + i) for i in range(stack.L)])  # [L, B, E]
    x = torch.randn(5, shape.hidden, generator=torch.Generator().manual_seed(0))
    pol = make_policy(name, check_inputs=False, **params)
    got = decode_step.step(stack, x, logits, specs, list(range(stack.L)), policy=pol)
    want = _reference_step(stack, x, logits, specs, pol)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the "experts" variant with the policy's routing given beforehand is the same step
    w, ids = decode_step.route_only(logits, specs, list(range(stack.L)), pol)
    again = decode_step.step(stack, x, None, specs, list(range(stack.L)), routing=(w, ids))
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,params", POLICIES + [("gain", {"budget": 12})], ids=lambda x: x if isinstance(x, str) else "")
def test_decode_step_has_no_host_synchronisation(name, params):
    """What the CUDA graph of a decode step needs, checked on CPU by a dispatch log: neither the policy nor
    the experts issue an op that waits for the device (a mask index, nonzero, item, bincount, unique), for
    both step variants (policy inside, routing given)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    from conftest import HostSyncLog

    stack, shape = _stack()
    specs = [RouterSpec(128, 8)] * stack.L
    logits = torch.stack([distinct_logits(6, 128, seed=30 + i) for i in range(stack.L)])
    x = torch.randn(6, shape.hidden, generator=torch.Generator().manual_seed(0))
    pol = make_policy(name, check_inputs=False, backend="torch", **params)
    layers = list(range(stack.L))
    routing = decode_step.route_only(logits, specs, layers, pol)
    with HostSyncLog() as log:
        decode_step.step(stack, x, logits, specs, layers, policy=pol)
        decode_step.step(stack, x, None, specs, layers, routing=routing)
    assert log.found == []


TORCH_POLICIES = [("native", {}), ("cap", {"k": 4}), ("cap", {"schedule": (2, 4, 8, 3), "num_layers": 4}),
                  ("oea", {"k0": 3}), ("oea", {"k0": 3, "max_rank": 5}), ("oea", {"k0": 3, "p": 0.7}),
                  ("oea", {"k0": 3, "ep": 8}), ("budget", {"budget": 32}), ("budget", {"budget": 32, "ep": 4}),
                  ("sere", {"similarity": torch.rand(128, 128, generator=torch.Generator().manual_seed(0))}),
                  ("gain", {"budget": 32}), ("xshare", {"budget": 16, "k0": 1, "group_budget": 4, "group_size": 5}),
                  ("lynx", {"alpha": 3, "beta": 2}), ("lynx", {"alpha": 3})]
SYNC_SPECS = [RouterSpec(128, 8), RouterSpec(128, 8, "sigmoid", True, n_group=8, topk_group=4, routed_scaling_factor=2.5),
              RouterSpec(128, 4, "topk_softmax")]


@pytest.mark.parametrize("with_fixed", [False, True])
@pytest.mark.parametrize("name,params", TORCH_POLICIES, ids=lambda x: x if isinstance(x, str) else "")
def test_torch_policies_have_no_host_synchronisation(name, params, with_fixed):
    """Every policy's torch path (a GPU without Triton, `gain`, lynx without beta, ...) with padding rows and
    fixed rows, on every scoring it takes: no op that waits for the device, so it can be captured in a CUDA
    graph (test_cuda.py captures some on a GPU)."""
    from conftest import HostSyncLog, random_mask

    for spec in SYNC_SPECS:
        if name in ("xshare", "lynx") and spec.scoring == "sigmoid":
            continue  # they refuse sigmoid routers
        pol = make_policy(name, check_inputs=False, backend="torch", **params)
        x, valid = distinct_logits(16, 128, seed=2), random_mask(16, 2)
        fixed = random_mask(16, 5, p_invalid=0.7) if with_fixed else None
        pol(x, spec, valid, fixed=fixed, layer=1)  # warm: caches filled outside
        with HostSyncLog() as log:
            pol(x, spec, valid, fixed=fixed, layer=1)
        assert log.found == [], (spec.scoring, log.found)


def test_engine_counters_have_no_host_synchronisation():
    """The counters the engine plugins keep run inside captured CUDA graphs with the policy (vLLM, SGLang):
    adding a step issues no op that waits for the device, with the per-expert load and per-rank counts on, and
    the load equals a plain count of the valid rows' native experts."""
    from conftest import HostSyncLog, random_mask
    from moe_reroute.serving.steps import LayerCounter

    E, T = 32, 12
    spec = RouterSpec(E, 4)
    x, valid = distinct_logits(T, E, seed=4), random_mask(T, 3)
    routing = make_policy("oea", k0=1)(x, spec, valid)
    native = make_policy("native")(x, spec, valid)
    counter = LayerCounter(torch.device("cpu"))
    counter.set_experts(E)
    counter.set_ranks(torch.arange(E) % 4, 4, "test")
    decode = torch.ones(T, dtype=torch.bool)
    counter.add(routing, native, valid, E, "decode", decode)  # first call: tensors settled on the device
    with HostSyncLog() as log:
        counter.add(routing, native, valid, E, "decode", decode)
    assert log.found == []
    want = [0] * E
    for t in range(T):
        if valid[t]:
            for e in native.ids[t].tolist():
                want[e] += 2  # two steps added
    assert counter.read_load() == want


def test_host_sync_log_sees_what_a_cuda_graph_refuses():
    """The log used above flags the ops it is meant to (so its empty lists mean something)."""
    from conftest import HostSyncLog

    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    with HostSyncLog() as log:
        x[mask]
        x[mask] = 0.0
        x.nonzero()
        x.sum().item()
        torch.bincount(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]))
        x.repeat_interleave(2)  # an int count: no sync, not flagged
        x[torch.tensor([0, 2])]  # an index tensor: no sync, not flagged
    assert log.found == ["index by a boolean mask", "index_put_ by a boolean mask", "nonzero", "_local_scalar_dense",
                         "bincount", "repeat_interleave with tensor repeats"]


def test_eager_runner_reads_its_input_buffers():
    """The runner replays on whatever was copied into its buffers (the capture contract), on CPU eagerly."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    stack, shape = _stack(L=2)
    specs = [RouterSpec(128, 8)] * 2
    pol = make_policy("oea", k0=3, check_inputs=False)
    x = torch.randn(4, shape.hidden, generator=torch.Generator().manual_seed(2))
    buf = torch.stack([distinct_logits(4, 128, seed=i) for i in range(2)])
    run = decode_step.Runner(lambda x, logits: decode_step.step(stack, x, logits, specs, [0, 1], policy=pol),
                             {"x": x, "logits": buf}, graph=False)
    new = torch.stack([distinct_logits(4, 128, seed=7 + i) for i in range(2)])
    buf.copy_(new)
    torch.testing.assert_close(run.run(), _reference_step(stack, x, new, specs, pol), rtol=1e-4, atol=1e-5)


def test_decode_step_names_the_torch_it_needs(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    with pytest.raises(SystemExit, match=r"needs torch >= 2\.8 \(torch\._grouped_mm\); this torch is"):
        decode_step.check_torch()


def test_grouped_mm_status_names_the_torch_it_needs(monkeypatch):
    from moe_reroute.measure.layer import grouped_mm_status

    layer = MoELayer(LayerShape("tiny", 8, 4, 4, 2), "cpu", torch.float32, pool=4)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    ok, why = grouped_mm_status(layer)
    assert not ok and "needs torch >= 2.8" in why


def test_bootstrap_ci_brackets_the_median():
    xs = [float(v) for v in range(1, 102)]
    lo, hi = decode_step.bootstrap_ci(xs, decode_step.median, n=300)
    assert lo <= 51 <= hi and hi - lo < 40
    assert decode_step.median([3.0, 1.0, 2.0, 10.0]) == 2.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,params", POLICIES, ids=[p[0] for p in POLICIES])
def test_decode_step_in_one_cuda_graph(name, params, backend):
    """The whole step (router, policy, grouped experts, 3 layers) captured once, replayed on new logits,
    returns what the eager step returns on them."""
    if backend == "triton":
        pytest.importorskip("triton")
    stack, shape = _stack(device="cuda", dtype=torch.bfloat16)
    specs = [RouterSpec(128, 8)] * stack.L
    pol = make_policy(name, check_inputs=False, backend=backend, **params)
    x = (torch.randn(16, shape.hidden, generator=torch.Generator().manual_seed(0)) * 0.1).to("cuda", torch.bfloat16)
    buf = torch.stack([distinct_logits(16, 128, seed=i) for i in range(stack.L)]).cuda()
    fn = lambda x, logits: decode_step.step(stack, x, logits, specs, list(range(stack.L)), policy=pol)  # noqa: E731
    run = decode_step.Runner(fn, {"x": x, "logits": buf}, graph=True)
    new = torch.stack([distinct_logits(16, 128, seed=20 + i) for i in range(stack.L)]).cuda()
    buf.copy_(new)
    got = run.run().clone()
    torch.cuda.synchronize()
    want = fn(x, new)
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------- .ci/gpu


def _ci_gpu(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    return subprocess.run(["bash", str(ROOT / ".ci" / "gpu"), *args, str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.long
def test_ci_gpu_dry_run_end_to_end(tmp_path):
    run = _ci_gpu(tmp_path, "--dry-run")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    files = sorted(out.iterdir())
    assert 1 <= len(files) <= 8 and all(f.stat().st_size < 16 * 2**20 for f in files)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["state"] == "done" and summary["ok"]
    assert [s["section"] for s in summary["sections"]] == ["tests", "warm", "routing", "layer", "decode"]
    assert all(s["status"] == "ok" for s in summary["sections"])
    decode = json.loads((out / "decode_step.json").read_text())
    got = {(r["batching"], r["B"], r["policy"]) for r in decode["results"]}
    assert got == {(b, B, p) for b in ("same-domain", "mixed") for B in (1, 4) for p in decode_step.DEFAULT_POLICIES}
    for r in decode["results"]:
        lo, hi = r["step_ms"]["ci95"]
        assert lo <= r["step_ms"]["median"] <= hi
    json.loads((out / "layer.json").read_text())
    json.loads((out / "routing.json").read_text())


def test_ci_gpu_keeps_a_benchs_json_only_when_it_ended_well(tmp_path):
    """.ci/gpu's json_of: a bench's last line becomes its result file only if the bench exited 0 and the line
    is JSON (a pipe into `tail` would hide a crash)."""
    text = (ROOT / ".ci" / "gpu").read_text()
    script = text[text.index("json_of='") + len("json_of='"):text.index("'\nexport PY=")]
    env = {**os.environ, "PY": sys.executable}
    out = tmp_path / "r.json"

    def run(*cmd):
        return subprocess.run(["bash", "-c", script, "json_of", str(out), *cmd], env=env, capture_output=True,
                              text=True, timeout=60)

    bad = run("bash", "-c", 'echo \'{"partial": 1}\'; exit 3')  # crashed after printing JSON
    assert bad.returncode == 3 and not out.exists()
    garbage = run("echo", "Traceback: not JSON")
    assert garbage.returncode == 1 and "no JSON result" in garbage.stdout and not out.exists()
    good = run("printf", 'a note\n{"ok": true}\n')
    assert good.returncode == 0 and json.loads(out.read_text()) == {"ok": True} and "a note" in good.stdout


def test_ci_gpu_section_keeps_only_a_marked_partial_result(tmp_path):
    """.ci/gpu's section(): a section that times out or fails leaves no result file; the decode bench's file,
    which says "complete": false while it is written, is kept as NAME.partial.json and listed as such."""
    text = (ROOT / ".ci" / "gpu").read_text()
    start = text.index("section() {")
    body = text[start:text.index("\n}\n", start) + 3]
    script = f"""out={tmp_path}; MAX_BYTES=1000000; sections=(); summary() {{ :; }}
{body}
section slow 1 decode_step.json bash -c 'echo "{{\\"complete\\": false}}" > {tmp_path}/decode_step.json; sleep 20'
section crash 5 layer.json bash -c 'echo "{{\\"complete\\": true}}" > {tmp_path}/layer.json; exit 3'
section fine 5 routing.json bash -c 'echo "{{}}" > {tmp_path}/routing.json'
printf '%s\\n' "${{sections[@]}}" > {tmp_path}/rows
"""
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rows = [r.split("|") for r in (tmp_path / "rows").read_text().split()]
    assert [(r[0], r[1], r[4]) for r in rows] == [
        ("slow", "timed_out", "slow.log,decode_step.partial.json"), ("crash", "failed", "crash.log"),
        ("fine", "ok", "fine.log,routing.json")]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json") == ["decode_step.partial.json",
                                                                                 "routing.json"]


def test_decode_bench_reports_each_batch_size_as_it_goes():
    """The decode bench runs batch sizes in the outer loop and hands its results so far to `progress` after
    each (batch size, batching), so a run cut short keeps what it measured."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    shape = LayerShape("tiny", 32, 16, 128, 8)
    batches = {b: decode_step.reference_batches(2, 2, 1, b) for b in decode_step.BATCHINGS}
    policies = {"native": make_policy("native", check_inputs=False), "oea:k0=3": make_policy("oea", k0=3, check_inputs=False)}
    seen = []
    out = decode_step.bench(shape, 2, [1, 2], policies, batches, torch.device("cpu"), torch.float32, repeats=1,
                            warmup=0, graph=False, log=lambda *a: None,
                            progress=lambda so_far: seen.append([(r["B"], r["batching"]) for r in so_far["results"]]))
    order = [(B, b) for B in (1, 2) for b in decode_step.BATCHINGS]
    assert seen == [[key for key in order[:i + 1] for _ in policies] for i in range(len(order))]
    assert [(r["B"], r["batching"]) for r in out["results"]] == seen[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_ci_gpu_without_cuda_says_so_and_exits_2(tmp_path):
    run = _ci_gpu(tmp_path)
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr and "--dry-run" in run.stderr
