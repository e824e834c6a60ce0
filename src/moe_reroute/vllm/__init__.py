"""vLLM plugin: re-route the decode steps of every MoE layer vLLM serves, without a fork of vLLM.

Installed with the `vllm` extra; vLLM loads it in each of its processes through the
`vllm.general_plugins` entry point. It does nothing unless a policy is configured:

    MOE_REROUTE_POLICY=oea:k0=3 vllm serve Qwen/Qwen3-30B-A3B

or, in Python, `moe_reroute.vllm.enable("oea:k0=3")` before building `vllm.LLM(...)`.
`MOE_REROUTE_COUNTERS=1` records U per layer on the device; `counters()` reads it.
`set_policy("cap:k=4", llm)` switches the policy of a live engine between two steps (see docs/vllm-ab.md).
"""

from ..serving.config import COUNTERS_ENV, POLICY_ENV, POLICY_FILE_ENV, PluginConfig
from .plugin import (
    SUPPORTED_VLLM,
    WorkerExtension,
    check_policy,
    check_version,
    count_by_ranks,
    counters,
    counting,
    disable,
    enable,
    expert_loads,
    format_counters,
    register,
    reset_counters,
    set_policy,
    worker_check_policy,
    worker_counters,
    worker_set_policy,
)
from .router import router_spec

__all__ = [
    "COUNTERS_ENV",
    "POLICY_ENV",
    "POLICY_FILE_ENV",
    "PluginConfig",
    "SUPPORTED_VLLM",
    "WorkerExtension",
    "check_policy",
    "check_version",
    "count_by_ranks",
    "counters",
    "counting",
    "disable",
    "enable",
    "expert_loads",
    "format_counters",
    "register",
    "reset_counters",
    "router_spec",
    "set_policy",
    "worker_check_policy",
    "worker_counters",
    "worker_set_policy",
]
