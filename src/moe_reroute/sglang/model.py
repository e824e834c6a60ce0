"""A model folder SGLang 0.5.x serves as transformers does, for checkpoints with tied embeddings.

SGLang 0.5.23's Qwen3-MoE ignores `tie_word_embeddings`: served as it is, a checkpoint that stores only
`model.embed_tokens.weight` (the shipped reference model) gets an uninitialised `lm_head` and generates
token 0 everywhere. `untied_copy` writes a folder whose `lm_head.weight` is the embedding written out
and whose config says `tie_word_embeddings: false`; every other file is linked, not copied. transformers,
vLLM and SGLang generate the same tokens from it as transformers does from the original.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def needs_untying(folder: str | Path) -> bool:
    """Whether the checkpoint in `folder` ties its embeddings and stores no `lm_head.weight`."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if not config.get("tie_word_embeddings", False):
        return False
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            if HEAD in st.keys():
                return False
    return True


def untied_copy(folder: str | Path, out: str | Path) -> Path:
    """Write `out`: `folder` with the tied embedding written out as `lm_head.weight` (see the module);
    `folder` itself when it needs no such copy. `out` must not exist or be an empty folder."""
    from safetensors.torch import load_file, save_file

    folder, out = Path(folder), Path(out)
    if not needs_untying(folder):
        return folder
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; give a new folder for the untied copy")
    shards = sorted(folder.glob("*.safetensors"))
    holder = next((f for f in shards if EMBED in load_file(f)), None)
    if holder is None:
        raise ValueError(f"{folder}: ties its embeddings but no safetensors file holds {EMBED}")
    out.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name in ("config.json", holder.name) or f.name.endswith(".safetensors.index.json"):
            continue
        target = out / f.name
        try:
            os.symlink(f.resolve(), target)
        except OSError:
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, target)
    tensors = load_file(holder)
    tensors[HEAD] = tensors[EMBED].clone()
    save_file(tensors, out / holder.name, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data.setdefault("weight_map", {})[HEAD] = holder.name
        (out / index.name).write_text(json.dumps(data, indent=2))
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
