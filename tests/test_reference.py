"""The shipped reference model: files match their recorded checksums, it loads offline, generates, its
held-out cross-entropy on a fixed slice matches the model card, its held-out split carries domain labels,
and the card's routing numbers are those of a domain-specialised, balanced model."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from moe_reroute import RouterSpec, reference
from moe_reroute.reference import card, corpus


@pytest.fixture(scope="module")
def folder():
    return reference.path()


@pytest.fixture(scope="module")
def card_json(folder):
    return json.loads((folder / "card.json").read_text())


@pytest.fixture(scope="module")
def loaded():
    """Load with every network connection refused: the model must need nothing from a hub."""
    def refuse(*args, **kwargs):
        raise OSError("network access during reference.load()")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    try:
        yield reference.load()
    finally:
        mp.undo()


def test_files_match_checksums(folder, card_json):
    recorded = card_json["sha256"]
    for name in reference.FILES:
        assert name in recorded, f"{name} has no recorded checksum"
    for name, digest in recorded.items():
        assert card.sha256(folder / name) == digest, f"{name} differs from the file the model card measured"


def test_weights_fit_the_size_budget(folder):
    assert (folder / "model.safetensors").stat().st_size <= 40 * 1024 * 1024


def test_loads_offline_with_qwen3_30b_router_geometry(loaded):
    model, tokenizer, heldout = loaded
    cfg = model.config
    assert cfg.model_type == "qwen3_moe"
    assert cfg.num_hidden_layers >= 4
    spec = RouterSpec.from_config(cfg)
    assert (spec.num_experts, spec.top_k, spec.renormalize, spec.scoring) == (128, 8, True, "softmax")
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert len(heldout) > 100_000


def test_generates_text(loaded):
    model, tokenizer, _ = loaded
    prompt = tokenizer("To be, or not to be", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 12)
    text = tokenizer.decode(out[0, prompt.shape[1]:])
    assert len(text.strip()) > 0
    # a trained model continues with words of the corpus' vocabulary, not byte noise
    assert sum(ch.isalpha() or ch.isspace() for ch in text) / len(text) > 0.7


def test_heldout_cross_entropy_matches_card(loaded, card_json):
    model, tokenizer, heldout = loaded
    ids = card.heldout_ids(tokenizer, heldout)
    assert len(ids) == card_json["heldout_tokens"]
    ce = card.cross_entropy(model, ids, max_tokens=4096)
    assert ce == pytest.approx(card_json["heldout_ce_slice"], abs=2e-3)
    # and it is a language model: far better than the unigram baseline on the same split
    assert ce < card_json["baselines"]["unigram"] - 1.0


def test_card_reports_balanced_layers(card_json):
    loads = card_json["routing"]["per_layer_load"]
    assert len(loads) >= 4
    for layer, ld in loads.items():
        assert ld["min_x_uniform"] >= 0.25 and ld["max_x_uniform"] <= 4.0, f"layer {layer} load {ld}"


def test_heldout_split_has_domain_labels(folder, loaded):
    _, _, heldout = loaded
    docs = reference.heldout_documents()
    domains = {d.domain for d in docs}
    assert len(domains) >= 5 and domains <= set(corpus.DOMAINS)
    assert "\n\n".join(d.text for d in docs) == heldout  # heldout.txt is the same text, plain
    train = json.loads((folder / "training.json").read_text())["corpus"]
    for domain, info in train["domains"].items():  # the documents the data card counted
        assert sum(d.domain == domain for d in docs) == info["heldout_documents"], domain
    for domain, names in train["heldout_named"].items():
        assert {d.name for d in docs if d.domain == domain} == set(names)


def test_card_routing_is_domain_specialised(card_json):
    """Same-domain batches touch fewer experts than mixed ones in every layer, both below uniform; the
    card's per-domain cross-entropy beats the bigram baseline fitted on the training split."""
    r = card_json["routing"]
    uniform = card.uniform_u(128, 8, 16)
    assert r["uniform_expectation"] == pytest.approx(uniform, abs=0.01)
    for layer, u in r["same_domain_mean_u"].items():
        assert u < r["mixed_mean_u"][layer] < uniform
        top1, top3, top8 = r["mass_share_top1_top3_topK"][layer]
        assert 0 < top1 < top3 < top8 <= 1
    for domain, v in card_json["heldout_ce_by_domain"].items():
        assert v["ce"] < v["bigram"] < v["unigram"], domain


def test_card_markdown_matches_card_json(folder, card_json):
    text = (folder / "MODEL_CARD.md").read_text()
    training = json.loads((folder / "training.json").read_text())
    assert text == card.render(card_json, training)
