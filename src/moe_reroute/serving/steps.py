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
        self.placement: torch.Tensor | None = None  # [E] rank of each expert, under an EP layout
        self.replicas = None  # or the redundant-expert layout (`moe_reroute.replicas.Replicas`)
        self.ranks = 0  # D
        self.rank = None  # this worker's EP rank, where the engine runs EP itself
        self.layout = ""  # where the placement came from ("engine (linear)", "contiguous", a file)
        # [2D + 2]: per-rank U summed over steps (policy, then native), then max-rank U summed (policy, native)
        self.rank_sums: torch.Tensor | None = None
        # [E] tokens native routing sends to each expert over the re-routed steps (`set_experts`; else not kept)
        self.load: torch.Tensor | None = None

    def set_experts(self, num_experts: int) -> None:
        """Make the per-expert load now, outside any forward (a tensor first made inside a CUDA-graph capture
        would be re-zeroed by every replay; one made in inference mode cannot be zeroed in place later)."""
        self.load = torch.zeros(num_experts, dtype=torch.int64, device=self.sums.device)

    def set_ranks(self, placement, ranks: int, layout: str, rank: int | None = None) -> None:
        """Count per rank from now on: `placement` [E] int64 ranks 0..D-1 (checked by the caller), or a
        `moe_reroute.replicas.Replicas` (redundant experts: a rank's count is the physical slots it reads)."""
        from ..replicas import Replicas

        device = self.sums.device
        self.replicas = placement if isinstance(placement, Replicas) else None
        self.placement = None if self.replicas is not None else placement.to(device, torch.int64)
        self.ranks, self.rank, self.layout = int(ranks), rank, layout
        self.rank_sums = torch.zeros(2 * self.ranks + 2, dtype=torch.int64, device=device)

    def _on(self, device: torch.device) -> None:
        if self.sums.device != device:
            self.sums = self.sums.to(device)
            if self.rank_sums is not None:
                self.rank_sums = self.rank_sums.to(device)
                if self.placement is not None:
                    self.placement = self.placement.to(device)
            if self.load is not None:
                self.load = self.load.to(device)

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
        if self.load is not None and self.load.shape[0] == num_experts:  # made by set_experts, outside a forward
            # the valid tokens' native experts, each counted once per slot; no mask index (a host
            # synchronisation, which a CUDA-graph capture refuses): invalid rows add 0
            ids = native.ids.long()  # [T, K]
            self.load.scatter_add_(0, ids.flatten(), valid[:, None].expand_as(ids).long().flatten())
        if self.rank_sums is not None:
            from ..metrics import rank_unique, used_experts, used_slots

            served = engine if engine is not None else routing
            if self.replicas is not None:  # the slots each row's replicas sit in, as the engine hashes them
                per = rank_unique(torch.stack([used_slots(served, self.replicas), used_slots(native, self.replicas)]),
                                  self.replicas.slot_ranks(valid.device), self.ranks)  # [2, D]
            else:
                per = rank_unique(torch.stack([used_experts(served, num_experts), used_experts(native, num_experts)]),
                                  self.placement, self.ranks)  # [2, D]
            self.rank_sums += torch.cat([per.flatten(), per.amax(dim=-1)])

    def add_native(self, tokens: torch.Tensor, decode_tokens: torch.Tensor | int, kind: str) -> None:
        """A step the policy did not run on: `tokens` its valid tokens, `decode_tokens` its decode tokens."""
        self._on(tokens.device)
        self.sums[4] += 1
        self.sums[5] += tokens
        self.sums[6] += decode_tokens
        self.sums[9 + STEP_KINDS.index(kind)] += 1

    def reset(self) -> None:
        self.sums.zero_()
        if self.rank_sums is not None:
            self.rank_sums.zero_()
        if self.load is not None:
            self.load.zero_()

    def read(self) -> dict[str, float]:
        steps, u, un, tokens, seen, tokens_seen, dec, dec_rr, ue, *kinds = self.sums.tolist()
        d = max(steps, 1.0)
        return {"steps": int(steps), "unique": u / d, "unique_native": un / d, "unique_engine": ue / d,
                "tokens": tokens / d,
                "steps_seen": int(seen), "tokens_rerouted": int(tokens), "tokens_seen": int(tokens_seen),
                "decode_tokens_total": int(dec), "decode_tokens_rerouted_total": int(dec_rr),
                "steps_by_kind": {k: int(v) for k, v in zip(STEP_KINDS, kinds)}, **self.read_ranks(d)}

    def read_load(self) -> list[int] | None:
        """Tokens native routing sent to each expert over the re-routed steps ([E]; None before any)."""
        return None if self.load is None else self.load.tolist()

    def read_ranks(self, steps: float) -> dict:
        """The per-rank means over the re-routed steps (nothing without an EP layout): `ranks` (D),
        `unique_per_rank` ([D] distinct experts each rank serves per step), `max_rank_unique` and
        `mean_rank_unique` (the busiest rank's, and the mean over ranks), the same of native routing
        (`..._native`), `placement` (where the layout came from) and, where the engine runs EP, this
        worker's `ep_rank` and `local_unique` (its own rank's)."""
        if self.rank_sums is None:
            return {}
        D = self.ranks
        sums = self.rank_sums.tolist()
        per, per_native, mx, mx_native = sums[:D], sums[D:2 * D], sums[2 * D], sums[2 * D + 1]
        out = {"ranks": D, "placement": self.layout, "unique_per_rank": [v / steps for v in per],
               "unique_per_rank_native": [v / steps for v in per_native], "max_rank_unique": mx / steps,
               "mean_rank_unique": sum(per) / D / steps, "max_rank_unique_native": mx_native / steps,
               "mean_rank_unique_native": sum(per_native) / D / steps}
        if self.rank is not None:
            out |= {"ep_rank": self.rank, "local_unique": per[self.rank] / steps}
        return out
