"""The reference corpus' split and man-page rendering, on made-up documents (no package downloads)."""

from __future__ import annotations

import gzip
import shutil

import pytest

from moe_reroute.reference import corpus
from moe_reroute.reference.corpus import Document


def fake_corpus() -> list[Document]:
    docs = [Document("shakespeare", "twelfth_night", "x" * 1000), Document("shakespeare", "hamlet", "y" * 500)]
    docs += [Document("kjv", n, "v" * 300) for n in corpus.HELDOUT_NAMED["kjv"] + ["Genesis", "Exodus"]]
    for domain in corpus.DOMAINS[2:]:
        docs += [Document(domain, f"doc{i}", f"{domain} {i} " * 5000) for i in range(120)]  # ~50k chars each
    return docs


def test_split_is_whole_documents_per_domain(monkeypatch):
    monkeypatch.setattr(corpus, "TRAIN_CHARS", 1_000_000)
    train, held = corpus.split(fake_corpus())
    keys = lambda docs: {(d.domain, d.name) for d in docs}  # noqa: E731
    assert not keys(train) & keys(held)
    assert {d.name for d in held if d.domain == "shakespeare"} == {"twelfth_night"}
    assert {d.name for d in held if d.domain == "kjv"} == set(corpus.HELDOUT_NAMED["kjv"])
    for domain in corpus.DOMAINS:
        assert any(d.domain == domain for d in train), domain
        assert sum(len(d.text) for d in train if d.domain == domain) < corpus.TRAIN_CHARS + 60_000  # capped
    for domain in corpus.DOMAINS[2:]:  # drawn documents: at most HELDOUT_MAX_DOC long, about HELDOUT_CHARS
        h = [d for d in held if d.domain == domain]
        assert all(len(d.text) <= corpus.HELDOUT_MAX_DOC for d in h)
    assert corpus.split(fake_corpus()) == (train, held)  # stable, no RNG


def test_split_names_missing_heldout_documents():
    docs = [d for d in fake_corpus() if d.name != "Jonah"]
    with pytest.raises(RuntimeError, match="Jonah"):
        corpus.split(docs)


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff (apt-get install -y groff-base)")
def test_render_man(tmp_path):
    page = tmp_path / "demo.1.gz"
    page.write_bytes(gzip.compress(b'.TH DEMO 1\n.SH NAME\ndemo \\- zeigt \\fBfette\\fR Schrift\n.SH BESCHREIBUNG\n'
                                   b'Ein Beispiel mit   Umlauten: \xc3\xa4\xc3\xb6\xc3\xbc.\n'))
    text = corpus.render_man(page)
    assert "fette Schrift" in text and "äöü" in text and "\b" not in text and "\x1b" not in text
    alias = tmp_path / "alias.1"
    alias.write_bytes(b".so man1/demo.1\n")
    assert corpus.render_man(alias) == ""


def test_fetch_deb_checks_the_pin(tmp_path, monkeypatch):
    monkeypatch.setitem(corpus.DEBS, "tiny-pkg", ("1.0", "0" * 64))
    (tmp_path / "debs").mkdir()
    (tmp_path / "debs" / "tiny-pkg_1.0_all.deb").write_bytes(b"not the pinned file")
    with pytest.raises(RuntimeError, match="not the pinned"):
        corpus.fetch_deb("tiny-pkg", tmp_path)


def test_calibration_sample_is_bounded_deterministic_training_text():
    """Every domain, at most CALIBRATION_CHARS per domain and CALIBRATION_DOC_CHARS per document, each the
    start of a training document of its name, never a held-out one; independent of the input's order."""
    docs = fake_corpus()
    train, held = corpus.split(docs)
    cal = corpus.calibration_sample(train)
    by_key = {(d.domain, d.name): d for d in train}
    held_keys = {(d.domain, d.name) for d in held}
    assert {d.domain for d in cal} == set(corpus.DOMAINS)
    for domain in corpus.DOMAINS:
        size = sum(len(d.text) for d in cal if d.domain == domain)
        train_size = sum(len(d.text) for d in train if d.domain == domain)
        assert size <= corpus.CALIBRATION_CHARS, domain
        assert size >= min(train_size, corpus.CALIBRATION_CHARS - corpus.CALIBRATION_MIN_LEFT), domain  # filled
    for d in cal:
        assert len(d.text) <= corpus.CALIBRATION_DOC_CHARS
        assert (d.domain, d.name) not in held_keys
        assert by_key[(d.domain, d.name)].text.startswith(d.text)
    assert corpus.calibration_sample(train[::-1]) == cal
    assert corpus.calibration_sample(train) == cal
    with pytest.raises(RuntimeError, match="man-es"):
        corpus.calibration_sample([d for d in train if d.domain != "man-es"])


def test_calibration_slices_end_at_a_paragraph():
    text = "first paragraph\nof two lines\n\nsecond paragraph\n\nthird\n"
    assert corpus._leading(text, 1_000) == text
    assert corpus._leading(text, 40) == "first paragraph\nof two lines\n"  # not into the second paragraph
    assert corpus._leading(text, 20) == "first paragraph\n"  # no paragraph ends in time: a line does
    assert corpus._leading("x" * 50, 20) == "x" * 20


def test_heldout_parts_split_every_domain_by_document_into_disjoint_parts():
    _, held = corpus.split(fake_corpus())
    held += [corpus.Document("man-en", "long", "intro\n\n" + "paragraph of text.\n\n" * 400)]
    tuning, validation = corpus.heldout_parts(held)
    assert corpus.heldout_parts(held) == (tuning, validation)  # stable, no RNG
    present = {d.domain for d in held}
    assert {"shakespeare", "kjv", "man-en"} <= present
    for domain in present:
        t = [d for d in tuning if d.domain == domain]
        v = [d for d in validation if d.domain == domain]
        assert t and v, domain  # every domain has both parts
        whole = {d.name: d.text for d in held if d.domain == domain}
        if len(whole) == 1:  # one document: its head is validation text, its tail tuning text
            (name, text), = whole.items()
            assert [d.name for d in v] == [name + corpus.HEAD] and [d.name for d in t] == [name + corpus.TAIL]
            assert v[0].text + t[0].text == text
            assert v[0].text.endswith("\n") or "\n" not in text  # a paragraph or line end where there is one
        else:  # whole documents, each in one part
            assert sorted(d.name for d in t + v) == sorted(whole) and all(whole[d.name] == d.text for d in t + v)
        share = sum(len(d.text) for d in t) / sum(len(d.text) for d in t + v)
        assert 0.2 <= share <= 1.2 * corpus.TUNING_SHARE + 1e-9, (domain, share)


def test_heldout_parts_cut_one_document_at_the_paragraph_end_nearest_two_thirds():
    text = "".join(f"paragraph {i}.\n\n" for i in range(30))
    tuning, validation = corpus.heldout_parts([corpus.Document("kjv", "Ruth", text)])
    head, tail = validation[0].text, tuning[0].text
    assert head + tail == text and head.endswith("\n\n") and tail.startswith("paragraph ")
    ends = [i + 2 for i in range(len(text)) if text.startswith("\n\n", i)]
    assert len(head) == min(ends, key=lambda i: abs(i - round(len(text) * 2 / 3)))
