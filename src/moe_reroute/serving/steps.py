"""What both engine plugins share about a step: its kind, and the per-layer counters kept on the device."""

from __future__ import annotations

import torch

from ..contract import Routing

DECODE, VERIFY, MIXED, PREFILL, UNKNOWN = "decode", "verify", "mixed", "prefill", "unknown"
STEP_KINDS = (DECODE, VERIFY, MIXED, PREFILL, UNKNOWN)


class LayerCounter:
    """Per layer, kept on the device (no host synchronisation until read): the steps the policy ran, U of
    the policy and of native routing summed over them, their valid tokens; every MoE step the layer saw
    with its tokens; decode tokens in all and re-routed; steps by kind (`STEP_KINDS`); and U of the ids
    the engine computes, where an adapter rewrites the policy's routing for its kernels (SGLang's distinct
    ids per row: `unique_engine`, else equal to `unique`)."""

    # steps re-routed, U, native U, tokens re-routed, steps seen, tokens seen, decode tokens, decode tokens
    # re-routed, engine U, then one count per step kind
    SLOTS = 9 + len(STEP_KINDS)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros(self.SLOTS, dtype=torch.int64, device=device)

    def _on(self, device: torch.device) -> None:
        if self.sums.device != device:
            self.sums = self.sums.to(device)

    def add(self, routing: Routing, native: Routing, valid: torch.Tensor, num_experts: int, kind: str,
            decode_rows: torch.Tensor, engine: Routing | None = None) -> None:
        """A step the policy ran on: `valid` [T] its real rows, `decode_rows` [T] the decode rows among them;
        `engine`: the routing the engine computes, where it differs from the policy's `routing`."""
        from ..metrics import unique_experts

        self._on(valid.device)
        u = unique_experts(routing, num_experts)
        un = unique_experts(native, num_experts)
        ue = u if engine is None else unique_experts(engine, num_experts)
        one = torch.ones((), dtype=torch.int64, device=u.device)
        n = valid.sum()
        d = (decode_rows & valid).sum()
        self.sums[:9] += torch.stack([one, u.long(), un.long(), n, one, n, d, d, ue.long()])
        self.sums[9 + STEP_KINDS.index(kind)] += 1

    def add_native(self, tokens: torch.Tensor, decode_tokens: torch.Tensor | int, kind: str) -> None:
        """A step the policy did not run on: `tokens` its valid tokens, `decode_tokens` its decode tokens."""
        self._on(tokens.device)
        self.sums[4] += 1
        self.sums[5] += tokens
        self.sums[6] += decode_tokens
        self.sums[9 + STEP_KINDS.index(kind)] += 1

    def reset(self) -> None:
        self.sums.zero_()

    def read(self) -> dict[str, float]:
        steps, u, un, tokens, seen, tokens_seen, dec, dec_rr, ue, *kinds = self.sums.tolist()
        d = max(steps, 1.0)
        return {"steps": int(steps), "unique": u / d, "unique_native": un / d, "unique_engine": ue / d,
                "tokens": tokens / d,
                "steps_seen": int(seen), "tokens_rerouted": int(tokens), "tokens_seen": int(tokens_seen),
                "decode_tokens_total": int(dec), "decode_tokens_rerouted_total": int(dec_rr),
                "steps_by_kind": {k: int(v) for k, v in zip(STEP_KINDS, kinds)}}
