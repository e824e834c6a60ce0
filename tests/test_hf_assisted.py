"""Assisted generation and chunked prefill on the transformers adapter, with a tiny Qwen3-MoE target.

Which forward is which is known here from how generate() drives the model, not from the adapter's own
classification: in assisted generation the target's first forward is the prompt (plus the first
candidates) and every later one verifies candidates; with prefill_chunk_size the first forwards are the
prompt's chunks. The expected routing of a re-routed forward is the policy called directly on that
forward's router logits with the valid mask the attention mask gives.
"""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_reroute import RouterSpec, make_policy  # noqa: E402
from moe_reroute.hf import Recorder, apply, moe_routers  # noqa: E402
from moe_reroute.hf.apply import PREFILL_ATTR, decoder  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

PAD = 0
GREEDY = dict(do_sample=False, pad_token_id=PAD, eos_token_id=None, suppress_tokens=[PAD])


class Capture:
    """Per forward of `model`: its input ids and attention mask, and per MoE layer the router's own
    output (`native`, a hook put before every other) and what it hands the experts (`routed`, a hook
    put after those already there, so install this after `apply`)."""

    def __init__(self, model):
        self.forwards: list[dict] = []
        self.generate_calls = 0
        self.handles = [model.register_forward_pre_hook(self._new_forward, with_kwargs=True)]
        for n, (_, router) in enumerate(moe_routers(model)):
            self.handles.append(router.register_forward_hook(self._router_hook(n, "native"), prepend=True))
            self.handles.append(router.register_forward_hook(self._router_hook(n, "routed")))

    def _new_forward(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        self.forwards.append({"ids": ids.clone(), "mask": None if mask is None else mask.clone(),
                              "call": self.generate_calls, "native": {}, "routed": {}})

    def _router_hook(self, layer, key):
        def hook(module, args, output):
            logits, weights, ids = output
            self.forwards[-1][key][layer] = (logits.detach().clone(), weights.detach().clone(), ids.detach().clone())

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def valid_rows(forward):
    """[B*S] bool: the rows the policy must see as real, from the forward's inputs."""
    ids, mask = forward["ids"], forward["mask"]
    B, S = ids.shape
    valid = torch.ones(B, S, dtype=torch.bool) if mask is None else mask[:, -S:].bool()
    if S == 1:
        valid &= ids != PAD  # generate() feeds finished sequences the pad token
    return valid.reshape(-1)


def assert_native(forward):
    for layer, (_, w, ids) in forward["native"].items():
        _, w2, ids2 = forward["routed"][layer]
        assert torch.equal(ids2, ids) and torch.equal(w2, w), f"layer {layer} was re-routed"


def assert_policy(forward, policy, spec):
    """The routing handed on is the policy's on this forward's logits and valid rows, all tokens one batch."""
    valid = valid_rows(forward)
    for layer, (logits, _, _) in forward["native"].items():
        r = policy(logits, spec, valid, layer=layer)
        _, w, ids = forward["routed"][layer]
        assert torch.equal(ids, r.ids.to(ids.dtype)), f"layer {layer}: ids are not the policy's"
        assert torch.equal(w, r.weights.to(w.dtype)), f"layer {layer}: weights are not the policy's"


def rerouted_somewhere(forwards):
    """Some layer of these forwards routed with fewer experts in all than its native routing."""
    return any(f["routed"][n][2].unique().numel() < f["native"][n][2].unique().numel()
               for f in forwards for n in f["native"])


def target_and_draft():
    target = tiny_model("qwen3_moe", seed=0)
    draft = tiny_model("qwen3_moe", seed=1, num_hidden_layers=1)
    cfg = draft.generation_config
    cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule = 3, "constant"
    cfg.assistant_confidence_threshold = 0.0  # always draft all 3: verification forwards of 4 tokens
    return target, draft


def prompt(L=6, seed=0):
    ids = torch.randint(2, 64, (1, L), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def assisted(target, ids, mask, mode, draft=None, n=10):
    how = {"assistant_model": draft} if mode == "draft" else {"prompt_lookup_num_tokens": 3}
    return target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **how, **GREEDY)


def verification(cap):
    """The target's verification forwards in an assisted generate(): every forward after the first."""
    assert len(cap.forwards) > 1
    return cap.forwards[1:]


def nothing_left(model):
    assert not decoder(model)._forward_pre_hooks and not model._forward_pre_hooks
    assert all(not r._forward_hooks for _, r in moe_routers(model))
    assert "_prefill" not in model.__dict__ and PREFILL_ATTR not in model.__dict__


# Prompt lookup on a random model finds candidates when the prompt repeats itself.
LOOKUP_PROMPT = torch.tensor([[5, 9, 13, 5, 9, 13, 5, 9]])


@pytest.mark.parametrize("mode", ["draft", "lookup"])
def test_native_policy_assisted_equals_stock(mode):
    target, draft = target_and_draft()
    ids, mask = prompt() if mode == "draft" else (LOOKUP_PROMPT, torch.ones_like(LOOKUP_PROMPT))
    plain = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
    stock = assisted(target, ids, mask, mode, draft)
    with apply(target, "native"):
        cap = Capture(target)
        ours = assisted(target, ids, mask, mode, draft)
        cap.remove()
    assert torch.equal(stock, plain) and torch.equal(ours, stock)
    assert any(f["ids"].shape[1] > 1 for f in verification(cap)), "no multi-token verification forward ran"
    nothing_left(target)


@pytest.mark.parametrize("mode", ["draft", "lookup"])
def test_verification_forwards_are_rerouted(mode):
    target, draft = target_and_draft()
    ids, mask = prompt(seed=1) if mode == "draft" else (LOOKUP_PROMPT, torch.ones_like(LOOKUP_PROMPT))
    policy = make_policy("oea", k0=1)
    spec = RouterSpec.from_config(target.config)
    with apply(target, policy), Recorder(target) as rec:
        cap = Capture(target)
        assisted(target, ids, mask, mode, draft)
        cap.remove()
    assert_native(cap.forwards[0])  # the prompt (with the first candidates) is prefill
    checks = verification(cap)
    multi = [f for f in checks if f["ids"].shape[1] > 1]
    assert multi, "no multi-token verification forward ran"
    for f in checks:
        assert_policy(f, policy, spec)
    assert rerouted_somewhere(multi), "oea k0=1 never reduced the experts of a verification forward"
    assert [s.kind for s in rec.steps[1:]] == ["verify" if f["ids"].shape[1] > 1 else "decode" for f in checks]
    nothing_left(target)


def test_verify_false_keeps_verification_native():
    target, draft = target_and_draft()
    ids, mask = prompt(seed=2)
    policy = make_policy("oea", k0=1)
    spec = RouterSpec.from_config(target.config)
    with apply(target, policy, verify=False) as handle:
        assert "verify=False" in repr(handle)
        cap = Capture(target)
        assisted(target, ids, mask, "draft", draft)
        cap.remove()
    multi = [f for f in verification(cap) if f["ids"].shape[1] > 1]
    assert multi
    for f in cap.forwards:
        if f["ids"].shape[1] > 1:
            assert_native(f)
        else:  # a last round with no candidate left is a plain decode step
            assert_policy(f, policy, spec)


def test_policy_on_the_draft_too():
    """A MoE draft under a policy re-routes its own decode steps; its prefills (the prompt, and each
    round's catch-up on the tokens the target accepted) route natively; the target still verifies."""
    target, draft = target_and_draft()
    ids, mask = prompt(seed=3)
    policy = make_policy("cap", k=1)
    spec = RouterSpec.from_config(target.config)
    draft_spec = RouterSpec.from_config(draft.config)
    draft_generate = draft.generate

    def counted_generate(*args, **kwargs):
        draft_cap.generate_calls += 1
        return draft_generate(*args, **kwargs)

    with apply(target, policy), apply(draft, policy):
        target_cap, draft_cap = Capture(target), Capture(draft)
        draft.generate = counted_generate  # the candidate generator calls draft.generate once a round
        try:
            assisted(target, ids, mask, "draft", draft)
        finally:
            del draft.generate
        target_cap.remove()
        draft_cap.remove()
    for f in verification(target_cap):
        assert_policy(f, policy, spec)
    rounds = {f["call"] for f in draft_cap.forwards}
    assert len(rounds) > 1
    decode_steps = 0
    for i, f in enumerate(draft_cap.forwards):
        if i == 0 or draft_cap.forwards[i - 1]["call"] != f["call"]:  # a round's first forward: its prefill
            assert_native(f)
        else:
            assert f["ids"].shape[1] == 1
            assert_policy(f, policy, draft_spec)
            decode_steps += 1
    assert decode_steps >= len(rounds)
    nothing_left(target)
    nothing_left(draft)


def test_chunked_prefill_routes_natively():
    """prefill_chunk_size=2 over a 5-token prompt: chunks of 2, 2 and 1 tokens, the last two on a
    non-empty cache and the last one shaped like a decode step; all three stay native."""
    model = tiny_model("qwen3_moe", seed=4)
    B, L = 3, 5
    ids = torch.randint(2, 64, (B, L), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(B, L, dtype=torch.long)
    ids[1:, :2], mask[1:, :2] = PAD, 0  # left padding
    policy = make_policy("oea", k0=1)
    spec = RouterSpec.from_config(model.config)
    with apply(model, policy), Recorder(model) as rec:
        cap = Capture(model)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, prefill_chunk_size=2, **GREEDY)
        cap.remove()
    assert [f["ids"].shape[1] for f in cap.forwards] == [2, 2, 1, 1, 1, 1, 1]
    for f in cap.forwards[:3]:
        assert_native(f)
    for f in cap.forwards[3:]:
        assert_policy(f, policy, spec)
    assert rerouted_somewhere(cap.forwards[3:])
    assert [s.kind for s in rec.steps] == ["prefill"] * 3 + ["decode"] * 4
    nothing_left(model)


def test_forwards_outside_generate():
    """On a cache, S > 1 tokens with logits_to_keep=S are a verification forward; without it they are
    not recognised and route natively."""
    model = tiny_model("qwen3_moe", seed=5)
    ids = torch.randint(2, 64, (1, 9), generator=torch.Generator().manual_seed(5))
    policy = make_policy("oea", k0=1)
    spec = RouterSpec.from_config(model.config)
    # the cache argument is `cache` in later transformers 5 releases (5.25), `past_key_values` in earlier ones (5.17)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {name: transformers.DynamicCache(config=model.config)}
    with apply(model, policy), Recorder(model) as rec, torch.no_grad():
        cap = Capture(model)
        model(input_ids=ids[:, :3], **cache, use_cache=True)
        model(input_ids=ids[:, 3:6], **cache, use_cache=True)
        model(input_ids=ids[:, 6:9], **cache, use_cache=True, logits_to_keep=3)
        cap.remove()
        model.model(input_ids=ids[:, :3], use_cache=False)  # the decoder alone: no logits_to_keep to read
    assert [s.kind for s in rec.steps] == ["prefill", "unknown", "verify", "prefill"]
    assert_native(cap.forwards[0])
    assert_native(cap.forwards[1])
    assert_policy(cap.forwards[2], policy, spec)
    assert rerouted_somewhere(cap.forwards[2:3])


def test_watch_is_shared_and_removed_in_any_order():
    model = tiny_model("qwen3_moe")
    handle, rec = apply(model, "cap", k=1), Recorder(model)
    assert model.__dict__[PREFILL_ATTR].users == 2
    handle.remove()
    assert model.__dict__[PREFILL_ATTR].users == 1
    ids, mask = prompt(L=3)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, prefill_chunk_size=2, **GREEDY)
    assert [s.kind for s in rec.steps] == ["prefill", "prefill", "decode"]
    rec.remove()
    nothing_left(model)
    with pytest.raises(TypeError, match="verify must be True"):
        apply(model, "cap", k=1, verify="no")
