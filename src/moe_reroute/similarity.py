"""SERE's similarity file: {MoE-layer index: [E, E]} as safetensors, keys `layer.<i>`.

The format sits below both the policies (a `sere:similarity=FILE` spec reads it) and the transformers
adapter (`moe_reroute.hf.calibrate_similarity` computes what is written here); it imports only torch and
safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_similarity(similarity: dict[int, torch.Tensor], path: str | Path, **meta: str) -> Path:
    """Write {MoE-layer index: [E, E]} as safetensors (keys `layer.<i>`, i the MoE-layer index; the
    metadata says so: "layers": "moe")."""
    from safetensors.torch import save_file

    from .files import write_atomic

    path = Path(path)
    # a copy of each: layers may share one tensor, which safetensors refuses to write twice
    tensors = {f"layer.{k}": v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in similarity.items()}
    metadata = {"moe_reroute": "similarity", "layers": "moe", **{k: str(v) for k, v in meta.items()}}
    # written beside `path` and renamed onto it; a device, FIFO or folder at `path` is refused, never replaced
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_similarity(path: str | Path, num_experts: int | None = None) -> dict[int, torch.Tensor]:
    """Read {MoE-layer index: [E, E]} written by `save_similarity`; checks the size when `num_experts` is
    given.

    A file that is missing raises FileNotFoundError; one that is not such a file (a directory, empty,
    truncated, other tensors, values that are not finite floats) raises ValueError naming it.
    """
    from .files import read_safetensors

    path = Path(path)
    what = "a similarity file written by `moe-reroute calibrate` (moe_reroute.hf.save_similarity)"
    tensors, _ = read_safetensors(path, what)
    keys = sorted(tensors)
    layers = {k: k.split(".", 1)[1] for k in keys if k.startswith("layer.")}
    bad = [k for k in keys if k not in layers or not (layers[k].isascii() and layers[k].isdigit()
                                                       and str(int(layers[k])) == layers[k])]
    if bad or not tensors:
        raise ValueError(f"{path} is not a moe-reroute similarity file (keys {keys[:4]}); expected {what}, "
                         "with keys layer.0, layer.1, ...")
    out = {int(layers[k]): v for k, v in tensors.items()}
    for layer, m in out.items():
        if m.dim() != 2 or m.shape[0] != m.shape[1] or (num_experts is not None and m.shape[0] != num_experts):
            want = f"[{num_experts}, {num_experts}]" if num_experts else "square [E, E]"
            raise ValueError(f"{path}: layer {layer} similarity is {tuple(m.shape)}, expected {want}")
        if not m.dtype.is_floating_point or not bool(torch.isfinite(m).all()):
            raise ValueError(f"{path}: layer {layer} similarity must be finite floating point ({m.dtype}); "
                             "calibrate it again with `moe-reroute calibrate`")
    return out
