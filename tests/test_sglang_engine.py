"""The SGLang plugin in SGLang's own engine on CPU (SGLang 0.5.23, `.ci/sglang` builds the environment).

One engine serves the shipped reference model (float32, chunked prefill of 16 tokens with mixed steps)
with the plugin active, its counters on; the tests switch its policy between runs over SGLang's
`collective_rpc` (`moe_reroute_set_policy`) so that one start-up serves them all. Outputs are checked
against transformers (greedy, the same token ids in), routing against the policy called on the logits
the hook recorded. The HTTP server runs twice: with the plugin installed and no policy set, and with its
policy switched and its counters read over SGLang's `/dumper/` route; the
fail-closed cases start engines in child processes, since a failing SGLang scheduler signals its parent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch

sglang = pytest.importorskip("sglang", reason="SGLang is not installed (.ci/sglang builds its environment)")

from moe_reroute import RouterSpec, reference  # noqa: E402
from moe_reroute.contract import Routing  # noqa: E402
from moe_reroute.policies.spec import policy_from_spec  # noqa: E402
from moe_reroute.serving.distinct import distinct_ids, has_repeats  # noqa: E402
from moe_reroute.sglang.model import needs_untying, untied_copy  # noqa: E402

NEW = 8  # tokens generated per prompt
CHUNK = 16  # chunked_prefill_size: prompts longer than this prefill in chunks, beside running decodes
SERE = str(reference.path() / "sere" / "similarity.safetensors")
POLICIES = ["oea:k0=[2,2,3,2]", "cap:k=4", f"sere:similarity={SERE}", "budget:budget=4"]
# no radix cache: every run prefills its prompts afresh, so each run's chunked prefill makes mixed steps
ENGINE_ARGS = dict(device="cpu", attention_backend="torch_native", disable_cuda_graph=True, mem_fraction_static=0.3,
                   dtype="float32", skip_server_warmup=True, max_total_tokens=4096, log_level="error",
                   disable_radix_cache=True)


def prompts() -> list[list[int]]:
    """Three prompts of mixed lengths (5, 23, 41 tokens) from the held-out text."""
    _, tokenizer, text = reference.load()
    ids = tokenizer(text[:4000])["input_ids"]
    return [ids[:5], ids[100:123], ids[300:341]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    assert needs_untying(reference.path())
    return untied_copy(reference.path(), tmp_path_factory.mktemp("sglang") / "model")


@pytest.fixture(scope="module")
def hf():
    model, _, _ = reference.load()
    return model


def hf_generate(model, ids: list[int], policy: str | None = None) -> list[int]:
    """transformers' greedy tokens for one prompt (batch of one), re-routed by `policy` on decode steps."""
    from moe_reroute.hf import apply

    handle = apply(model, policy_from_spec(policy), phase="decode") if policy else None
    try:
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    finally:
        if handle is not None:
            handle.remove()
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def engine(model_dir):
    env = {"SGLANG_USE_CPU_ENGINE": "1", "MOE_REROUTE_POLICY": "native", "MOE_REROUTE_COUNTERS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    llm = sglang.Engine(model_path=str(model_dir), chunked_prefill_size=CHUNK, enable_mixed_chunk=True, **ENGINE_ARGS)
    try:
        yield llm
    finally:
        llm.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(llm, policy: str, batch: list[list[int]], tmp_path: Path, record: bool = False) -> tuple[list[list[int]], dict]:
    """Generate greedily with `policy` in the shared engine; (output ids per prompt, saved plugin state)."""
    llm.collective_rpc("moe_reroute_set_policy", policy=policy)
    llm.collective_rpc("moe_reroute_record", on=record)
    out = llm.generate(input_ids=batch, sampling_params={"max_new_tokens": NEW, "temperature": 0.0, "ignore_eos": True})
    path = tmp_path / "state.pt"
    llm.collective_rpc("moe_reroute_save", path=str(path))
    llm.collective_rpc("moe_reroute_record", on=False)
    return [o["output_ids"] for o in out], torch.load(path, weights_only=False)


def test_reference_model_in_sglang_generates_what_transformers_generates(engine, hf, tmp_path):
    batch = prompts()
    got, state = run(engine, "native", batch, tmp_path)
    assert got == [hf_generate(hf, ids) for ids in batch]
    kinds = {k for c in state["counters"].values() for k, n in c["steps_by_kind"].items() if n}
    assert {"decode", "mixed"} <= kinds  # chunked prefill mixed the long prompts' chunks with decodes


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_reroutes_every_decode_step_and_generates_what_it_implies(engine, hf, tmp_path, policy):
    ids = prompts()[1]
    got, state = run(engine, policy, [ids], tmp_path)
    counters = state["counters"]
    assert len(counters) == 4  # every MoE layer of the reference model
    for c in counters.values():
        assert c["decode_tokens_total"] == NEW - 1 and c["decode_tokens_rerouted_total"] == NEW - 1
        assert c["unique"] < c["unique_native"]
    assert got[0] == hf_generate(hf, ids, policy)
    assert got[0] != hf_generate(hf, ids)  # the routing visibly matters on this model


def test_recorded_routing_is_the_policy_on_each_steps_logits(engine, tmp_path):
    policy = "oea:k0=2"
    got, state = run(engine, policy, prompts(), tmp_path, record=True)
    records = state["records"]
    spec = RouterSpec(128, 8)
    fn = policy_from_spec(policy)
    kinds = {r["kind"] for r in records}
    assert {"decode", "mixed"} <= kinds
    repeats = 0
    for r in records:
        fixed = r["fixed"]
        want = fn(r["logits"], spec, layer=r["moe_layer"], fixed=fixed)
        repeats += int(has_repeats(want.ids).sum())
        want = distinct_ids(want, 128)
        assert torch.equal(r["ids"], want.ids), r["kind"]
        torch.testing.assert_close(r["weights"], want.weights)
        if fixed is not None:  # prefill rows of a mixed step keep native routing
            native = policy_from_spec("native")(r["logits"], spec)
            assert torch.equal(r["ids"][fixed].sort(-1).values, native.ids[fixed].sort(-1).values)
    assert repeats > 0  # dropped slots were made distinct on the way into SGLang's MoE
    decode = sum(c["decode_tokens_total"] for c in state["counters"].values())
    rerouted = sum(c["decode_tokens_rerouted_total"] for c in state["counters"].values())
    assert decode > 0 and rerouted / decode >= 0.95


def hf_generate_switching(model, ids: list[int], policies: list[str]) -> list[int]:
    """transformers' greedy tokens for one prompt, stepped by hand: the prompt natively, then decode step i
    (the forward of generated token i + 1) re-routed by policies[i] ("native": not re-routed)."""
    import inspect

    from moe_reroute.hf import apply

    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        for policy in policies:
            handle = apply(model, policy_from_spec(policy), phase="decode") if policy != "native" else None
            try:
                out = model(torch.tensor([[tokens[-1]]]), **{cache_arg: out.past_key_values}, use_cache=True)
            finally:
                if handle is not None:
                    handle.remove()
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def test_ab_plan_switches_the_policy_between_decode_steps_in_the_engine(engine, hf, tmp_path):
    """serve-bench --engine sglang's plan: decode step i runs plan[i]'s policy, switched inside the scheduler;
    the tokens are transformers' with the same switches, and every step is recorded with its policy."""
    ids = prompts()[1]  # 23 tokens: two prefill chunks of at most 16, then NEW - 1 decode steps
    decode = ["native", "native", "cap:k=4", "cap:k=4", "oea:k0=2", "native"]  # the last decode step: past the plan
    plan = [[i // 2, p] for i, p in enumerate(decode[:-1])]
    engine.collective_rpc("moe_reroute_ab_plan", policies=["cap:k=4", "oea:k0=2"], plan=plan)
    out = engine.generate(input_ids=[ids], sampling_params={"max_new_tokens": NEW - 1, "temperature": 0.0,
                                                           "ignore_eos": True})
    path = tmp_path / "ab.json"
    engine.collective_rpc("moe_reroute_ab_save", path=str(path))
    steps = json.loads(path.read_text())["steps"]
    assert [(s["kind"], s["policy"]) for s in steps] == [("prefill", "native")] * 2 + [("decode", p) for p in decode]
    assert [s["round"] for s in steps[2:]] == [0, 0, 1, 1, 2, None]
    assert out[0]["output_ids"] == hf_generate_switching(hf, ids, decode)
    assert out[0]["output_ids"] != hf_generate_switching(hf, ids, ["native"] * len(decode))  # the switches mattered
    # after the plan, the engine's policy is the one set before it (native): SGLang's own tokens again
    again, _ = run(engine, "native", [ids], tmp_path)
    assert again[0] == hf_generate(hf, ids)


def test_serve_bench_on_sglang_measures_every_policy_in_one_engine(tmp_path, short_tmp):
    """`moe-reroute serve-bench --engine sglang`, as a user runs it, on the shipped reference model, tensor
    parallel (`-tp 2`: SGLang's `tp_size`, two scheduler processes of one core each, which follow the plan and
    write the counters alike). The engine's IPC sockets (SGLang leaves them in the temporary folder) go with
    the temporary folder serve-bench gave it."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "moe_reroute.cli", "serve-bench", "--engine", "sglang", "--policy", "oea:k0=2",
           "--policy", "cap:k=4", "--batch-sizes", "2", "--output-len", "10", "--repeats", "2", "--block-steps", "1",
           "--threads", "1", "-tp", "2", "--engine-arg", "watchdog_timeout=600", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_REROUTE_")}
    env["SGLANG_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank (this machine has one NUMA node)
    env["TMPDIR"] = str(short_tmp)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not list(short_tmp.iterdir())
    assert "untied copy" in done.stdout and "| 2 | `oea:k0=2` |" in done.stdout
    data = json.loads((out / "results.json").read_text())
    c = data["conditions"]
    assert c["engine"] == "sglang" and c["engine_version"].startswith("0.5.") and c["method"] == "ab"
    assert c["threads"] == "1 (--threads); SGLANG_CPU_OMP_THREADS_BIND=0|1"
    assert c["engine_args"] == {"tp_size": 2, "watchdog_timeout": 600}
    rows = {r["policy"]: r for r in data["rows"]}
    assert set(rows) == {"native", "oea:k0=2", "cap:k=4"}
    for p in ("oea:k0=2", "cap:k=4"):
        assert rows[p]["unique"] < rows[p]["unique_native"] and rows[p]["tpot_ratio"] > 0
        lo, hi = rows[p]["tpot_ratio_ci"]
        assert lo <= rows[p]["tpot_ratio"] <= hi
    # the steps timed are the schedule drawn from the seed: 8 decode steps timed per generation (the last
    # has no next start), 2 rounds of 3 one-step blocks, every policy once per round
    import random

    from moe_reroute.measure.engine_run import ab_schedule

    run_ = data["runs"][0]
    rng = random.Random(0)
    want = [ab_schedule(data["policies"], 8, 1, rng) for _ in range(2)]
    got = [[(s["round"], s["policy"]) for s in run_["steps"] if s["generation"] == g] for g in range(2)]
    assert got == want
    assert all(s["s"] >= s["forward_s"] > 0 for s in run_["steps"])
    assert (out / "report.md").read_text().count("SGLang 0.5.") >= 1


def test_serve_bench_engine_args_are_sglang_s_own(tmp_path):
    """`--engine-arg` names are checked against the installed SGLang's ServerArgs before any engine starts; the
    arguments serve-bench sets itself are real ones (so refusing them refuses what the engine would take)."""
    from moe_reroute.measure import serve_bench as sb
    from moe_reroute.reference import path as reference_path

    fields = sb.engine_arg_fields("sglang")
    assert set(sb.OWN_ENGINE_ARGS["sglang"]) <= set(fields) and sb.TP_ARG["sglang"] in fields
    cfg = sb.Config(model=str(reference_path()), policies=[], batch_sizes=[2], engine="sglang",
                    engine_args={"tp_sise": 2})
    with pytest.raises(sb.BenchError, match="not an argument of SGLang's engine; did you mean tp_size"):
        sb.run(cfg, tmp_path / "o", "test")
    assert not (tmp_path / "o").exists()


def test_distinct_ids_pass_sglang_native_moe_and_repeated_ids_do_not():
    """SGLang's native MoE (CPU) against a plain loop: the contract's repeated ids break it, distinct ids
    give the plain loop's output."""
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    g = torch.Generator().manual_seed(0)
    E, K, H, I, T = 16, 4, 8, 6, 5
    layer = torch.nn.Module()
    layer.num_experts = E
    layer.w13_weight = torch.randn(E, 2 * I, H, generator=g)
    layer.w2_weight = torch.randn(E, H, I, generator=g)
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    logits[:, 3] += 10  # every token's top-1 is expert 3: OEA with k0=1 loads only it, so rows repeat it
    routing = policy_from_spec("oea:k0=1")(logits, RouterSpec(E, K))
    assert has_repeats(routing.ids).any()

    def loop(r: Routing) -> torch.Tensor:
        out = torch.zeros(T, H)
        for t in range(T):
            for k in range(K):
                e = int(r.ids[t, k])
                gate, up = (layer.w13_weight[e] @ x[t]).split(I)
                out[t] += r.weights[t, k] * (layer.w2_weight[e] @ (torch.nn.functional.silu(gate) * up))
        return out

    cfg = MoeRunnerConfig(activation="silu")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        moe_forward_native(layer, x, StandardTopKOutput(routing.weights, routing.ids, logits), cfg)
    d = distinct_ids(routing, E)
    got = moe_forward_native(layer, x, StandardTopKOutput(d.weights, d.ids, logits), cfg)
    torch.testing.assert_close(got, loop(routing), rtol=1e-4, atol=1e-4)


def test_a_policy_keeps_the_top_k_out_of_kernels_that_route_inside(monkeypatch, caplog):
    """SGLang's own TopK.bind_runner_backend (0.5.23), with the plugin's hooks put in place by SGLang's own
    hook wrappers: a FlashInfer TRT-LLM layer would route inside its kernel (top-k format BYPASSED) and never
    call select_experts; with a policy set it gets the STANDARD format, SGLang's path for routing that kernel
    cannot express, so select_experts, and the policy, run. The triton-kernels backend has no such path: it
    keeps its format, and the plugin warns once. Without a policy every answer is SGLang's."""
    import logging
    import types

    import moe_reroute.sglang.plugin as plugin
    from moe_reroute.serving import config as plugin_config
    from sglang.srt.layers.moe import topk as topk_mod
    from sglang.srt.layers.moe.utils import MoeRunnerBackend
    from sglang.srt.plugins.hook_registry import HookType, _wrap_fn

    monkeypatch.setattr(topk_mod, "_can_bypass_trtllm_routing",
                        _wrap_fn(topk_mod._can_bypass_trtllm_routing, plugin.route_outside_kernel, HookType.AROUND))
    monkeypatch.setattr(topk_mod.TopK, "bind_runner_backend",
                        _wrap_fn(topk_mod.TopK.bind_runner_backend, plugin.note_kernel_routing, HookType.AFTER))

    def bind(backend, layer=3):  # a TopK's state as its __init__ leaves it (which needs a running model)
        topk = types.SimpleNamespace(topk_config=topk_mod.TopKConfig(top_k=4, renormalize=True),
                                     _runner_backend_bound=False, is_fp4_experts=False, layer_id=layer)
        topk_mod.TopK.bind_runner_backend(topk, backend, routing_method_type=topk_mod.RoutingMethodType.Renormalize)
        return topk.topk_config.output_format.name

    monkeypatch.setattr(plugin, "STATE", plugin.State())  # no policy: SGLang's formats
    native = [bind(b) for b in (MoeRunnerBackend.FLASHINFER_TRTLLM, MoeRunnerBackend.TRITON_KERNELS,
                                MoeRunnerBackend.TRITON)]
    assert native == ["BYPASSED", "TRITON_KERNEL", "STANDARD"]
    plugin.STATE.hook = plugin.SelectExpertsHook(plugin_config.parse("oea:k0=2"))
    with caplog.at_level(logging.WARNING, logger="sglang.moe_reroute"):
        assert bind(MoeRunnerBackend.FLASHINFER_TRTLLM) == "STANDARD" and bind(MoeRunnerBackend.TRITON) == "STANDARD"
        assert bind(MoeRunnerBackend.TRITON_KERNELS, layer=5) == "TRITON_KERNEL"
        assert bind(MoeRunnerBackend.TRITON_KERNELS, layer=6) == "TRITON_KERNEL"
    lines = [r.getMessage() for r in caplog.records if r.name == "sglang.moe_reroute"]
    assert len(lines) == 1 and "decoder layer 5" in lines[0] and "TRITON_KERNEL" in lines[0] and "oea" in lines[0]


def test_check_reports_the_installed_sglang(monkeypatch):
    """`moe-reroute check` beside SGLang 0.5.23: supported, its seams as the plugin expects, the plugin's entry
    point declared; a release line the plugin does not know is a problem."""
    from moe_reroute.serving import check

    row = check.engine_row("sglang")
    assert (row.what, row.found, row.status) == ("SGLang", "0.5.23", check.OK) and "entry point" in row.note
    monkeypatch.setattr(check, "installed", lambda dist: "0.6.0" if dist == "sglang" else None)
    row = check.engine_row("sglang")
    assert row.status == check.PROBLEM and "SGLang 0.6.0 is not supported" in row.note


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, env: dict, log: Path, *args: str) -> subprocess.Popen:
    """SGLang's HTTP server (`python -m sglang.launch_server`, more arguments in `args`) on the CPU, its output
    in `log`, once it answers /health."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
           "--mem-fraction-static", "0.3", "--dtype", "float32", "--max-total-tokens", "4096", "--skip-server-warmup",
           *args]
    with open(log, "wb") as f:
        server = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    try:
        while True:
            assert server.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        return server
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 300 s"
            time.sleep(2)
    except BaseException:
        stop_server(server)
        raise


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()


def test_http_server_with_the_plugin_installed_and_no_policy_serves_natively(model_dir, hf, tmp_path):
    """No policy: SGLang's own routing; on the `/dumper/` route the plugin's methods say how to make it active."""
    from transformers import PreTrainedTokenizerFast

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_REROUTE_")}
    env.update({"SGLANG_USE_CPU_ENGINE": "1", "DUMPER_SERVER_PORT": "reuse"})
    server = start_server(model_dir, port, env, tmp_path / "server.log")
    try:
        status, answer = _post(port, "/dumper/moe_reroute_set_policy", {"policy": "cap:k=2"})
        assert status == 400 and "start it with MOE_REROUTE_POLICY=native" in " ".join(answer["error"]), answer
        ids = prompts()[2]
        status, out = _post(port, "/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": NEW, "temperature": 0.0, "ignore_eos": True}})
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
        assert status == 200 and out["text"] == tokenizer.decode(hf_generate(hf, ids))
    finally:
        stop_server(server)


def _post(port: int, path: str, body: dict) -> tuple[int, object]:
    """(HTTP status, JSON answer) of a POST to the server."""
    import urllib.error

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_server_switches_policy_and_reports_counters_over_its_route(model_dir, hf, tmp_path):
    """`python -m sglang.launch_server` with the plugin (policy native, counters on) and DUMPER_SERVER_PORT=reuse,
    tensor parallel over two scheduler processes: `POST /dumper/moe_reroute_*` switches the policy of the
    running server in both (each routes its own shard of every expert, so a rank left behind would change the
    tokens), zeroes and reads its counters; each generation is transformers' under the policy then set, every
    decode token re-routed; a bad policy, a bad body and an unknown method are refused with the plugin's
    message, and the server goes on."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_REROUTE_")}
    env.update({"SGLANG_USE_CPU_ENGINE": "1", "MOE_REROUTE_POLICY": "native", "MOE_REROUTE_COUNTERS": "1",
                "DUMPER_SERVER_PORT": "reuse", "SGLANG_CPU_OMP_THREADS_BIND": "0|1"})
    server = start_server(model_dir, port, env, tmp_path / "server.log", "--tp-size", "2")
    try:
        ids = prompts()[1]
        for policy in ("native", "oea:k0=[2,2,3,2]"):
            status, answer = _post(port, "/dumper/moe_reroute_set_policy", {"policy": policy})
            assert (status, answer) == (200, [{"policy": policy}])
            assert _post(port, "/dumper/moe_reroute_reset_counters", {}) == (200, [])
            status, out = _post(port, "/generate", {"input_ids": ids, "sampling_params": {
                "max_new_tokens": NEW, "temperature": 0.0, "ignore_eos": True}})
            assert status == 200 and out["output_ids"] == hf_generate(hf, ids, None if policy == "native" else policy)
            status, answer = _post(port, "/dumper/moe_reroute_counters", {})
            assert status == 200 and len(answer) == 1 and answer[0]["policy"] == policy
            assert answer[0]["dp_rank"] in (None, 0)  # one data-parallel rank
            counters = answer[0]["counters"]
            assert sorted(counters) == ["0", "1", "2", "3"]  # every MoE layer of the reference model
            for c in counters.values():
                assert c["decode_tokens_total"] == c["decode_tokens_rerouted_total"] == NEW - 1
                if policy == "native":
                    assert c["unique"] == c["unique_native"]
                else:
                    assert c["unique"] < c["unique_native"]
        for path, body, message in [
                ("/dumper/moe_reroute_set_policy", {"policy": "oea:k0=banana"}, "k0"),
                ("/dumper/moe_reroute_set_policy", {"spec": "cap:k=2"}, 'takes the JSON object {"policy": ...}'),
                ("/dumper/moe_reroute_nothing", {}, "no method 'moe_reroute_nothing'")]:
            status, answer = _post(port, path, body)
            assert status == 400 and message in " ".join(answer["error"]), answer
        # the policy before the refusals still routes
        status, answer = _post(port, "/dumper/moe_reroute_counters", {})
        assert answer[0]["policy"] == "oea:k0=[2,2,3,2]"
    finally:
        stop_server(server)


CHILD = """
import os, sys
import sglang

if __name__ == "__main__":
    llm = sglang.Engine(model_path=sys.argv[1], **{args})
    out = llm.generate(input_ids=[[5, 6, 7]], sampling_params={{"max_new_tokens": 2, "temperature": 0.0}})
    print("GENERATED", out[0]["output_ids"], flush=True)
    llm.shutdown()
"""

PATCHES = {  # sitecustomize lines, run in every process of the child engine
    "version": "import moe_reroute.sglang.plugin as p; p.sglang_version = lambda: '0.6.0'",
    "register": ("import moe_reroute.sglang.plugin as p\n"
                 "def broken(self, *a, **k):\n    raise RuntimeError('hook construction failed')\n"
                 "p.SelectExpertsHook.__init__ = broken"),
}


def test_fail_closed_in_the_real_engine(model_dir, tmp_path):
    """A bad policy, a similarity file that does not fit, an unsupported SGLang and a failure while
    registering the hook: each engine stops with the plugin's message and generates nothing."""
    from moe_reroute.hf import save_similarity

    small = save_similarity({0: torch.eye(8)}, tmp_path / "sim8.safetensors")
    cases = {
        "bad policy": ({"MOE_REROUTE_POLICY": "oea:k0=banana"}, None, "MOE_REROUTE_POLICY"),
        "similarity": ({"MOE_REROUTE_POLICY": f"sere:similarity={small}"}, None, "does not fit"),
        "version": ({"MOE_REROUTE_POLICY": "oea:k0=2"}, "version", "SGLang 0.6.0 is not supported"),
        "register": ({"MOE_REROUTE_POLICY": "oea:k0=2"}, "register", "hook construction failed"),
    }
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(args=repr(ENGINE_ARGS)))
    children = {}
    for name, (extra, patch, _) in cases.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_REROUTE_")}
        env.update(extra, SGLANG_USE_CPU_ENGINE="1")
        if patch:
            site = tmp_path / name
            site.mkdir()
            (site / "sitecustomize.py").write_text(textwrap.dedent(PATCHES[patch]) + "\n")
            env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
        children[name] = subprocess.Popen([sys.executable, str(script), str(model_dir)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failures = []
    for name, child in children.items():
        try:
            out, _ = child.communicate(timeout=480)
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
            failures.append(f"{name}: did not stop in 480 s\n{out[-3000:]}")
            continue
        needle = cases[name][2]
        if "GENERATED" in out or child.returncode == 0 or needle not in out:
            failures.append(f"{name}: rc={child.returncode}, {needle!r} {'in' if needle in out else 'not in'} "
                            f"the output\n{out[-3000:]}")
    assert not failures, "\n\n".join(failures)
