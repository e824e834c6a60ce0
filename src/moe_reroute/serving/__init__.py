"""What the engine plugins (`moe_reroute.vllm`, `moe_reroute.sglang`) share, engine-neutral: the policy
configuration read from the environment (`config`), step kinds and per-layer counters (`steps`), and the
form of a routing an engine's MoE kernels accept (`distinct`). Imports no engine."""
