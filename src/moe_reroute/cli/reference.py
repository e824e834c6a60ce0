"""`moe-reroute train-reference` and `moe-reroute reference-card`: build and measure the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

from .inputs import InputError, at_least, check_out_dir

DEFAULT_WORKDIR = Path.home() / ".cache" / "moe_reroute" / "reference"
DEFAULT_MODEL_OUT = "moe-reroute-reference"  # in the working directory, never the installed package
DEFAULT_CARD_OUT = "moe-reroute-reference-card"


def shipped_folder() -> Path:
    """The installed package's own reference model folder, written only with --refresh-shipped."""
    return Path(__file__).resolve().parent.parent / "reference" / "model"


def _train_reference(args) -> int:
    from ..reference.train import TrainConfig, calibrate_sere, train

    out = shipped_folder() if args.refresh_shipped else Path(args.out)
    if args.refresh_shipped and args.out != DEFAULT_MODEL_OUT:
        raise InputError("give --out or --refresh-shipped, not both")
    check_out_dir(out)
    check_out_dir(args.workdir, "--workdir")
    at_least(args.tokens, 1, "--tokens")
    cfg = TrainConfig(train_tokens=args.tokens, seed=args.seed)
    print(f"corpus, tokenizer and checkpoints in {args.workdir}; {cfg.steps} steps of "
          f"{cfg.batch_size}x{cfg.seq_len} tokens; an interrupted run resumes from its last checkpoint")
    folder = train(Path(args.workdir), out, cfg)
    calibrate_sere(Path(args.workdir), folder)
    print(f"model written to {folder}")
    return 0


def _reference_card(args) -> int:
    import torch

    from ..reference import card, load, path

    out = shipped_folder() if args.refresh_shipped else check_out_dir(args.out)
    if args.refresh_shipped and args.out != DEFAULT_CARD_OUT:
        raise InputError("give --out or --refresh-shipped, not both")
    model, tokenizer, heldout = load()
    folder = path()
    ids = card.heldout_ids(tokenizer, heldout)
    result = {
        "heldout_tokens": len(ids),
        "heldout_ce": round(card.cross_entropy(model, ids), 4),
        "heldout_ce_slice": round(card.cross_entropy(model, ids, max_tokens=4096), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "routing": card.routing_stats(model, ids),
        "sha256": {str(f.relative_to(folder)): card.sha256(f) for f in sorted(folder.rglob("*"))
                   if f.is_file() and f.name not in ("card.json", "MODEL_CARD.md")},
    }
    if args.workdir and (Path(args.workdir) / "train_ids.pt").exists():
        train_ids = torch.load(Path(args.workdir) / "train_ids.pt", weights_only=True).long()
        result["train_split_tokens"] = len(train_ids)
        result["baselines"] = {k: round(v, 4) for k, v in
                               card.ngram_baselines(train_ids, ids, model.config.vocab_size).items()}
    text = json.dumps(result, indent=1)
    training = json.loads((folder / "training.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "card.json").write_text(text + "\n")
    (out / "MODEL_CARD.md").write_text(card.render(result, training))
    print(text)
    print(f"model card written to {out / 'MODEL_CARD.md'}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("train-reference", help="rebuild corpus, tokenizer and the reference model from scratch")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="corpus, tokenizer and checkpoints")
    p.add_argument("--out", default=DEFAULT_MODEL_OUT, help=f"where to write the model (default ./{DEFAULT_MODEL_OUT})")
    p.add_argument("--refresh-shipped", action="store_true",
                   help="for maintainers: overwrite the reference model shipped in the package's own folder")
    p.add_argument("--tokens", type=int, default=10_000_000, help="training tokens")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_train_reference)
    p = sub.add_parser("reference-card", help="measure the shipped reference model for its model card")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="training corpus for the n-gram baselines")
    p.add_argument("--out", default=DEFAULT_CARD_OUT,
                   help=f"folder for card.json and MODEL_CARD.md (default ./{DEFAULT_CARD_OUT})")
    p.add_argument("--refresh-shipped", action="store_true",
                   help="for maintainers: write them into the shipped model's folder in the package")
    p.set_defaults(run=_reference_card)
