"""`moe-reroute train-reference` and `moe-reroute reference-card`: build and measure the shipped model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ..files import write_text_atomic
from .inputs import InputError, at_least, check_out_dir, in_range

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
    check_out_dir(out, package=args.refresh_shipped)
    check_out_dir(args.workdir, "--workdir")
    at_least(args.tokens, 1, "--tokens")
    at_least(args.balance_window, 1, "--balance-window")
    if args.stop_after is not None:
        at_least(args.stop_after, 1, "--stop-after")
    for option, value in (("--balance-coef", args.balance_coef), ("--z-loss", args.z_loss),
                          ("--revive-below", args.revive_below)):
        in_range(value, 0.0, 1e6, option)
    cfg = TrainConfig(train_tokens=args.tokens, seed=args.seed, balance_coef=args.balance_coef,
                      balance_window=args.balance_window, z_loss_coef=args.z_loss,
                      revive_below=args.revive_below)
    print(f"corpus, tokenizer and checkpoints in {args.workdir}; {cfg.steps} steps of "
          f"{cfg.batch_size}x{cfg.seq_len} tokens; an interrupted run resumes from its last checkpoint")
    try:
        folder = train(Path(args.workdir), out, cfg, stop_after=args.stop_after)
    except (RuntimeError, subprocess.SubprocessError) as e:  # building the corpus: a download or tool failed
        raise SystemExit(f"error: {e}") from None
    if folder is None:
        print(f"stopped after step {args.stop_after}; run again to resume")
        return 0
    calibrate_sere(Path(args.workdir), folder)
    print(f"model written to {folder}")
    return 0


def _card_parts_only(folder: Path, out: Path) -> int:
    """`reference-card --parts-only`: the card's held-out parts and checksums measured afresh, every other
    number kept from the folder's card.json (no model run, no training corpus needed)."""
    from transformers import PreTrainedTokenizerFast

    from ..reference import card

    recorded = folder / "card.json"
    if not recorded.is_file():
        raise InputError(f"--parts-only updates an existing card and {recorded} does not exist; run reference-card "
                         "without it")
    result = json.loads(recorded.read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    result["heldout_parts"] = card.parts_summary(tokenizer, folder)
    result["sha256"] = card.checksums(folder)
    training = json.loads((folder / "training.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "card.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out / "MODEL_CARD.md", card.render(result, training))
    print(f"held-out parts and checksums updated in {out / 'card.json'} and {out / 'MODEL_CARD.md'}")
    return 0


def _reference_card(args) -> int:
    import torch

    from ..reference import calibration_documents, card, heldout_documents, load, path
    from ..reference.train import train_stream

    out = check_out_dir(shipped_folder(), package=True) if args.refresh_shipped else check_out_dir(args.out)
    if args.refresh_shipped and args.out != DEFAULT_CARD_OUT:
        raise InputError("give --out or --refresh-shipped, not both")
    folder = Path(args.model_dir) if args.model_dir else path()
    if args.model_dir and not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "holds no config.json"
        raise InputError(f"--model-dir {folder} {what}; give the folder `moe-reroute train-reference --out` wrote")
    if args.parts_only:
        return _card_parts_only(folder, out)
    model, tokenizer, heldout = load(folder=folder)
    ids = card.heldout_ids(tokenizer, heldout)
    streams = card.domain_streams(tokenizer, heldout_documents(folder, "all"))
    workdir = Path(args.workdir)
    if not (workdir / "train_ids.pt").exists():
        raise InputError(f"no training split in {workdir} (train_ids.pt) for the n-gram baselines; build "
                         f"it with `moe-reroute train-reference --workdir {workdir}`, or pass the --workdir it used")
    train_ids = train_stream(workdir)
    baselines = card.NgramBaselines(train_ids, model.config.vocab_size)
    by_domain = {}
    for domain, s in streams.items():
        base = baselines.cross_entropy(s)
        by_domain[domain] = {"tokens": len(s), "ce": round(card.cross_entropy(model, s), 4),
                             "unigram": round(base["unigram"], 4), "bigram": round(base["bigram"], 4)}
    all_ids = torch.cat(list(streams.values()))
    result = {
        "heldout_tokens": len(ids),
        "heldout_ce_slice": round(card.cross_entropy(model, ids, max_tokens=4096), 4),
        "heldout_ce": round(sum(v["ce"] * v["tokens"] for v in by_domain.values())
                            / sum(v["tokens"] for v in by_domain.values()), 4),
        "heldout_ce_by_domain": by_domain,
        "baselines": {k: round(v, 4) for k, v in baselines.cross_entropy(all_ids).items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "routing": card.routing_stats(model, streams),
        "train_split_tokens": len(train_ids),
        "train_split_tokens_by_domain": {k: len(v) for k, v in
                                         torch.load(workdir / "train_ids.pt", weights_only=True).items()},
        "calibration": card.calibration_summary(tokenizer, calibration_documents(folder)),
        "heldout_parts": card.parts_summary(tokenizer, folder),
        "sha256": card.checksums(folder),
    }
    text = json.dumps(result, indent=1)
    training = json.loads((folder / "training.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "card.json", text + "\n")
    write_text_atomic(out / "MODEL_CARD.md", card.render(result, training))
    print(text)
    print(f"model card written to {out / 'MODEL_CARD.md'}")
    return 0


def add_parsers(sub) -> None:
    from ..reference.train import TrainConfig

    p = sub.add_parser("train-reference", help="rebuild corpus, tokenizer and the reference model from scratch")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="corpus, tokenizer and checkpoints")
    p.add_argument("--out", default=DEFAULT_MODEL_OUT, help=f"where to write the model (default ./{DEFAULT_MODEL_OUT})")
    p.add_argument("--refresh-shipped", action="store_true",
                   help="for maintainers: overwrite the reference model shipped in the package's own folder")
    p.add_argument("--tokens", type=int, default=TrainConfig.train_tokens,
                   help=f"training tokens (default {TrainConfig.train_tokens:,}, the shipped model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights' initialisation and the data order")
    p.add_argument("--balance-coef", type=float, default=TrainConfig.balance_coef,
                   help="load-balancing loss coefficient per layer (may change when resuming)")
    p.add_argument("--revive-below", type=float, default=TrainConfig.revive_below,
                   help="at each checkpoint, experts under this x uniform load become copies of the busiest (0: off)")
    p.add_argument("--stop-after", type=int, default=None, help="checkpoint at this step and stop (resume later)")
    p.add_argument("--balance-window", type=int, default=TrainConfig.balance_window,
                   help="steps whose expert counts make the global-batch load-balancing frequencies")
    p.add_argument("--z-loss", type=float, default=TrainConfig.z_loss_coef, help="router z-loss coefficient (0: off)")
    p.set_defaults(run=_train_reference, needs=("hf",))
    p = sub.add_parser("reference-card", help="measure the shipped reference model for its model card")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="training corpus for the n-gram baselines")
    p.add_argument("--out", default=DEFAULT_CARD_OUT,
                   help=f"folder for card.json and MODEL_CARD.md (default ./{DEFAULT_CARD_OUT})")
    p.add_argument("--refresh-shipped", action="store_true",
                   help="for maintainers: write them into the shipped model's folder in the package")
    p.add_argument("--model-dir", default=None, help="a model folder from `train-reference --out` (default: the shipped one)")
    p.add_argument("--parts-only", action="store_true", help="only measure the held-out split's tuning and "
                   "validation parts and the file checksums afresh, keeping the other numbers of the folder's card.json")
    p.set_defaults(run=_reference_card, needs=("hf",))
