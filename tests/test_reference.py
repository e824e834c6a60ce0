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


def test_global_balance_uses_the_window_frequencies():
    """f from every step in the window, P from this batch only: hand-computed on two steps."""
    from moe_reroute.reference.train import GlobalBalance

    bal = GlobalBalance(layers=1, experts=4, window=2, top_k=1)
    first = torch.tensor([[9.0, 0, 0, 0], [9.0, 0, 0, 0]])  # both tokens pick expert 0
    bal((first,), step=0)
    second = torch.tensor([[0, 9.0, 0, 0], [0, 0, 9.0, 0]])  # experts 1 and 2
    loss, local = bal((second,), step=1)
    f = torch.tensor([2.0, 1, 1, 0]) / 4
    P = torch.softmax(second, -1).mean(0)
    assert float(loss) == pytest.approx(float(4 * (f * P).sum()), rel=1e-6)
    assert float(local) == pytest.approx(float(4 * (torch.tensor([0, 0.5, 0.5, 0]) * P).sum()), rel=1e-6)


def test_revive_splits_busy_experts_into_idle_ones():
    from tiny_models import tiny_model

    from moe_reroute.reference.train import revive

    model = tiny_model("qwen3_moe")
    mlp = model.model.layers[0].mlp
    gate = mlp.gate.weight
    E = gate.shape[0]
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.randint(1, 64, (2, 8))).logits.sum().backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    counts = torch.ones(4, len(model.model.layers), E)
    counts[:, 0, 1] = 0.0  # expert 1 of layer 0 idle
    counts[2:, 0, 3] = 5.0  # expert 3 the busiest over the last 2 steps (slots 2, 3)
    assert revive(model, opt, counts, below=0.25, step=4, recent=2) == {0: [[1, 3]]}
    others = [e for e in range(E) if e != 1]
    for name, p in mlp.named_parameters():
        assert torch.equal(p[others], before[name][others]), name
        if name != "gate.weight":
            assert torch.equal(p[1], before[name][3]), name
    assert torch.allclose(gate[1], before["gate.weight"][3], atol=0.1 * before["gate.weight"].abs().mean().item())
    assert not torch.equal(gate[1], before["gate.weight"][3])
    assert float(opt.state[gate]["exp_avg"][1].abs().sum()) == 0.0
