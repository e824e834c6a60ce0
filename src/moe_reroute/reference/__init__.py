"""The embedded default model: a small Qwen3-MoE trained by the project (128 experts, top-8).

`path()` is the folder holding config, bf16 weights, tokenizer, held-out text and a calibration sample;
`load()` returns (model, tokenizer, heldout_text) on CPU in float32, without network access;
`heldout_documents()` gives the held-out split with each document's domain, text the model never saw in
training, in two disjoint parts (`corpus.heldout_parts`): "validation" (validation.jsonl), to evaluate on,
the default; "tuning" (tuning.jsonl), to tune and calibrate on; "all" (heldout.jsonl; heldout.txt is the
same text, plain), both. `calibration_documents()` is a sample of the training split (calibration.jsonl),
text the model was trained on, never for evaluation.
Rebuild it with `moe-reroute train-reference` (see moe_reroute.reference.train).
"""

from __future__ import annotations

from pathlib import Path

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "heldout.txt", "heldout.jsonl",
         "calibration.jsonl", "tuning.jsonl", "validation.jsonl")
PARTS = {"validation": "validation.jsonl", "tuning": "tuning.jsonl", "all": "heldout.jsonl"}


def path() -> Path:
    """The local folder of the shipped reference model (loadable by path by transformers or vLLM)."""
    folder = Path(__file__).resolve().parent / "model"
    missing = [f for f in FILES if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"the reference model files {missing} are not in {folder}; this install lacks the shipped model. "
            "Reinstall moe-reroute, or rebuild it with `moe-reroute train-reference`."
        )
    return folder


def load(dtype=None, folder=None):
    """(model, tokenizer, heldout_text): the reference model on CPU, float32 by default, eval mode.
    `folder`: a model folder written by `moe-reroute train-reference --out` instead of the shipped one."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from transformers.utils import logging as hf_logging

    from ..progress import is_terminal

    folder = path() if folder is None else Path(folder)
    quiet = not is_terminal() and hf_logging.is_progress_bar_enabled()  # no \r-bars in logs and files
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, local_files_only=True)
    finally:
        if quiet:  # the caller's setting is left as it was
            hf_logging.enable_progress_bar()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer, (folder / "heldout.txt").read_text()


def heldout_documents(folder=None, part: str = "validation"):
    """A part of the held-out split as `corpus.Document`s (domain, name, text), every domain: "validation"
    (the default: evaluate on it), "tuning" (tune and calibrate on it) or "all" (both: whole documents)."""
    from .corpus import read_jsonl

    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    folder = path() if folder is None else Path(folder)
    file = folder / PARTS[part]
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist: {folder} was exported before models shipped the held-out "
                                "split in two parts; write them with moe_reroute.reference.write_heldout_parts(folder)")
    return read_jsonl(file)


def write_heldout_parts(folder) -> tuple[Path, Path]:
    """Write tuning.jsonl and validation.jsonl from the folder's heldout.jsonl (`corpus.heldout_parts`)."""
    from .corpus import heldout_parts, write_jsonl

    folder = Path(folder)
    tuning, validation = heldout_parts(heldout_documents(folder, "all"))
    write_jsonl(folder / PARTS["tuning"], tuning)
    write_jsonl(folder / PARTS["validation"], validation)
    return folder / PARTS["tuning"], folder / PARTS["validation"]


def calibration_documents(folder=None):
    """A sample of the training split as `corpus.Document`s (domain, name, text), every domain: text to
    calibrate or tune on (see `corpus.calibration_sample`); evaluate on `heldout_documents()` instead."""
    from .corpus import read_jsonl

    folder = path() if folder is None else Path(folder)
    file = folder / "calibration.jsonl"
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist: {folder} was exported before models shipped a calibration "
                                "sample. Rerun the `moe-reroute train-reference` command that made it, with the same "
                                "--workdir and options: it resumes from the final checkpoint and exports again.")
    return read_jsonl(file)
