"""`moe-reroute synth-model` (real-shaped checkpoints with random weights) and `moe-reroute serve-bench`
(decode speed of a real vLLM or SGLang engine, native against policies)."""

from __future__ import annotations

import shlex
import sys

from .bench import _batch_sizes
from .inputs import InputError, at_least, check_out_dir

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def _synth(args) -> int:
    import torch

    from ..measure import synth
    from ..measure.shapes import custom_shape

    out = check_out_dir(args.out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} is not empty; give a new folder")
    dims = custom_shape(args.dims) if args.dims else None
    plan = synth.plan(args.shape, args.layers, dtype=getattr(torch, DTYPES[args.dtype]), vocab=args.vocab, dims=dims)
    gib = synth.GIB
    print(f"{plan.describe()}\nneeds {plan.disk_bytes / gib:.1f} GiB on disk and {plan.memory_bytes / gib:.1f} GiB of "
          f"memory to write; an engine holds the weights in {plan.engine_memory_bytes() / gib:.1f} GiB in float32")
    synth.check_room(plan, out)
    path = synth.write(plan, out, seed=args.seed, progress=True)
    print(f"written to {path} (random weights: routing is close to uniform). Benchmark it with "
          f"`moe-reroute serve-bench --model {shlex.quote(str(path))}`")
    return 0


def _serve_bench(args) -> int:
    import math

    from ..measure import serve_bench
    from ..reference import path as reference_path

    model = args.model or str(reference_path())
    batch_sizes = _batch_sizes(args.batch_sizes)
    at_least(args.output_len, 2, "--output-len")
    if args.prompts is not None and args.prompt_len is not None:
        raise InputError(f"--prompts {args.prompts} holds the prompts themselves; drop --prompt-len (the length "
                         "of serve-bench's own held-out prompts)")
    if args.prompt_len is not None:
        at_least(args.prompt_len, 1, "--prompt-len")
    at_least(args.repeats, 1, "--repeats")
    if args.num_prompts is not None:
        at_least(args.num_prompts, 1, "--num-prompts")
    if args.block_steps is not None:
        at_least(args.block_steps, 1, "--block-steps")
        if args.isolate or args.serve:
            raise InputError("--block-steps sets the blocks of the A/B mode; drop it with --isolate or --serve")
    if args.threads is not None:
        at_least(args.threads, 1, "--threads")
    if args.ep is not None:
        at_least(args.ep, 1, "--ep")
    elif args.placement is not None:
        raise InputError(f"--placement {args.placement} says where experts live under expert parallelism: give "
                         "--ep D (the number of ranks) too")
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be 1..65535, got {args.port}")
    try:
        rate = math.inf if args.request_rate in ("inf", "") else float(args.request_rate)
    except ValueError:
        raise InputError(f"--request-rate must be requests/s > 0 or inf, got {args.request_rate!r}") from None
    if not rate > 0:
        raise InputError(f"--request-rate must be > 0 requests/s or inf, got {args.request_rate}")
    if not (args.run_timeout > 0 and math.isfinite(args.run_timeout)):
        raise InputError(f"--run-timeout must be a number of seconds > 0, got {args.run_timeout}")
    if args.dtype != "auto" and args.dtype not in DTYPES:
        raise InputError(f"--dtype must be auto or one of {', '.join(sorted(DTYPES))}, got {args.dtype!r}")
    engine_args = {}
    for item in args.engine_arg or []:
        try:
            key, value = serve_bench.parse_engine_arg(item)
        except ValueError as e:
            raise InputError(str(e)) from None
        engine_args[key] = value
    if args.tensor_parallel_size is not None:
        at_least(args.tensor_parallel_size, 1, "--tensor-parallel-size")
        tp = serve_bench.TP_ARG[args.engine]
        if tp in engine_args:
            raise InputError(f"--tensor-parallel-size and --engine-arg {tp} say the same thing: give one")
        engine_args[tp] = args.tensor_parallel_size
    out = check_out_dir(args.out)
    cfg = serve_bench.Config(model=model, policies=args.policy or [], batch_sizes=batch_sizes,
                             output_len=args.output_len, repeats=args.repeats,
                             **({} if args.prompt_len is None else {"prompt_len": args.prompt_len}),
                             dtype=DTYPES.get(args.dtype, args.dtype), device=args.device,
                             enforce_eager=True if args.enforce_eager else (False if args.cuda_graphs else None),
                             serve=args.serve, num_prompts=args.num_prompts, prompts=args.prompts,
                             request_rate=rate, port=args.port,
                             run_timeout_s=args.run_timeout, isolate=True if args.isolate else None,
                             block_steps=args.block_steps, threads=args.threads, engine=args.engine,
                             ep=args.ep, placement=args.placement or "contiguous", engine_args=engine_args)
    command = "moe-reroute " + " ".join(shlex.quote(a) for a in args.argv)
    try:
        data = serve_bench.run(cfg, out, command, say=print)
    except serve_bench.BenchError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        print("serve-bench: interrupted; every engine process was stopped; results.json not written", file=sys.stderr)
        return 130
    print()
    print(serve_bench.table(data))
    note = data["conditions"]["model_note"]
    if note:
        print(f"\nModel: {note}.")
    print(f"\nresults: {out / serve_bench.RESULTS}, report: {out / 'report.md'} ({data['conditions']['seconds']:.0f} s)")
    return 0


def add_parsers(sub) -> None:
    from ..measure.synth import shape_names

    p = sub.add_parser("synth-model", help="write a checkpoint with a known model's layer shapes and random weights")
    p.add_argument("--shape", required=True, choices=shape_names(), help="the model whose dimensions to take")
    p.add_argument("--layers", type=int, required=True, help="decoder layers (a model's leading dense layers are "
                   "kept, at most layers-1)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="stored dtype (default bfloat16)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the reference tokenizer's 8192)")
    p.add_argument("--dims", help="H,I,E,K to replace the MoE dimensions (e.g. 64,32,32,4 for a tiny test model)")
    p.add_argument("--seed", type=int, default=0, help="weights' random seed (default 0)")
    p.add_argument("--out", required=True, help="new folder for the checkpoint")
    p.set_defaults(run=_synth, needs=("hf",))

    p = sub.add_parser("serve-bench", help="decode speed of a vLLM or SGLang engine, native against each policy")
    p.add_argument("--engine", default="vllm", choices=("vllm", "sglang"), help="the engine to run (default vllm); "
                   "sglang: SGLang 0.5's offline engine, A/B mode only, eager")
    p.add_argument("--model", help="local model folder (default: the shipped reference model)")
    p.add_argument("--policy", action="append", help="policy spec or policy file (the JSON `moe-reroute tune --out` writes), "
                   "repeatable (default: the default of each "
                   "policy for the model's K, for K=8 cap:k=4 oea:k0=3 budget:budget=32, and sere when the model "
                   "folder holds sere/similarity.safetensors, e.g. from `moe-reroute calibrate`)")
    p.add_argument("--batch-sizes", default="1,4,16,32", help="decode batch sizes; concurrencies with --serve "
                   "(default 1,4,16,32)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per sequence (default 64; with "
                   "--prompts, of the requests that give no output_tokens)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens of held-out text (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per batch size in the A/B engine; "
                   "with --serve, rounds of every policy in the A/B server; with --isolate, interleaved repeats, "
                   "each in a fresh engine or server (default 3)")
    p.add_argument("--isolate", action="store_true", help="each policy in its own engine process (offline) or "
                   "server (--serve) instead of A/B in one (the default, and the only choice, with CUDA graphs, "
                   "which cannot switch policy)")
    p.add_argument("--block-steps", type=int, help="A/B: decode steps per policy block (default: (output-len - 1) "
                   "// (4 x policies), so that each generation holds 4 rounds)")
    p.add_argument("--dtype", default="auto", help="engine dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (the default on CPU)")
    g.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs (the default on CUDA)")
    p.add_argument("--threads", type=int, help="the engine's CPU threads (OMP_NUM_THREADS; default: the engine's "
                   "own, a thread per core): on a machine where other work runs, the cores that are free")
    p.add_argument("--ep", type=int, help="count per rank under expert parallelism over D ranks: max-rank and "
                   "mean-rank U per layer from the routed experts (vLLM; an engine that runs EP itself is counted by "
                   "its own placement)")
    p.add_argument("--placement", help="with --ep: contiguous (default), eplb (offline A/B: balanced by the "
                   "engine's own native load) or a placement file (one rank per expert, or one list per MoE layer; or redundant "
                   "experts, {\"ranks\": D, \"physical_to_logical\": [...]}, counted by the slots each rank reads)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, metavar="N", help="run the engine over N GPUs (or "
                   "CPU worker processes) by tensor parallelism (vLLM's tensor_parallel_size, SGLang's tp_size)")
    p.add_argument("--engine-arg", action="append", metavar="KEY=VALUE", help="an argument of the engine's own, "
                   "repeatable: vLLM's `LLM(...)` / `vllm serve` arguments, SGLang's `Engine(...)`; VALUE as JSON "
                   "where it parses (e.g. enable_expert_parallel=true, gpu_memory_utilization=0.85)")
    p.add_argument("--serve", action="store_true", help="serving mode: vLLM's OpenAI server and its bench client")
    p.add_argument("--num-prompts", type=int, help="--serve: requests per concurrency (default 32, or every "
                   "request of --prompts)")
    p.add_argument("--prompts", metavar="FILE", help="--serve: your own requests instead of held-out text, a JSONL "
                   "file in vLLM's custom bench format, one per line: {\"prompt\": \"...\", \"output_tokens\": 64} "
                   "(output_tokens optional); sent as they are, no chat template")
    p.add_argument("--request-rate", default="inf", help="--serve: requests/s, or inf (default inf)")
    p.add_argument("--port", type=int, default=8765, help="--serve: port on 127.0.0.1 (default 8765)")
    p.add_argument("--run-timeout", type=float, default=3600.0, help="seconds before one run is stopped (default 3600)")
    p.add_argument("--out", default="moe-reroute-serve-bench", help="folder for results.json, plot, report.md, "
                   "runs/ (default ./moe-reroute-serve-bench)")
    p.set_defaults(run=_serve_bench)
