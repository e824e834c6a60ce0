"""SGLang plugin: re-route the decode tokens of the MoE layers SGLang serves, without a fork of SGLang.

SGLang 0.5.x loads it in each of its processes through the `sglang.srt.plugins` entry point (install
SGLang yourself; no extra pins it). It does nothing unless a policy is configured:

    MOE_REROUTE_POLICY=oea:k0=3 python -m sglang.launch_server --model-path Qwen/Qwen3-30B-A3B

Tested end to end in SGLang 0.5.23's own engine on CPU (`.ci/sglang`) and against its sources by contract
tests; see docs/sglang.md and docs/sglang-engine.md.
"""

from ..serving.config import POLICY_ENV, POLICY_FILE_ENV
from .plugin import SUPPORTED_SGLANG, TARGET, check_version, register, topk_spec

__all__ = ["POLICY_ENV", "POLICY_FILE_ENV", "SUPPORTED_SGLANG", "TARGET", "check_version", "register", "topk_spec"]
