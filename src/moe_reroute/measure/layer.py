"""One MoE layer's routed experts at real dimensions, random weights, on a device, and the kernels that
compute it at decode reading only the experts a batch uses ("loop" and "grouped_mm").

T = tokens of a decode step, H = hidden, I = expert intermediate, E = experts, K = slots per token,
P = experts allocated (P < E when E do not fit: expert e then reads slot e mod P), N = T·K slots.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..contract import Routing
from .shapes import LayerShape

KERNELS = ("loop", "grouped_mm")
FLUSH_BYTES = 256 << 20  # like triton's do_bench: larger than any last-level cache we run on


class MoELayer:
    """The routed experts of one MoE layer, random weights, on a device.

    gate_up: [P, 2I, H] (gate rows then up rows), down: [P, H, I], in `dtype`. Values are uniform in
    ±1/sqrt(fan-in); a random block is tiled over the rest, which is fast to fill and irrelevant to
    timing. If E experts exceed `memory_fraction` of the free memory, P < E slots are allocated and
    expert e reads slot e mod P (`aliasing` says so).
    """

    def __init__(
        self,
        shape: LayerShape,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        memory_fraction: float = 0.5,
        pool: int | None = None,
        seed: int = 0,
    ) -> None:
        self.shape = shape
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.device)
        H, I, E = shape.hidden, shape.intermediate, shape.num_experts
        per_expert = shape.bytes_per_expert(self.dtype)
        if pool is None:
            budget = memory_fraction * _free_bytes(self.device) - FLUSH_BYTES
            pool = min(E, int(budget // per_expert))
            if pool < 1:
                raise MemoryError(
                    f"one expert of {shape.name} ({shape.dims()}) needs {per_expert / 2**30:.2f} GiB in {self.dtype} "
                    f"but only {max(budget, 0) / 2**30:.2f} GiB ({memory_fraction:.0%} of free memory) is available; "
                    "free memory, raise memory_fraction or pick a smaller shape"
                )
        if not 1 <= pool <= E:
            raise ValueError(f"pool must be between 1 and E={E}, got {pool}")
        self.pool = pool
        gen = torch.Generator(self.device).manual_seed(seed)
        self.gate_up = _random((pool, 2 * I, H), 1 / H**0.5, self.dtype, self.device, gen)  # [P, 2I, H]
        self.down = _random((pool, H, I), 1 / I**0.5, self.dtype, self.device, gen)  # [P, H, I]
        self.last_read: list[int] = []  # experts the last "loop" forward read (for tests)

    @property
    def aliasing(self) -> str | None:
        """A plain statement when experts share memory, else None."""
        if self.pool == self.shape.num_experts:
            return None
        mb = self.shape.bytes_per_expert(self.dtype) / 2**20
        return (
            f"only {self.pool} of E={self.shape.num_experts} experts are allocated (all E do not fit in the memory "
            f"budget): expert e reads slot e mod {self.pool}. Each expert is {mb:.1f} MiB; an expert far larger than "
            "the last-level cache streams from memory even when its slot was read before"
        )

    def forward(self, x: torch.Tensor, routing: Routing, kernel: str = "loop") -> torch.Tensor:
        """x [T, H] -> [T, H] in x's dtype: sum_k w_tk · expert_{ids_tk}(x_t) for valid tokens, 0 for
        invalid ones. Only experts used by a valid token are read."""
        T, K = routing.ids.shape
        if tuple(x.shape) != (T, self.shape.hidden):
            raise ValueError(f"x must be [T, H]=[{T}, {self.shape.hidden}], got {tuple(x.shape)}")
        if K != self.shape.top_k:
            raise ValueError(f"the routing has K={K} slots per token but the layer shape has K={self.shape.top_k}")
        ids = routing.ids.to(self.device).reshape(-1)  # [N]
        w = routing.weights.to(self.device, torch.float32).reshape(-1)  # [N]
        tok = torch.arange(T, device=self.device).repeat_interleave(K)  # [N]
        if routing.valid is not None:
            keep = routing.valid.to(self.device).repeat_interleave(K)  # [N]; a host sync, like any compaction
            ids, w, tok = ids[keep], w[keep], tok[keep]
        out = torch.zeros(T, self.shape.hidden, dtype=torch.float32, device=self.device)  # [T, H]
        if kernel == "loop":
            self._loop(x, ids, w, tok, out)
        elif kernel == "grouped_mm":
            self._grouped(x, ids, w, tok, out)
        else:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
        return out.to(x.dtype)

    __call__ = forward

    def _loop(self, x, ids, w, tok, out) -> None:
        """One pair of matmuls per active expert over the tokens it serves."""
        order = torch.argsort(ids, stable=True)
        ids, w, tok = ids[order], w[order], tok[order]
        counts = torch.bincount(ids, minlength=self.shape.num_experts).tolist()
        self.last_read = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slot = e % self.pool
            t = tok[start : start + n]
            h = x[t] @ self.gate_up[slot].T  # [n, 2I]
            gate, up = h.chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.down[slot].T  # [n, H]
            out.index_add_(0, t, y.float() * w[start : start + n, None])
            self.last_read.append(e)
            start += n

    def _grouped(self, x, ids, w, tok, out) -> None:
        """Two `torch._grouped_mm` calls over the slots sorted by expert; experts with no rows are not
        read. With aliasing, experts sharing a slot go in separate rounds so each is read once."""
        P = self.pool
        if P == self.shape.num_experts:
            rounds = [(ids, w, tok)]
        else:
            used = torch.bincount(ids, minlength=self.shape.num_experts).nonzero().flatten().tolist()
            round_of = torch.full((self.shape.num_experts,), -1, dtype=torch.long)
            seen: dict[int, int] = {}
            for e in used:
                round_of[e] = seen.get(e % P, 0)
                seen[e % P] = int(round_of[e]) + 1
            r = round_of.to(self.device)[ids]  # [N]
            rounds = [(ids[r == i], w[r == i], tok[r == i]) for i in range(max(seen.values(), default=0))]
        for ids_r, w_r, tok_r in rounds:
            key = ids_r % P  # [N_r] slot of each token-expert pair
            order = torch.argsort(key, stable=True)
            key, w_r, tok_r = key[order], w_r[order], tok_r[order]
            counts = torch.zeros(P, dtype=torch.int32, device=self.device).scatter_add_(
                0, key, torch.ones_like(key, dtype=torch.int32)
            )  # [P], no host sync (unlike bincount on CUDA)
            offs = counts.cumsum(0, dtype=torch.int32)
            h = torch._grouped_mm(x[tok_r], self.gate_up.transpose(1, 2), offs=offs)  # [N_r, 2I]
            gate, up = h.chunk(2, dim=-1)
            y = torch._grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=offs)  # [N_r, H]
            out.index_add_(0, tok_r, y.float() * w_r[:, None])


def grouped_mm_status(layer: MoELayer) -> tuple[bool, str]:
    """(available, why): `torch._grouped_mm` exists, runs for this device, dtype and shape, and agrees
    with the loop kernel on a small routing."""
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch._grouped_mm does not exist in torch {torch.__version__} (it needs torch >= 2.8)"
    K = layer.shape.top_k
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(layer.shape.num_experts, generator=gen)[:K] for _ in range(3)])  # [3, K]
    routing = Routing(torch.rand(3, K, generator=gen), ids)
    x = torch.randn(3, layer.shape.hidden, generator=gen).to(layer.device, layer.dtype)
    try:
        got = layer.forward(x, routing, "grouped_mm").float()
    except Exception as e:  # any failure means "not usable here"
        return False, f"torch._grouped_mm failed for {layer.dtype} on {layer.device.type}: {str(e).splitlines()[0]}"
    want = layer.forward(x, routing, "loop").float()
    tol = 1e-4 if layer.dtype == torch.float32 else 3e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max().clamp_min(1))):
        return False, "torch._grouped_mm disagrees with the loop kernel here"
    return True, "torch._grouped_mm works here"


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for but torch sees no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (fast matmuls there), bfloat16 on CUDA (what models are served in)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _random(size: tuple[int, ...], scale: float, dtype, device, gen) -> torch.Tensor:
    """Uniform in ±scale: a random block of up to 16M values tiled over the tensor."""
    out = torch.empty(size, dtype=dtype, device=device)
    flat = out.view(-1)
    block = min(flat.numel(), 1 << 24)
    flat[:block].uniform_(-scale, scale, generator=gen)
    for start in range(block, flat.numel(), block):
        n = min(block, flat.numel() - start)
        flat[start : start + n].copy_(flat[:n])
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


