"""Expert placement under expert parallelism: which of D ranks holds each of a layer's E experts.

A placement is an [E] int64 tensor (rank of each expert, the same in every MoE layer) or [L, E] (one row
per MoE layer, L = the model's MoE layers, dense layers not counted). Three ways to make one:

- `contiguous(E, D)`: expert e on rank e * D // E, i.e. e // (E / D) when D divides E (the layout of
  vLLM's and SGLang's expert parallelism without a load balancer).
- `balanced(load, D)`: EPLB-like, from each expert's load (e.g. tokens routed to it): heaviest expert
  first onto the least-loaded rank that still has room, every rank holding as many experts as under
  `contiguous`. Replicas of hot experts (EPLB's redundant experts) are not modelled: each expert is on
  one rank.
- `load_placement(path)`: a JSON file, a list of one rank per expert (`[0, 0, 1, 1, ...]`) or a list of
  such lists, one per MoE layer; `save_placement` writes one.

D need not divide E: then ranks hold floor(E/D) or ceil(E/D) experts (the contiguous blocks
e * D // E), and `balanced` keeps those sizes. A loaded file may place any number of experts on a rank.
E = experts, D = ranks, L = MoE layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

NAMES = ("contiguous", "eplb")
EXAMPLE = "[0, 0, 1, 1] (expert 0 and 1 on rank 0, 2 and 3 on rank 1), or one such list per MoE layer"
PLACEMENT_FILE_BYTES = 16 << 20


def check_ranks(num_experts: int, ranks: Any) -> int:
    """D as an int; raises ValueError saying how to fix a D that cannot split E experts."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"expert parallelism needs a whole number of ranks D >= 1, got {ranks!r}")
    if ranks > num_experts:
        raise ValueError(f"expert parallelism over D={ranks} ranks needs 1 <= D <= E={num_experts}: every rank "
                         f"holds at least one expert; use at most {num_experts} ranks")
    return ranks


def rank_sizes(num_experts: int, ranks: int) -> list[int]:
    """Experts per rank under `contiguous` (floor(E/D) or ceil(E/D); all equal when D divides E)."""
    check_ranks(num_experts, ranks)
    return [((r + 1) * num_experts + ranks - 1) // ranks - (r * num_experts + ranks - 1) // ranks
            for r in range(ranks)]


def contiguous(num_experts: int, ranks: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[E] int64: expert e on rank e * D // E (blocks of E / D consecutive experts)."""
    check_ranks(num_experts, ranks)
    return torch.arange(num_experts, device=device) * ranks // num_experts


def balanced(load: torch.Tensor, ranks: int) -> torch.Tensor:
    """EPLB-like placement from per-expert load: [E] -> [E], or [L, E] -> [L, E] (each layer on its own).

    Greedy, as EPLB's balanced packing: experts in order of decreasing load (equal loads: lower id first),
    each onto the rank with the least load so far among those with room (equal: lower rank); rank r has
    room for `rank_sizes(E, D)[r]` experts. Loads must be finite and >= 0 (e.g. token counts).
    """
    if not isinstance(load, torch.Tensor) or load.dim() not in (1, 2) or load.shape[-1] < 1:
        raise ValueError(f"expert load must be an [E] or [L, E] tensor, got "
                         f"{tuple(load.shape) if isinstance(load, torch.Tensor) else type(load).__name__}")
    x = load.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
        raise ValueError("expert load must be finite and >= 0 (e.g. tokens routed to each expert)")
    if x.dim() == 2:
        return torch.stack([balanced(row, ranks) for row in x])
    E = x.shape[0]
    room = rank_sizes(E, ranks)
    total = [0.0] * ranks
    out = [0] * E
    for e in sorted(range(E), key=lambda i: (-float(x[i]), i)):
        r = min((r for r in range(ranks) if room[r] > 0), key=lambda r: (total[r], r))
        out[e] = r
        room[r] -= 1
        total[r] += float(x[e])
    return torch.tensor(out, dtype=torch.int64)


def check_placement(placement: Any, num_experts: int, ranks: int, origin: str = "placement",
                    layers: int | None = None) -> torch.Tensor:
    """`placement` (a tensor or nested lists of ints) as an [E] or [L, E] int64 CPU tensor, checked: every
    expert placed, every rank in 0..D-1, L = `layers` when given. ValueError names `origin` and the fix."""
    check_ranks(num_experts, ranks)
    if isinstance(placement, torch.Tensor):
        if placement.dtype.is_floating_point or placement.dtype == torch.bool or placement.is_complex():
            raise ValueError(f"{origin}: ranks must be integers, got a {placement.dtype} tensor; write e.g. {EXAMPLE}")
        p = placement.detach().to("cpu", torch.int64)
    else:
        p = from_lists(placement, origin)
    if p.dim() not in (1, 2):
        raise ValueError(f"{origin}: a placement is a list of ranks (one per expert) or one such list per MoE layer, "
                         f"got {p.dim()} levels of nesting; write e.g. {EXAMPLE}")
    if p.shape[-1] != num_experts:
        raise ValueError(f"{origin}: places {p.shape[-1]} experts but the model has E={num_experts}; give a rank for "
                         f"every expert 0..{num_experts - 1}")
    if p.dim() == 2 and layers is not None and p.shape[0] != layers:
        raise ValueError(f"{origin}: gives {p.shape[0]} per-layer placements but the model has {layers} MoE layers; "
                         "give one list per MoE layer (dense layers not counted), or one list for every layer")
    bad = ((p < 0) | (p >= ranks)).nonzero()
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        what = f"expert {where[-1]}" + (f" of MoE layer {where[0]}" if p.dim() == 2 else "")
        raise ValueError(f"{origin}: {what} is on rank {int(p[where])}, but D={ranks} ranks are numbered "
                         f"0..{ranks - 1}; renumber it or use more ranks")
    return p


def int_lists(obj: Any, uneven: str, origin: str = "placement") -> torch.Tensor | None:
    """A non-empty JSON list of ints, or a non-empty list of such lists, as an int64 tensor ([N] or [L, N]);
    None when `obj` is neither; ValueError(`uneven`) when the lists differ in length, and one naming
    `origin` for an int past int64."""
    def ints(v: Any) -> bool:
        if not (isinstance(v, list) and bool(v) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
            return False
        big = next((i for i in v if not -(1 << 62) < i < 1 << 62), None)
        if big is not None:  # past int64: no rank or expert id, and torch could not hold it
            raise ValueError(f"{origin}: {str(big)[:20]}{'...' if len(str(big)) > 20 else ''} is far "
                             "too large for a rank or an expert id")
        return True

    if ints(obj):
        return torch.tensor(obj, dtype=torch.int64)
    if isinstance(obj, list) and obj and all(ints(r) for r in obj):
        if len({len(r) for r in obj}) != 1:
            raise ValueError(uneven)
        return torch.tensor(obj, dtype=torch.int64)
    return None


def from_lists(obj: Any, origin: str) -> torch.Tensor:
    """A JSON placement (a list of ranks, or one list per MoE layer) as an int64 tensor; its shape only is checked."""
    lengths = sorted({len(r) for r in obj if isinstance(r, list)}) if isinstance(obj, list) else []
    out = int_lists(obj, f"{origin}: the per-layer placements have {lengths} experts; every MoE layer places all E "
                         "experts", origin)
    if out is None:
        raise ValueError(f"{origin}: a placement is a non-empty JSON list of integer ranks, one per expert, or one "
                         f"such list per MoE layer; write e.g. {EXAMPLE}")
    return out


def read_placement_json(path: str | Path, origin: str | None = None) -> Any:
    """The parsed JSON of a placement file (a regular file, at most PLACEMENT_FILE_BYTES); `origin` names it
    in messages (default: its path)."""
    from .files import read_regular_text

    origin = str(path) if origin is None else origin
    text = read_regular_text(path, origin, f"expected a placement: {EXAMPLE}", limit=PLACEMENT_FILE_BYTES)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"{origin}: not valid JSON; a placement file holds a list of ranks, e.g. {EXAMPLE}") from None


def load_placement(path: str | Path, num_experts: int, ranks: int, layers: int | None = None) -> torch.Tensor:
    """Read and check a placement file (see the module docstring): [E] or [L, E] int64."""
    return check_placement(read_placement_json(path), num_experts, ranks, origin=str(path), layers=layers)


def save_placement(placement: torch.Tensor, path: str | Path) -> Path:
    """Write an [E] or [L, E] placement as the JSON `load_placement` reads."""
    from .files import write_text_atomic

    return write_text_atomic(path, json.dumps(placement.tolist()) + "\n")


def at_layer(placement: torch.Tensor, layer: int | None) -> torch.Tensor:
    """The [E] placement of MoE layer `layer` ([E] placements are the same in every layer)."""
    if placement.dim() == 1:
        return placement
    if layer is None:
        raise ValueError("the placement is given per MoE layer; call with layer=<MoE-layer index>")
    if not 0 <= layer < placement.shape[0]:
        raise ValueError(f"the placement lists {placement.shape[0]} MoE layers; MoE layer {layer} is out of range "
                         "(layers count MoE layers only, from 0)")
    return placement[layer]


def make_placement(how: str, num_experts: int, ranks: int, load: torch.Tensor | None = None,
                   layers: int | None = None) -> torch.Tensor:
    """"contiguous", "eplb" (needs `load`, [E] or [L, E]) or a placement file's path -> [E] or [L, E]."""
    if how == "contiguous":
        return contiguous(num_experts, ranks)
    if how == "eplb":
        if load is None:
            raise ValueError("an eplb placement is computed from each expert's load; give the load (e.g. a trace's "
                             "native routing)")
        return balanced(load, ranks)
    return load_placement(how, num_experts, ranks, layers)
