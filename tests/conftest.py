"""Shared test helpers: router logits without ties, in any dtype, and the random specs to try."""

from __future__ import annotations

import os

# OpenMP threads that wait sleep instead of spinning. The suite runs several torch processes side by side
# (pytest-xdist workers, engines and their children), each with a thread per core: spinning waiters take
# the cores the others need (measured: three vLLM engine tests side by side on 2 cores, 46 s -> 32 s).
# libgomp reads it once, when torch loads it, so it is set before torch is imported; every process the
# tests start inherits it. It changes no result, only how idle threads wait.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the fused Triton kernels run on CPU tensors through Triton's interpreter; the flag is
# read when a kernel is defined, so it is set before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `long` run first (a stable sort keeps the rest in order): pytest-xdist hands tests out in
    order, and a long test handed out last keeps one worker busy while the others have ended."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


# Every finite bfloat16 in [-8, 8] away from 0: exactly representable in float16 and float32 too, so
# logits drawn from it without replacement have no ties in any dtype.
_POOL = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
_POOL = _POOL[torch.isfinite(_POOL) & (_POOL.abs() <= 8) & (_POOL.abs() >= 2**-6)].unique()


def distinct_logits(T: int, E: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """[T, E] router logits, all values of a row distinct, exactly representable in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    rows = [_POOL[torch.randperm(len(_POOL), generator=g)[:E]] for _ in range(T)]
    return torch.stack(rows).to(dtype)


def random_mask(T: int, seed: int, p_invalid: float = 0.25) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand(T, generator=g) >= p_invalid


@pytest.fixture
def logits_factory():
    return distinct_logits


# ATen ops that wait for the device on CUDA (a value read back to the host, or an output whose size depends
# on the data): none may run inside a CUDA graph. On CPU they run, but a dispatch log still sees them.
HOST_SYNC_OPS = {"nonzero", "argwhere", "masked_select", "_local_scalar_dense", "unique", "_unique", "_unique2",
                 "unique_consecutive", "unique_dim", "bincount", "nonzero_numpy", "item"}


class HostSyncLog:
    """Records the ATen ops a call issues that would synchronise the host on CUDA: those of HOST_SYNC_OPS,
    indexing by a boolean mask (`x[mask]`, `x[mask] = v`: a nonzero inside), and repeat_interleave with tensor
    repeats and no output_size. Use as a context manager; `.found` lists them."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                if name in HOST_SYNC_OPS:
                    log.found.append(name)
                elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                        for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())):
                    log.found.append(f"{name} by a boolean mask")
                elif name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") and (
                        kwargs.get("output_size") is None):
                    log.found.append("repeat_interleave with tensor repeats")
                return func(*args, **kwargs)

        self.found: list[str] = []
        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@pytest.fixture
def short_tmp():
    """An empty folder of a short path under /tmp, removed after the test: a temporary folder for engines,
    whose sockets' paths (the folder, serve-bench's own folder in it, a socket name) must fit 107 bytes."""
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
