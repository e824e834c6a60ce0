"""`moe-reroute bench`: the MoE layer's kernels against a plain loop, U read per step, the cost model,
expert-parallel U, policy specs and the command line. Tiny shapes on CPU; no timing assertions."""

from __future__ import annotations

import json

import pytest
import torch

from moe_reroute import RouterSpec, make_policy, metrics
from moe_reroute.cli import main
from moe_reroute.contract import Routing
from moe_reroute.measure import bench, costmodel
from moe_reroute.measure.shapes import SHAPES, LayerShape, custom_shape, get_shape
from moe_reroute.policies.spec import parse_policy_spec, policy_from_spec
from moe_reroute.traces import Trace

SHAPE = LayerShape("tiny", 32, 16, 16, 4)  # H, I, E, K
FAKE_BW = bench.Bandwidth(10.0, "not measured (test)")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_routing(T: int, seed: int, E: int = 16, K: int = 4) -> Routing:
    """Distinct experts per token, the last slot a weight-0 repeat of the first, a quarter invalid rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K]
    weights = torch.rand(T, K, generator=g)
    ids[:, -1], weights[:, -1] = ids[:, 0], 0.0
    valid = torch.rand(T, generator=g) >= 0.25
    valid[0] = True
    return Routing(weights, ids, valid)


def dense_reference(layer: bench.MoELayer, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[T, H] float32. Algorithm:
    1. For every valid token t and every slot k: expert e = ids[t, k], its weights in slot e mod P.
    2. h = gate_up[e] @ x[t]; split into gate and up; y = down[e] @ (silu(gate) * up).
    3. out[t] += weights[t, k] * y. Invalid tokens stay 0.
    """
    out = torch.zeros(x.shape[0], layer.shape.hidden)
    valid = routing.valid if routing.valid is not None else torch.ones(x.shape[0], dtype=torch.bool)
    for t in range(x.shape[0]):
        if not valid[t]:
            continue
        for k in range(routing.ids.shape[1]):
            slot = int(routing.ids[t, k]) % layer.pool
            gate, up = (layer.gate_up[slot].float() @ x[t].float()).chunk(2)
            out[t] += float(routing.weights[t, k]) * (layer.down[slot].float() @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("pool", [None, 5], ids=["all-experts", "aliased-pool"])
@pytest.mark.parametrize("kernel", bench.KERNELS)
def test_kernels_equal_dense_reference(kernel, pool):
    layer = bench.MoELayer(SHAPE, "cpu", pool=pool)
    for seed in range(3):
        routing = random_routing(9, seed)
        x = torch.randn(9, SHAPE.hidden, generator=torch.Generator().manual_seed(seed))
        want = dense_reference(layer, x, routing)
        got = layer.forward(x, routing, kernel)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not got[~routing.valid].any(), "invalid rows must stay zero"


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs a CUDA device")])])
def test_timed_calls_compute_each_steps_layer(device):
    """What `bench` times: on CUDA with the grouped kernel a replay of each step's CUDA graph, elsewhere the
    eager forward; either way each call computes that step's layer output, checked after every call was made
    (graphs replayed in turn do not overwrite each other's outputs)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = bench.MoELayer(SHAPE, device, dtype, seed=0)
    prepared = {}
    for name, seed in (("a", 1), ("b", 2)):
        steps = []
        for s in range(2):
            r = random_routing(6, seed * 10 + s)
            r = Routing(r.weights.to(device), r.ids.to(device))
            x = (torch.randn(6, SHAPE.hidden, generator=torch.Generator().manual_seed(s)) * 0.5).to(device, dtype)
            steps.append((x, r))
        prepared[name] = steps
    calls, how = bench.timed_calls(layer, prepared, "grouped_mm")
    assert ("CUDA graph" in how) == (device == "cuda")
    got = {name: [call() for call in calls[name]] for name in prepared}
    if device == "cuda":
        torch.cuda.synchronize()
    for name, steps in prepared.items():
        for (x, r), out in zip(steps, got[name]):
            want = dense_reference(layer, x.cpu(), Routing(r.weights.cpu(), r.ids.cpu()))
            torch.testing.assert_close(out.float().cpu(), want, rtol=2e-2 if device == "cuda" else 1e-4,
                                       atol=2e-2 if device == "cuda" else 1e-5)


def test_aliasing_is_stated():
    assert bench.MoELayer(SHAPE, "cpu").aliasing is None
    assert "slot e mod 5" in bench.MoELayer(SHAPE, "cpu", pool=5).aliasing


@pytest.mark.parametrize("kernel", bench.KERNELS)
def test_layer_reads_only_the_used_experts(kernel):
    layer = bench.MoELayer(SHAPE, "cpu")
    routing = random_routing(6, seed=4)
    used = metrics.used_experts(routing, SHAPE.num_experts)  # [E]
    layer.gate_up[~used] = float("nan")
    layer.down[~used] = float("nan")
    out = layer.forward(torch.randn(6, SHAPE.hidden), routing, kernel)
    assert torch.isfinite(out).all(), "an expert outside the routing was computed"
    if kernel == "loop":
        assert layer.last_read == used.nonzero().flatten().tolist()
        assert len(layer.last_read) == int(metrics.unique_experts(routing, SHAPE.num_experts))


def test_bench_policies_reports_u_of_each_policy():
    policies = {"native": make_policy("native"), "cap:k=2": make_policy("cap", k=2), "oea:k0=1": make_policy("oea", k0=1)}
    routings = bench.uniform_routings(policies, SHAPE, batch_size=5, steps=2, seed=3)
    routings["native"][1] = Routing(routings["native"][1].weights, routings["native"][1].ids,
                                    torch.tensor([True, False, True, True, False]))
    result = bench.bench_policies(SHAPE, routings, "cpu", repeats=2, warmup=1, kernel="auto", progress=False,
                                  flush=False, bandwidth=FAKE_BW)
    assert list(result.policies) == list(policies)
    assert result.kernel in bench.KERNELS
    for name, timing in result.policies.items():
        us = [int(metrics.unique_experts(r, SHAPE.num_experts)) for r in routings[name]]
        assert [p[0] for p in timing.points] == us
        assert timing.mean_unique == pytest.approx(sum(us) / len(us))
        assert timing.bytes_per_step == pytest.approx(sum(us) / len(us) * SHAPE.bytes_per_expert(torch.float32))
        assert timing.samples == 2 * 2
    assert result.policies["native"].points[1][1] == 3 * SHAPE.top_k  # T·K counts valid tokens only
    assert result.policies["native"].ratio_vs_native == 1.0
    json.dumps(result.to_dict())


def test_bench_policies_rejects_uneven_steps():
    policies = {"native": make_policy("native")}
    routings = bench.uniform_routings(policies, SHAPE, 4, 2)
    with pytest.raises(ValueError, match="same, non-zero number of steps"):
        bench.bench_policies(SHAPE, {"native": routings["native"], "other": routings["native"][:1]}, "cpu",
                             progress=False, bandwidth=FAKE_BW)


def test_cost_model_recovers_exact_coefficients():
    b, a, c = 0.02, 0.0015, 0.07
    points = [(u, tk, b * u + a * tk + c) for u in (8, 20, 33, 60) for tk in (4, 32, 128)]
    model = costmodel.fit_cost_model(points)
    assert (model.b, model.a, model.c) == pytest.approx((b, a, c), rel=1e-9)
    assert model.r2 == pytest.approx(1.0, abs=1e-12)
    assert model.max_rel_err < 1e-9 and model.unidentified == ()
    assert model.predict(10, 64) == pytest.approx(b * 10 + a * 64 + c)


def test_cost_model_says_when_a_term_is_not_identifiable():
    model = costmodel.fit_cost_model([(u, 128, 0.5 * u + 3) for u in (10, 20, 40)])
    assert model.unidentified == ("a",) and model.a == 0.0
    assert (model.b, model.c) == pytest.approx((0.5, 3 + 0.0), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        costmodel.fit_cost_model([(1, 2, 3)])


def test_bandwidth_bounds():
    assert costmodel.bandwidth_bound_ms(10, 1_000_000, 2000.0) == pytest.approx(10 * 1e6 / 2e12 * 1e3)
    assert costmodel.hardware_bound_ms(4, 3_350_000, "h100") == pytest.approx(4e-3)
    assert costmodel.hardware_bound_ms(2, 10**9, "cpu", measured_gbps=10.0) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="known: h100"):
        costmodel.hardware_bound_ms(1, 1, "tpu")


def test_expert_parallel_by_hand():
    # E=8 over D=2: experts 0-3 on rank 0, 4-7 on rank 1. The invalid last row does not count.
    routing = Routing(torch.ones(3, 2), torch.tensor([[0, 1], [2, 5], [6, 7]]), torch.tensor([True, True, False]))
    assert costmodel.ep_max_unique(routing, 8, 2) == 3  # rank 0 holds {0, 1, 2}, rank 1 {5}
    model = costmodel.CostModel(b=1.0, a=0.5, c=0.25, r2=1.0, mean_rel_err=0.0, max_rel_err=0.0, points=0)
    # rank 0: U=3, 3 slots -> 3 + 1.5 + 0.25; rank 1: U=1, 1 slot -> 1.75
    assert costmodel.ep_predict(routing, 8, 2, model) == pytest.approx(4.75)


def test_routings_from_trace_spreads_steps_and_checks_the_shape():
    g = torch.Generator().manual_seed(0)
    spec = RouterSpec(16, 4)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2] = False
    trace = Trace({0: torch.randn(3, 4, 16, generator=g), 2: torch.randn(3, 4, 16, generator=g)}, valid,
                  {0: spec, 2: spec})
    policy = make_policy("oea", k0=2)
    out = bench.routings_from_trace(trace, {"oea": policy}, batch_size=2, steps=5, shape=SHAPE)
    assert len(out["oea"]) == 5
    batched = trace.rebatch(2)  # steps 0..5 (2 groups x 3 steps); steps 2 and 5 have no valid token
    # valid (step, layer) pairs: (0,0) (0,2) (1,0) (1,2) (3,0) (3,2) (4,0) (4,2); 5 spread evenly over the 8:
    # indices round(0, 1.75, 3.5, 5.25, 7) = 0, 2, 4, 5, 7 -> (0,0) (1,0) (3,0) (3,2) (4,2)
    for i, (step, layer) in enumerate([(0, 0), (1, 0), (3, 0), (3, 2), (4, 2)]):
        want = policy(batched.logits[layer][step], spec, batched.valid[step], layer=layer)
        assert torch.equal(out["oea"][i].ids, want.ids)
    with pytest.raises(ValueError, match="--routing uniform"):
        bench.routings_from_trace(trace, {"oea": policy}, 2, 5, shape=get_shape("qwen3-30b-a3b"))


def test_shapes():
    assert get_shape("qwen3-30b-a3b").bytes_per_expert(torch.bfloat16) == 3 * 2048 * 768 * 2
    assert SHAPES["reference"].layer_bytes(torch.float32) == 128 * 3 * 192 * 56 * 4
    assert custom_shape("32,16,16,4") == LayerShape("custom-32x16x16x4", 32, 16, 16, 4)
    with pytest.raises(ValueError, match="H,I,E,K"):
        custom_shape("32,16,16")
    with pytest.raises(ValueError, match="top_k K=9 > num_experts E=8"):
        custom_shape("32,16,8,9")
    with pytest.raises(ValueError, match="known shapes: qwen3-30b-a3b"):
        get_shape("qwen4")


def test_policy_spec_parser():
    assert parse_policy_spec("native") == ("native", {})
    assert parse_policy_spec("oea:k0=3,p=0.9") == ("oea", {"k0": 3, "p": 0.9})
    assert parse_policy_spec("oea:k0=[2,3,3,4]") == ("oea", {"k0": [2, 3, 3, 4]})
    assert parse_policy_spec("cap:schedule=(2,4,8,3),num_layers=48") == ("cap", {"schedule": (2, 4, 8, 3), "num_layers": 48})
    assert parse_policy_spec("cap:k=4,renormalize=false") == ("cap", {"k": 4, "renormalize": False})
    assert parse_policy_spec("sere:similarity=sim.safetensors") == ("sere", {"similarity": "sim.safetensors"})
    for bad, message in [("", "empty policy spec"), ("magic:k=1", "unknown policy 'magic'"),
                         ("oea:k0", "not param=value"), ("oea:k0=3,k0=4", "given twice"),
                         ("oea:k0=[1,2", "unclosed bracket"), ("oea:", "nothing after ':'"),
                         ("oea:k0=[[1]]", "nested lists")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
            parse_policy_spec(bad)
    with pytest.raises(ValueError, match="its parameters are: k0"):
        policy_from_spec("oea:k=3")


def test_cli_bench_json(capsys):
    code = main(["bench", "--dims", "32,16,16,4", "--routing", "uniform", "--repeats", "2", "--warmup", "1",
                 "--steps", "2", "--batch-sizes", "2,4", "--device", "cpu", "--no-progress", "--ep", "2", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # stdout holds the JSON alone: `bench --json > FILE` is a JSON file
    assert "batch 4:" in captured.err and "cost model over batch sizes [2, 4]" in captured.err  # the tables
    assert out["routing"] == "routing: random logits, not a trace"
    assert set(out["results"]) == {"2", "4"}
    policies = out["results"]["4"]["policies"]
    assert list(policies) == ["native", "cap:k=4", "oea:k0=3"]  # budget:budget=32 > E=16: skipped, said so
    assert any("budget:budget=32 skipped" in n for n in out["notes"])
    assert {"b", "a", "c", "r2"} <= set(out["cost_model"])
    assert len(out["ep"]) == 2 * 3 and len(out["predictions"]) == 2 * 3


@pytest.mark.parametrize("argv,message", [
    (["--shape", "qwen4"], "unknown shape 'qwen4'"),
    (["--dims", "32,16"], "four positive integers H,I,E,K"),
    (["--shape", "reference", "--dims", "32,16,16,4"], "not both"),
    (["--dims", "32,16,16,4", "--policy", "magic:k=1"], "unknown policy 'magic'"),
    (["--dims", "32,16,16,4", "--policy", "oea:k0=9"], "oea k0=9 > the model's K=4"),
    (["--dims", "32,16,16,4", "--batch-sizes", "4,x"], "--batch-sizes"),
])
def test_cli_bench_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--routing", "uniform", "--device", "cpu", *argv])
    assert message in str(e.value)


def test_cli_bench_records_the_reference_trace(monkeypatch, capsys):
    from tiny_models import tiny_model, tiny_tokenizer

    import moe_reroute.reference as reference

    text = "\n\n".join(["Shall I compare thee to a summer's day? Thou art more lovely and more temperate."] * 4)
    monkeypatch.setattr(reference, "load", lambda dtype=None: (tiny_model("qwen3_moe"), tiny_tokenizer(), text))
    from moe_reroute.reference.corpus import Document

    monkeypatch.setattr(reference, "heldout_documents", lambda: [Document("a", "x", text), Document("b", "y", text)])
    trace = bench.reference_trace(batch_size=4, steps=8)
    assert (trace.batch_size, trace.steps, trace.layers) == (4, 8, [0, 1])
    main(["bench", "--dims", "32,16,16,4", "--policy", "oea:k0=2", "--batch-sizes", "2,4", "--steps", "3",
          "--repeats", "1", "--warmup", "0", "--device", "cpu", "--no-progress", "--kernel", "loop", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["routing"].startswith("routing: trace of the shipped reference model")
    assert list(out["results"]["4"]["policies"]) == ["native", "oea:k0=2"]


def test_cli_bench_without_reference_model_asks_for_a_trace(monkeypatch):
    import moe_reroute.reference as reference

    def missing(dtype=None):
        raise FileNotFoundError("the reference model files are not here")

    monkeypatch.setattr(reference, "load", missing)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--dims", "32,16,16,4", "--device", "cpu"])
    assert "--trace PATH" in str(e.value) and "--routing uniform" in str(e.value)


def test_routing_bench_times_every_policy_on_both_backends(capsys):
    """`bench --routing`: a row per policy and backend and the model's router, launches of the fused path
    (the kernels run through the interpreter here), and JSON whose entries match the table."""
    code = main(["bench", "--routing", "--batch-sizes", "1,4", "--experts", "16", "--repeats", "1", "--calls", "1",
                 "--no-layer", "--no-progress", "--policy", "oea:k0=2", "--policy", "budget:budget=4", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # the JSON alone on stdout, the table on stderr
    labels = {t["label"] for t in data["timings"]}
    assert {"native [torch]", "oea:k0=2 [torch]", "budget:budget=4 [torch]", "model router (torch softmax+topk)"} <= labels
    assert {t["tokens"] for t in data["timings"]} == {1, 4} and {t["experts"] for t in data["timings"]} == {16}
    assert all(t["median_us"] > 0 for t in data["timings"])
    fused = [t for t in data["timings"] if t["backend"] == "triton"]
    if fused:  # Triton importable: the kernels were timed too, one launch per call at this size
        assert {t["label"] for t in fused} == {"native [triton]", "oea:k0=2 [triton]", "budget:budget=4 [triton]"}
        assert all(t["launches"] == 1 for t in fused)
    for label in labels:
        assert label in captured.err  # every entry is a table row


def test_routing_bench_refuses_layer_options():
    with pytest.raises(SystemExit) as e:
        main(["bench", "--routing", "--shape", "deepseek-v3"])
    assert "--routing times the routing call alone" in str(e.value)


def test_bench_threads_are_set_for_the_run_and_restored(monkeypatch, capsys):
    """--threads N: torch runs N threads during the bench (seen by the layer's forward), and its own number after."""
    import torch

    from moe_reroute.measure import bench as measure_bench

    seen = []
    forward = measure_bench.MoELayer.forward
    monkeypatch.setattr(measure_bench.MoELayer, "forward",
                        lambda self, *a, **k: seen.append(torch.get_num_threads()) or forward(self, *a, **k))
    before = torch.get_num_threads()
    assert main(["bench", "--dims", "32,16,16,4", "--routing", "uniform", "--repeats", "1", "--warmup", "0",
                 "--steps", "1", "--device", "cpu", "--no-progress", "--kernel", "loop", "--threads", "1"]) == 0
    assert seen and set(seen) == {1} and torch.get_num_threads() == before
    with pytest.raises(SystemExit) as e:
        main(["bench", "--routing", "uniform", "--device", "cpu", "--threads", "0"])
    assert "--threads must be >= 1, got 0" in str(e.value)


def test_busy_note_says_when_threads_would_share_cores(monkeypatch):
    import os

    from moe_reroute.cli.bench import busy_note

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert busy_note(torch.device("cpu"), 4) is None  # idle: a thread per core is fine
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    note = busy_note(torch.device("cpu"), 4)
    assert "load average 2.0 on 4 cores" in note and "--threads 2" in note
    assert busy_note(torch.device("cpu"), 2) is None  # 2 + 2 threads fit the 4 cores
    assert busy_note(torch.device("cuda"), 4) is None  # the GPU's time does not share the CPU's cores


def test_routing_options_without_routing_are_refused(capsys):
    """--experts, --calls and --no-layer belong to `bench --routing`; on the layer bench they would be ignored."""
    from cli_helpers import bad_input

    bad_input(capsys, ["bench", "--experts", "64", "--calls", "5"], "--experts, --calls apply to --routing")
    bad_input(capsys, ["bench", "--no-layer"], "--no-layer applies to --routing")
    bad_input(capsys, ["bench", "--routing", "--calls", "0"], "--calls must be >= 1, got 0")


def test_layer_options_with_routing_are_refused(capsys):
    """--steps, --warmup, --kernel and --no-flush time the MoE layer; `bench --routing` would ignore them."""
    from cli_helpers import bad_input

    bad_input(capsys, ["bench", "--routing", "--steps", "3", "--warmup", "1"], "--steps, --warmup time the MoE layer")
    bad_input(capsys, ["bench", "--routing", "--kernel", "loop"], "--kernel times the MoE layer")
