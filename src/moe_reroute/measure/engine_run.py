"""One engine run of `moe-reroute serve-bench`, in a process of its own: one policy per engine (`--isolate`),
or every policy in one engine, switched between decode steps (A/B, `run_ab`; in SGLang, `run_ab_sglang`).

    python -m moe_reroute.measure.engine_run RUN.json      # offline: time one batch, write the result
    python -m moe_reroute.measure.engine_run --client-loop  # vLLM's own `bench serve` client, a run per line

RUN.json holds the run (see `serve_bench.offline_run`); the result is written to its "result" path as
JSON only when the run completes, so a failed run leaves no result behind.

Timing (offline): after a warm-up generation, one generation of `output_len` tokens with the engine
stepped by hand and each step timed. Every prompt has the same length and ignore_eos holds, so the first
step prefills the batch and every later step decodes all of it: time per output token = the time of the
later steps / (output_len - 1). Counters are paused while timing; a last generation with counters on
gives U per layer (policy and native over the same steps).

A/B (RUN.json "mode": "ab"): one engine (eager, or compiled on CPU), built with the `native` policy. After a warm-up generation
under each policy, `repeats` timed generations of `output_len` tokens; their decode steps run in rounds,
each round one block of `block_steps` steps per policy in an order drawn afresh for every round, the
policy switched between steps (`moe_reroute.vllm.set_policy`). Each step's time and policy is recorded
(the prefill step runs native; decode steps left over after the last whole round run native and are
not used). Then one counted generation per policy gives its U per layer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


# vLLM schedules asynchronously on CUDA by default (two batches in flight, an engine.step() that returns the
# previous step's outputs): the benches step the engine by hand, one model step per call, each timed alone
SYNC_SCHEDULING = {"async_scheduling": False}
# the plugin's counters are read over `collective_rpc` from every worker: in this process, or in the worker
# processes of a tensor- or expert-parallel engine (`--engine-arg tensor_parallel_size=2`)
WORKER_EXTENSION = {"worker_extension_cls": "moe_reroute.vllm.WorkerExtension"}


def vllm_llm(run: dict, enforce_eager: bool):
    """The run's `vllm.LLM`: its model, one batch of equal prompts in one prefill step, no prefix cache, then the
    model's and the user's own engine arguments (RUN.json "engine_args")."""
    from vllm import LLM

    return LLM(model=run["model"], dtype=run["dtype"], enforce_eager=enforce_eager, max_model_len=run["max_model_len"],
               max_num_seqs=run["batch"], enable_prefix_caching=False, seed=0,
               max_num_batched_tokens=max(run["max_model_len"], run["batch"] * run["prompt_len"]),
               **{**SYNC_SCHEDULING, **WORKER_EXTENSION, **run.get("engine_args", {})})


def layer_order(key) -> int:
    """Sort key of a counters' layer key: decoder-layer index order ("2" before "10"), keys of unnamed layers last."""
    return int(key) if str(key).isdigit() else 1 << 30


def union_counters(answers: list[dict]) -> dict:
    """One engine's counters from its workers' answers: each layer once, the first worker's where several hold it
    (tensor-parallel ranks count alike), every pipeline stage's own layers."""
    merged: dict = {}
    for c in reversed(answers):
        merged.update(c)
    return {k: merged[k] for k in sorted(merged, key=layer_order)}


class Workers:
    """The plugin's counters on every worker of a `vllm.LLM` (`moe_reroute.vllm.WorkerExtension` methods), paused
    from the start (eager steps read the switch at each step). Every tensor-parallel rank routes the whole batch
    alike, so each layer's counters are the first worker's that holds it (`union_counters`)."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.size = len(self.call("moe_reroute_counting", "0"))  # the engine's workers (its TP x PP ranks)

    def call(self, method: str, *args) -> list:
        return self.llm.collective_rpc(method, args=args)

    def counting(self, on: bool) -> None:
        self.call("moe_reroute_counting", "1" if on else "0")

    def reset_counters(self) -> None:
        self.call("moe_reroute_reset_counters")

    def counters(self) -> dict:
        return union_counters(self.call("moe_reroute_counters"))

    def expert_loads(self) -> dict:
        return union_counters(self.call("moe_reroute_expert_loads"))

    def count_by_ranks(self, placements: dict, ranks: int, origin: str) -> None:
        self.call("moe_reroute_count_by_ranks", placements, ranks, origin)


def run_offline(run: dict) -> dict:
    import torch

    import moe_reroute.vllm as plugin

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    count = run["count"]  # "after": count after timing; "only": no timing (an eager counting run)
    plugin.counting(False)  # in this process, before any step (and any capture)
    eager = run["enforce_eager"] or count == "only"
    t0 = time.perf_counter()
    llm = vllm_llm(run, eager)
    build_s = time.perf_counter() - t0
    workers = Workers(llm)  # every worker's counters paused before the timed steps
    result = {"build_s": build_s, "policy": run["policy"], "batch": run["batch"], "repeat": run["repeat"],
              "workers": workers.size}
    prompts = [TokensPrompt(prompt_token_ids=p) for p in run["prompts"]]

    engine = llm.llm_engine
    serial = iter(range(1 << 30))

    def generate(n: int) -> tuple[list[float], list]:
        """Every prompt with max_tokens=n, stepping the engine by hand: the wall time of each step."""
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        for p in prompts:
            engine.add_request(f"r{next(serial)}", p, params)
        steps, done = [], []
        while engine.has_unfinished_requests():
            if run["device"] == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            outs = engine.step()
            if run["device"] == "cuda":
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - t)
            done += [o for o in outs if o.finished]
        return steps, done

    L = run["output_len"]
    if count != "only":
        generate(min(L, 8))  # warm-up: first-call allocations and kernels
        steps, outs = generate(L)
        got = sorted({len(o.outputs[0].token_ids) for o in outs})
        if len(outs) != len(prompts) or got != [L]:
            raise RuntimeError(f"the engine finished {len(outs)} of {len(prompts)} sequences with {got} tokens, not {L}")
        # the first step prefills every prompt (max_num_batched_tokens holds them all) and samples token 1;
        # the others decode the whole batch
        prefill_s, decode_s = steps[0], sum(steps[1:])
        tpot = decode_s / (L - 1)
        result.update(prefill_s=prefill_s, decode_s=decode_s, steps=len(steps), tpot_s=tpot,
                      decode_tokens_per_s=run["batch"] / tpot)
    if count in ("after", "only"):
        workers.reset_counters()
        workers.counting(True)
        generate(L)
        result["counters"] = workers.counters()
    return result


def ab_schedule(policies: list[str], decode_steps: int, block_steps: int, rng) -> list[tuple[int, str]]:
    """[(round, policy)] for each decode step of a generation that is in a whole round: every round holds
    one block of `block_steps` steps per policy, in an order `rng.shuffle` draws for that round."""
    rounds = decode_steps // (block_steps * len(policies))
    plan = []
    for r in range(rounds):
        order = list(policies)
        rng.shuffle(order)
        plan += [(r, p) for p in order for _ in range(block_steps)]
    return plan


def run_ab(run: dict) -> dict:
    import random

    import torch

    import moe_reroute.vllm as plugin

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    policies, L, b = run["policies"], run["output_len"], run["block_steps"]
    plugin.counting(False)
    t0 = time.perf_counter()
    llm = vllm_llm(run, run["enforce_eager"])
    build_s = time.perf_counter() - t0
    workers = Workers(llm)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in run["prompts"]]
    engine = llm.llm_engine
    serial = iter(range(1 << 30))
    current = [None]

    def use(policy: str) -> None:
        if policy != current[0]:
            plugin.set_policy(policy, llm)  # between two steps: no step is in flight here
            current[0] = policy

    def sync() -> None:
        if run["device"] == "cuda":
            torch.cuda.synchronize()

    def generate(n: int, plan: list[tuple[int, str]] | None = None, policy: str = "native"):
        """Every prompt with max_tokens=n; decode step i (1-based) runs under plan[i - 1]'s policy (native
        past the plan). Returns each step's (seconds, round or None, policy) and the finished outputs."""
        use(policy)
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        for p in prompts:
            engine.add_request(f"r{next(serial)}", p, params)
        steps, done, i = [], [], 0
        while engine.has_unfinished_requests():
            rnd, pol = (None, policy) if i == 0 or plan is None else (plan[i - 1] if i - 1 < len(plan) else
                                                                     (None, "native"))
            use(pol)
            sync()
            t = time.perf_counter()
            outs = engine.step()
            sync()
            steps.append((time.perf_counter() - t, rnd, pol))
            done += [o for o in outs if o.finished]
            i += 1
        if len(done) != len(prompts) or sorted({len(o.outputs[0].token_ids) for o in done}) != [n]:
            raise RuntimeError(f"the engine finished {len(done)} of {len(prompts)} sequences, not all with {n} tokens")
        if len(steps) != n:
            raise RuntimeError(f"a generation of {n} tokens took {len(steps)} engine steps, not {n} (one prefill "
                               "step, then one step per token): its steps cannot be attributed to policies")
        return steps, done

    for p in policies:  # warm-up: first-call allocations and kernels of every policy
        generate(min(L, 8), policy=p)
    rng = random.Random(run.get("seed", 0))
    records, prefill = [], []
    for g in range(run["repeats"]):
        plan = ab_schedule(policies, L - 1, b, rng)
        steps, _ = generate(L, plan)
        prefill.append(steps[0][0])
        for i, (sec, rnd, pol) in enumerate(steps[1:], 1):
            if rnd is not None:
                records.append({"generation": g, "round": rnd, "step": i, "policy": pol, "s": sec})
    placement = None
    if run.get("ep", {}).get("placement") == "eplb":
        placement = eplb_from_native_load(workers, lambda: generate(L, policy="native"), run["ep"]["ranks"])
    counters = {}
    for p in policies:  # U per layer: one counted generation per policy (counters restart at each switch)
        use(p)
        workers.reset_counters()
        workers.counting(True)
        generate(L, policy=p)
        workers.counting(False)
        counters[p] = workers.counters()
    return {"mode": "ab", "build_s": build_s, "workers": workers.size, **({"placement": placement} if placement else {}),
            "batch": run["batch"], "policies": policies, "block_steps": b,
            "generations": run["repeats"], "prefill_s": prefill, "steps": records, "counters": counters}


def eplb_from_native_load(workers: Workers, generate_native, ranks: int) -> dict[str, list[int]]:
    """An EPLB-like placement per layer from the engine's own native routing: one counted native generation
    (`generate_native`), the tokens it sent to each expert (`workers.expert_loads`), each layer balanced over
    `ranks` (`moe_reroute.placement.balanced`); every worker's counters count per rank by it from then on.
    Returns it."""
    import torch

    from moe_reroute.placement import balanced

    workers.reset_counters()
    workers.counting(True)
    generate_native()
    workers.counting(False)
    loads = workers.expert_loads()
    placement = {str(k): balanced(torch.tensor(v, dtype=torch.float64), ranks).tolist() for k, v in loads.items()}
    workers.count_by_ranks(placement, ranks, "eplb")
    return placement


def cpu_memory_fraction(model: str, dtype: str, total: int | None = None) -> float:
    """SGLang's `mem_fraction_static` on CPU, where it is a share of the machine's memory that must hold the
    weights (at the engine's dtype) and the KV cache: the checkpoint's bytes rescaled to `dtype`, plus
    2 GiB, over the memory (`total` bytes; default: the machine's), within [0.05, 0.9]."""
    import torch

    folder = Path(model)
    stored = json.loads((folder / "config.json").read_text())
    stored = stored.get("dtype") or stored.get("torch_dtype") or "bfloat16"
    size = {name: getattr(torch, name).itemsize for name in ("float32", "bfloat16", "float16")}
    scale = size.get(dtype, 4) / size.get(str(stored), 2)
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors")) * scale
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(0.9, max(0.05, (weights + 2 * 2**30) / total))


def run_ab_sglang(run: dict) -> dict:
    """`run_ab` in SGLang's offline engine (`sglang.Engine`): the same schedule and result.

    SGLang's engine runs its steps in a scheduler process, so the plugin there follows the plan
    (`moe_reroute_ab_plan`): decode step i of the generation runs plan[i]'s policy, and every step's start
    is recorded; a step's time is the start of the next minus its own (forward, sampling and scheduling,
    as the engine runs them one after another with the overlap scheduler off). The plan stops one decode
    step short of the generation, whose last step has no next start. Engine: eager (no CUDA graphs, which
    a policy switch cannot reach), no radix cache (each generation prefills afresh), every prompt in one
    prefill step, at most `batch` running requests.
    """
    import random
    import tempfile

    import sglang
    import torch

    policies, L, b, B = run["policies"], run["output_len"], run["block_steps"], run["batch"]
    cpu = run["device"] == "cpu"
    args = dict(model_path=run["model"], device=run["device"], dtype=run["dtype"], disable_cuda_graph=True,
                disable_radix_cache=True, disable_overlap_schedule=True, skip_server_warmup=True, random_seed=0,
                max_running_requests=B, chunked_prefill_size=max(256, B * run["prompt_len"]),
                max_total_tokens=B * run["max_model_len"] + 256, log_level="error")
    if cpu:
        args.update(attention_backend="torch_native", mem_fraction_static=cpu_memory_fraction(run["model"], run["dtype"]))
    t0 = time.perf_counter()
    llm = sglang.Engine(**{**args, **run.get("engine_args", {})})
    build_s = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="moe-reroute-ab-"))
    try:
        def generate(n: int, plan: list[tuple[int, str]]) -> list[dict]:
            """Every prompt with max_new_tokens=n under `plan`; the scheduler's record of each step."""
            llm.collective_rpc("moe_reroute_ab_plan", policies=policies, plan=[list(x) for x in plan])
            outs = llm.generate(input_ids=run["prompts"],
                                sampling_params={"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True})
            path = work / "ab.json"
            llm.collective_rpc("moe_reroute_ab_save", path=str(path))
            steps = json.loads(path.read_text())["steps"]
            got = sorted({len(o["output_ids"]) for o in outs})
            if len(outs) != B or got != [n]:
                raise RuntimeError(f"the engine finished {len(outs)} of {B} sequences with {got} tokens, not {n}")
            decode = [s for s in steps if s["kind"] == "decode"]
            if steps[0]["kind"] != "prefill" or len(decode) != n - 1 or any(s["batch"] != B for s in decode):
                kinds = [(s["kind"], s["batch"]) for s in steps[:6]]
                raise RuntimeError(f"SGLang did not run the batch as one prefill step then {n - 1} decode steps of "
                                   f"{B} sequences (steps: {kinds}...): its steps cannot be attributed to policies")
            return steps

        def uniform(policy: str, n: int) -> list[tuple[None, str]]:
            return [(None, policy)] * (n - 1)

        for p in policies:  # warm-up: first-call allocations and kernels of every policy
            generate(min(L, 8), uniform(p, min(L, 8)))
        rng = random.Random(run.get("seed", 0))
        records, prefill = [], []
        for g in range(run["repeats"]):
            plan = ab_schedule(policies, L - 2, b, rng)
            steps = generate(L, plan)
            prefill.append(steps[1]["t"] - steps[0]["t"])
            for i in range(1, len(steps) - 1):
                st = steps[i]
                if st["round"] is not None:
                    records.append({"generation": g, "round": st["round"], "step": i, "policy": st["policy"],
                                    "s": steps[i + 1]["t"] - st["t"], "forward_s": st["forward_s"]})
        counters = {}
        for p in policies:  # U per layer: one counted generation per policy (counters restart at each switch)
            llm.collective_rpc("moe_reroute_set_policy", policy=p)
            llm.generate(input_ids=run["prompts"],
                         sampling_params={"max_new_tokens": L, "temperature": 0.0, "ignore_eos": True})
            state = work / "state.pt"
            llm.collective_rpc("moe_reroute_save", path=str(state))
            counters[p] = {str(k): v for k, v in torch.load(state, weights_only=False)["counters"].items()}
        llm.collective_rpc("moe_reroute_set_policy", policy="native")
    finally:
        llm.shutdown()
    return {"mode": "ab", "engine": "sglang", "build_s": build_s, "batch": B, "policies": policies,
            "block_steps": b, "generations": run["repeats"], "prefill_s": prefill, "steps": records,
            "counters": counters}


def bench_client(args: list[str]) -> None:
    """One run of vLLM's own `vllm bench serve` client with its command-line arguments `args`."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    bench_main(parser.parse_args(args))


def client_loop() -> int:
    """`--client-loop`: vLLM's bench client kept alive across runs (its imports take ~12 s on a CPU, a small
    run well under one). Each line on stdin is a run, {"args": [...], "log": PATH}: the run's output (fds 1
    and 2, so every print and log record) goes to PATH, then one line {"rc": N} answers on the original
    stdout. EOF on stdin ends the loop."""
    import traceback

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    try:  # before the first run arrives: while the server starts
        import vllm.benchmarks.serve  # noqa: F401
    except Exception:
        pass  # each run raises it again, into its log
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            bench_client(job["args"])
            rc = 0
        except SystemExit as e:  # argparse's own errors
            rc = e.code if isinstance(e.code, int) else 2
        except Exception:
            traceback.print_exc()
            rc = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        reply.write(json.dumps({"rc": rc}) + "\n")
    return 0


def main(argv: list[str]) -> int:
    if argv == ["--client-loop"]:
        return client_loop()
    if len(argv) != 1:
        print("usage: python -m moe_reroute.measure.engine_run RUN.json | --client-loop",
              file=sys.stderr)
        return 2
    run = json.loads(Path(argv[0]).read_text())
    if run.get("engine") == "sglang":
        result = run_ab_sglang(run)
    else:
        result = run_ab(run) if run.get("mode") == "ab" else run_offline(run)
    out = Path(run["result"])
    tmp = out.with_suffix(".partial")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, out)  # a result file exists only for a completed run
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
