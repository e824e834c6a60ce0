"""Reading the library's safetensors files (traces, similarity matrices) with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import torch


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the safetensors file at `path`, on CPU.

    `what` says what the file should be ("a routing trace written by Trace.save"); a missing path raises
    FileNotFoundError, a directory or a file that is empty, truncated or not safetensors raises
    ValueError naming the file and `what`.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file at {path}; expected {what}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected {what}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise ValueError(f"{path} is not a readable safetensors file ({reason}); expected {what}") from None
    return tensors, metadata
