"""The shipped reference model: files match their recorded checksums, it loads offline, generates, its
held-out cross-entropy on a fixed slice matches the model card, its held-out split carries domain labels,
its calibration sample holds training text of every domain and none of the held-out split, and the card's
routing numbers are those of a domain-specialised, balanced model."""

from __future__ import annotations

import json
import random
import socket
import string

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
    docs = reference.heldout_documents(part="all")
    domains = {d.domain for d in docs}
    assert len(domains) >= 5 and domains <= set(corpus.DOMAINS)
    # the shipped parts are the rule's, and tuning never holds validation text
    tuning, validation = corpus.heldout_parts(docs)
    assert reference.heldout_documents(part="tuning") == tuning and reference.heldout_documents() == validation
    assert "\n\n".join(d.text for d in docs) == heldout  # heldout.txt is the same text, plain
    train = json.loads((folder / "training.json").read_text())["corpus"]
    for domain, info in train["domains"].items():  # the documents the data card counted
        assert sum(d.domain == domain for d in docs) == info["heldout_documents"], domain
    for domain, names in train["heldout_named"].items():
        assert {d.name for d in docs if d.domain == domain} == set(names)


# Longest run of text a calibration document may share with the held-out split: man pages' translator
# credits and licence footers repeat across pages and reach 1,901 characters (French util-linux pages).
MAX_SHARED = 2_500


def shared_run(text: str, blocks: set[str], width: int) -> int:
    """Longest stretch of `text` covered by `width`-character pieces found in `blocks`."""
    covered = bytearray(len(text))
    for i in range(len(text) - width + 1):
        if text[i : i + width] in blocks:
            covered[i : i + width] = b"\x01" * width
    best = run = 0
    for c in covered:
        run = run + 1 if c else 0
        best = max(best, run)
    return best


def test_calibration_sample_is_training_text_of_every_domain(folder):
    """calibration.jsonl: every domain, within its size limits, and no held-out text (no held-out name, no
    document a prefix of a held-out one or the reverse, no stretch of over MAX_SHARED characters shared)."""
    cal, held = reference.calibration_documents(), reference.heldout_documents()
    assert reference.calibration_documents(folder) == cal
    assert {d.domain for d in cal} == set(corpus.DOMAINS)
    for domain in corpus.DOMAINS:
        size = sum(len(d.text) for d in cal if d.domain == domain)
        assert corpus.CALIBRATION_CHARS - corpus.CALIBRATION_MIN_LEFT <= size <= corpus.CALIBRATION_CHARS, domain
    assert (folder / "calibration.jsonl").stat().st_size < 1_000_000
    held_names = {(d.domain, d.name) for d in held}
    width = 100  # a shared run of 2 * width - 1 characters holds an aligned block of the held-out text
    blocks = {d.text[i : i + width] for d in held for i in range(0, len(d.text) - width + 1, width)}
    for d in cal:
        assert len(d.text) <= corpus.CALIBRATION_DOC_CHARS
        assert (d.domain, d.name) not in held_names, d.name
        assert not any(h.text.startswith(d.text) or d.text.startswith(h.text) for h in held), d.name
        run = shared_run(d.text, blocks, width)
        assert run <= MAX_SHARED, f"{d.domain}/{d.name} shares {run} characters in a row with the held-out split"


def test_shared_run_finds_held_out_text():
    held = "".join(random.Random(0).choices(string.ascii_lowercase, k=5_000))
    blocks = {held[i : i + 100] for i in range(0, len(held) - 99, 100)}
    assert shared_run("z" * 300 + held[1_234:3_734] + "z" * 300, blocks, 100) >= MAX_SHARED - 100
    assert shared_run("z" * 300 + held[1_234:1_433] + "z" * 300, blocks, 100) >= 100  # any 199-character run
    assert shared_run("z" * 3_000, blocks, 100) == 0


def test_calibration_sample_is_drawn_from_the_built_training_split(folder):
    """calibration.jsonl == corpus.calibration_sample(train.jsonl) where the corpus is built (at
    `moe-reroute train-reference`'s default --workdir); CI cannot build it offline."""
    from moe_reroute.cli.reference import DEFAULT_WORKDIR

    if not corpus.is_built(DEFAULT_WORKDIR):
        pytest.skip(f"no built corpus in {DEFAULT_WORKDIR} (corpus.build needs apt-get and the package registries)")
    train = corpus.read_jsonl(DEFAULT_WORKDIR / "train.jsonl")
    assert corpus.read_jsonl(DEFAULT_WORKDIR / "heldout.jsonl") == reference.heldout_documents()
    assert corpus.calibration_sample(train) == reference.calibration_documents()


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


def test_export_ships_the_calibration_sample(tmp_path):
    """A rebuilt model folder holds calibration.jsonl = corpus.calibration_sample(the workdir's train.jsonl),
    readable by calibration_documents(folder), and no held-out document in it."""
    from test_corpus import fake_corpus
    from tiny_models import tiny_model, tiny_tokenizer

    from moe_reroute.reference.train import TrainConfig, export

    work, out = tmp_path / "work", tmp_path / "model"
    work.mkdir()
    train, held = corpus.split(fake_corpus())
    corpus.write_jsonl(work / "train.jsonl", train)
    corpus.write_jsonl(work / "heldout.jsonl", held)
    (work / "corpus.json").write_text("{}")
    export(tiny_model("qwen3_moe"), tiny_tokenizer(), work, out, TrainConfig(), [], 0.0)
    cal = reference.calibration_documents(out)
    assert cal == corpus.calibration_sample(train) and {d.domain for d in cal} == set(corpus.DOMAINS)
    assert not {(d.domain, d.name) for d in cal} & {(d.domain, d.name) for d in held}
    assert reference.heldout_documents(out, "all") == held
    assert (reference.heldout_documents(out, "tuning"), reference.heldout_documents(out)) == corpus.heldout_parts(held)
    (out / "calibration.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="train-reference"):
        reference.calibration_documents(out)


def test_card_parts_only_counts_the_shipped_parts(tmp_path, folder):
    """`reference-card --parts-only`: the held-out parts' documents and characters per domain, counted here
    from the shipped files, and every other number kept from the shipped card.json."""
    from moe_reroute.cli import main

    out = tmp_path / "card"
    assert main(["reference-card", "--parts-only", "--out", str(out)]) == 0
    new, old = json.loads((out / "card.json").read_text()), json.loads((folder / "card.json").read_text())
    assert {k: v for k, v in new.items() if k != "heldout_parts"} == {k: v for k, v in old.items() if k != "heldout_parts"}
    for part in ("tuning", "validation"):
        docs = [json.loads(line) for line in (folder / f"{part}.jsonl").read_text().splitlines() if line.strip()]
        for domain, got in new["heldout_parts"][part]["by_domain"].items():
            mine = [d for d in docs if d["domain"] == domain]
            assert got["documents"] == len(mine) and got["chars"] == sum(len(d["text"]) for d in mine), (part, domain)
    assert "tuning.jsonl" in (out / "MODEL_CARD.md").read_text()
