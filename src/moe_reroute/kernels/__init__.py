"""Fused Triton kernels for every policy: one launch per call where the batch fits one program, two otherwise
(three for lynx).

`route(policy, router_logits, spec, valid, config, layer, fixed)` runs the policy's kernel on checked inputs
with its parameters resolved on the host, so a call never synchronises, never makes a data-dependent shape and
can be captured in a CUDA graph. The kernels follow the library's ranking rule with ties="lower-id";
their answers are the torch policies' (`make_policy(..., backend="torch", ties="lower-id")`): the same
ids, weights within float32 rounding.

Triton is imported lazily; `available()` says whether the kernels can run and why not. On CPU tensors
they run only through Triton's interpreter (TRITON_INTERPRET=1), which is how they are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ..contract import RouterSpec, Routing
from ..scoring import BUDGET_GRID

# Triton releases the kernels are tested with (3.6 on, as on torch 2.11's CUDA build; 3.2's interpreter
# cannot run them); older ones fall back to torch with one warning.
MIN_TRITON = (3, 6)
# Experts per layer the kernels take: up to Qwen3-Next's 512, the largest E they are tested at. Their loops over
# chunks of experts are loops, not unrolled, so compile time does not grow with E (`python
# tests/kernel_compile.py --experts 512`: 2 to 22 s a case on a 2-core CPU, docs/gpu.md). Larger layers use
# the torch policies, with one warning.
MAX_EXPERTS = 512
_TILE = 4096  # tokens x padded experts per program on a GPU (registers)
_MAX_BT = 128
_TILE_INTERPRETED = 1 << 16  # the interpreter runs a program as numpy arrays: fewer, larger programs
MAX_GRID_STEPS = 65535  # steps per launch: CUDA's limit on a grid's second axis


def block_tokens(T: int, E: int, device: torch.device) -> int:
    """Tokens per program for T tokens of E experts (a batch of at most this many is one launch).

    It depends on E alone, not on T: every batch size of a layer shares one compiled kernel per phase
    (an engine capturing CUDA graphs for many batch sizes compiles each policy once, not once per size).
    """
    e_block = max(_p2(E), 16)
    tile = _TILE_INTERPRETED if device.type != "cuda" else _TILE
    return max(1, min(tile // e_block, _MAX_BT))


class _Launches:
    """Counts kernel launches (for tests and benchmarks): `with counting() as c: ...; c.count`."""

    def __init__(self) -> None:
        self.count = 0


_counters: list[_Launches] = []


@contextlib.contextmanager
def counting() -> Iterator[_Launches]:
    c = _Launches()
    _counters.append(c)
    try:
        yield c
    finally:
        _counters.remove(c)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _version(v: str) -> tuple[int, ...]:
    """(major, minor) of a version string; (0, 0) if it does not start with two numbers."""
    try:
        return tuple(int(x) for x in v.split(".")[:2])
    except ValueError:
        return (0, 0)


@functools.lru_cache(maxsize=1)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton
    except ImportError as e:  # not installed, or broken
        return False, f"Triton is not importable ({e}); install it with `pip install 'moe-reroute[kernels]'` (Triton)"
    if _version(triton.__version__) < MIN_TRITON:
        return False, f"Triton {triton.__version__} is older than the kernels support (>= {'.'.join(map(str, MIN_TRITON))})"
    return True, ""


@functools.lru_cache(maxsize=1)
def _interpreter_status() -> tuple[bool, str]:
    """Triton's interpreter before 3.7 turns a scalar argument into a 1-element array and calls int() on it
    where the kernel loops over the tokens; numpy 2.4 made that an error (TypeError: only 0-dimensional
    arrays can be converted to Python scalars)."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return False, (f"Triton {triton.__version__}'s interpreter cannot run the kernels with numpy "
                       f"{numpy.__version__}; install Triton >= 3.7 or `pip install 'numpy<2.4'` (compiled on a "
                       "GPU, Triton 3.6 is fine)")
    return True, ""


def too_many_experts(E: int) -> str:
    """Why a layer of E experts does not use the kernels ("" when it does)."""
    if E <= MAX_EXPERTS:
        return ""
    return (f"E={E} experts exceeds the kernels' bound of {MAX_EXPERTS} (the largest layer they are tested and "
            "compiled at)")


def available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(True, "") if the kernels can run on `device` (default: CUDA), else (False, why not)."""
    ok, why = _triton_status()
    if not ok:
        return ok, why
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, ""
    if interpreting():
        return _interpreter_status()
    return False, (f"the Triton kernels need CUDA tensors, got {dev.type}; set TRITON_INTERPRET=1 to run them "
                   "on CPU through Triton's interpreter (slow: for tests)")


_warned: set[str] = set()


def warn_once(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"moe_reroute: fused routing kernels unavailable, using the torch policies: {why}", stacklevel=3)


def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _kernel():
    from . import triton_route

    return triton_route


def _policy_params(name: str, spec: RouterSpec, config: Any) -> dict[str, Any]:
    E, K = spec.num_experts, spec.top_k
    p = dict(k_param=0, k_max=K, max_rank=E, p_top=1.0, threshold=0.0, CAP_RENORM=False, TOP_P=False, LIMIT_RANK=False)
    if name == "cap":
        p["k_param"] = int(config.k)
        p["CAP_RENORM"] = bool(spec.renormalize if config.renormalize is None else config.renormalize)
    elif name == "oea":
        p["k_param"] = int(config.k0)
        p["k_max"] = K if config.k_max is None else int(config.k_max)
        p["max_rank"] = E if config.max_rank is None else int(config.max_rank)
        p["p_top"] = float(config.p)
        p["TOP_P"] = p["p_top"] < 1.0
        p["LIMIT_RANK"] = p["max_rank"] < E
    elif name == "sere":
        p["k_param"] = int(config.primary)
        p["threshold"] = float(config.threshold)
    elif name == "budget":
        p["k_param"] = int(config.budget)
    if name in ("oea", "budget") and config.ep is not None:  # the set under a cap on experts per rank
        from ..policies.budget import rank_cap

        if name == "budget":
            cap = rank_cap(config)
        else:  # oea without rank_cap: -1, ceil(|base set| / D) found in the kernel
            cap = config.rank_cap if config.rank_cap is not None else -1
        p.update(ep_ranks=int(config.ep), ep_cap=int(cap))
    return p


def _xshare_params(policy: Any, spec: RouterSpec, config: Any, T: int) -> dict[str, Any]:
    """xshare: k_param = the global set's size m, k_max = k0, max_rank = the group budget, k_group = the group
    size; all 0 (k_group 1) where the policy routes natively at this batch size."""
    m, k0, gb, g = policy.kernel_params(spec, config, T)
    return dict(k_param=m, k_max=k0, max_rank=gb, k_group=g, p_top=1.0, threshold=0.0, CAP_RENORM=False,
                TOP_P=False, LIMIT_RANK=False)


def _lynx_params(config: Any) -> dict[str, Any]:
    """lynx: k_param = beta (buckets 0..beta), p_top = alpha, k_max = 1 for variant "quant_flatten_remove"."""
    return dict(k_param=int(config.beta), k_max=int(config.variant == "quant_flatten_remove"), max_rank=0,
                p_top=float(config.alpha), threshold=0.0, CAP_RENORM=False, TOP_P=False, LIMIT_RANK=False)


def _similarity(policy: Any, config: Any, layer: int | None, device: torch.device) -> torch.Tensor:
    """The layer's similarity as a contiguous float32 tensor on `device`, converted once and cached."""
    sim = config.similarity_at(layer)
    cache = policy.__dict__.setdefault("_kernel_sim", {})
    key = (id(sim), str(device))
    hit = cache.get(key)
    if hit is None or hit[0] is not sim:
        hit = (sim, sim.to(device=device, dtype=torch.float32).contiguous())
        cache[key] = hit
    return hit[1]


def route(policy: Any, router_logits: torch.Tensor, spec: RouterSpec, valid: torch.Tensor | None,
          config: Any, layer: int | None, fixed: torch.Tensor | None = None) -> Routing:
    """Run `policy` (its name and resolved `config`) as a fused kernel. Inputs are already checked.
    lynx takes three launches where the batch spans several programs (bucket counts, votes, routing).

    fixed: [T] bool rows that keep native routing, or None (the kernel is then built without that code).
    router_logits [S, T, E] (valid, fixed [S, T]) routes each step as its own batch, on a grid over steps
    (one launch per phase for up to MAX_GRID_STEPS steps).
    """
    name = policy.name
    tr = _kernel()
    T, E = router_logits.shape[-2:]
    steps = tuple(router_logits.shape[:-2])  # () or (S,)
    S = steps[0] if steps else 1
    K = spec.top_k
    dev = router_logits.device
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    E_BLOCK = max(_p2(E), 16)
    K_BLOCK = max(_p2(K), 2)
    BT = block_tokens(T, E, dev)
    nb = -(-T // BT)
    ids = torch.empty(*steps, T, K, dtype=torch.int64, device=dev)
    weights = torch.empty(*steps, T, K, dtype=torch.float32, device=dev)
    if name == "xshare":
        params = _xshare_params(policy, spec, config, T)
    elif name == "lynx":
        params = _lynx_params(config)
    else:
        params = _policy_params(name, spec, config)
    batch_wide = name in ("oea", "sere", "budget", "xshare", "lynx")
    has_ep = "ep_ranks" in params
    part_dtype = torch.float64 if name == "xshare" else torch.int32  # xshare: logit sums, in float64 as torch
    # lynx: a count of rows per bucket (0..beta) and expert; oea under EP: its base set, then its mass
    part_len = (params["k_param"] + 1) * E_BLOCK if name == "lynx" else (2 if has_ep else 1) * E_BLOCK
    part_a = torch.empty(S, nb, part_len, dtype=part_dtype, device=dev) if batch_wide else ids
    with_b = name in ("budget", "xshare", "lynx") or has_ep
    part_b = torch.empty(S, nb, E_BLOCK, dtype=torch.int32, device=dev) if with_b else part_a
    place = router_logits
    if has_ep:  # the layer's placement: [E] int64 rank of each expert (made once per device, cached with the config)
        from ..policies.ep import layer_placement

        place = layer_placement(config, E, layer, dev)
    bias = spec.e_score_correction_bias
    sim = _similarity(policy, config, layer, dev) if name == "sere" else router_logits
    # the kernel reads a step's flags at step * T: a [S, T] mask must be contiguous (a [T] one always is)
    valid_arg = valid.contiguous().view(torch.uint8) if valid is not None else router_logits
    fixed_arg = fixed.contiguous().view(torch.uint8) if fixed is not None else router_logits
    scoring = {"softmax": tr.SOFTMAX, "topk_softmax": tr.TOPK_SOFTMAX, "sigmoid": tr.SIGMOID}[spec.scoring]
    n_group = spec.n_group if spec.scoring == "sigmoid" else 1
    topk_group = spec.topk_group if spec.scoring == "sigmoid" else 1
    consts = dict(
        POLICY=tr.__dict__[name.upper()], SCORING=scoring, K=K, K_BLOCK=K_BLOCK, E=E, E_BLOCK=E_BLOCK, BT=BT,
        T_CHUNK=1024, P_CHUNK=max(1, min(64, _TILE // E_BLOCK)),
        HAS_VALID=valid is not None, HAS_FIXED=fixed is not None, HAS_BIAS=bias is not None,
        RENORM=bool(spec.renormalize), CAP_RENORM=params.pop("CAP_RENORM"), N_GROUP=n_group, TOPK_GROUP=topk_group,
        GROUP_SIZE=E // n_group,
        G_BLOCK=max(_p2(n_group), 2), ROUND_BF16=spec.scoring == "topk_softmax" and router_logits.dtype == torch.bfloat16,
        ROUND_FP16=spec.scoring == "topk_softmax" and router_logits.dtype == torch.float16,
        TOP_P=params.pop("TOP_P"), LIMIT_RANK=params.pop("LIMIT_RANK"), GRID=BUDGET_GRID,
        CHUNK=max(1, min(E_BLOCK, _TILE // E_BLOCK)), HAS_EP=has_ep,
    )
    stride_s = router_logits.stride(0) if steps else 0
    # lynx: its votes need the whole batch's bucket counts, and its keep set the whole batch's votes
    phases = (0,) if (nb == 1 or not batch_wide) else ((1, 2, 3) if name == "lynx" else (1, 2))
    for s0 in range(0, S, MAX_GRID_STEPS):  # CUDA bounds the grid's second axis
        n = min(MAX_GRID_STEPS, S - s0)

        def at(x: torch.Tensor) -> torch.Tensor:  # a step-major tensor from step s0 on (a view)
            return x[s0:] if s0 else x

        args = (at(router_logits), router_logits.stride(-2), stride_s, at(valid_arg), at(fixed_arg),
                bias if bias is not None else router_logits, sim, at(part_a), at(part_b), at(ids), at(weights), place,
                T, nb, float(spec.routed_scaling_factor), params["k_param"], params["k_max"], params["max_rank"],
                params["p_top"], params["threshold"], params.get("k_group", 1), part_len, params.get("ep_ranks", 1),
                params.get("ep_cap", 0))
        for phase in phases:
            tr.route_kernel[(nb, n)](*args, PHASE=phase, num_warps=4 if BT * E_BLOCK <= 2048 else 8, **consts)
            for c in _counters:
                c.count += 1
    if valid is None:  # as the torch policies return it: every row valid (made once per shape, then cached)
        cache = policy.__dict__.setdefault("_all_valid", {})
        key = (steps, T, str(dev))
        if key not in cache:
            cache[key] = torch.ones(*steps, T, dtype=torch.bool, device=dev)
        valid = cache[key]
    return Routing(weights=weights, ids=ids, valid=valid)
