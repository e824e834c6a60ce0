"""The engine plugins' configuration (vLLM and SGLang alike): which policy, on which steps, read at
the engine's edge only.

`MOE_REROUTE_POLICY` holds a policy spec (`oea:k0=3`, as on the command line) or a JSON object
(`{"name": "oea", "k0": 3}`); `MOE_REROUTE_POLICY_FILE` names a JSON file holding that object, for
settings too long for a variable (per-layer values). A JSON object may also say `"phase": "all"`,
`"verify": false` and `"dp_view": "gather"`.
`MOE_REROUTE_COUNT_EP` (`8`, `8:contiguous` or `8:placement.json`) makes the counters count per rank
under that expert-parallel layout, for an engine that does not run EP itself (one that does is counted
by its own placement).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..policies import Policy

POLICY_ENV = "MOE_REROUTE_POLICY"
POLICY_FILE_ENV = "MOE_REROUTE_POLICY_FILE"
COUNTERS_ENV = "MOE_REROUTE_COUNTERS"
COUNT_EP_ENV = "MOE_REROUTE_COUNT_EP"
PHASES = ("decode", "pure-decode", "all")


@dataclass(frozen=True)
class PluginConfig:
    """A built policy and where it applies.

    phase: "decode" (default): the decode tokens of every step: pure decode steps, speculative
      verification steps (all their tokens are decode tokens), and the decode rows of steps that mix
      prefill chunks with decodes (their prefill rows keep native routing and count as loaded experts).
      "pure-decode": only steps whose every sequence decodes one token. "all": every token of every step.
    verify: re-route speculative verification steps (default True); False keeps them native.
    counters: record U per layer and step on the device (`moe_reroute.vllm.counters()`).
    dp_view: "local" (default): under data-parallel attention each DP rank routes its own tokens. "gather"
      (vLLM): the DP ranks all-gather each step's router logits and route the union as one batch, each
      keeping its own rows (`serving.dp`).
    """

    policy: Policy
    source: str
    phase: str = "decode"
    counters: bool = False
    verify: bool = True
    dp_view: str = "local"

    def describe(self) -> str:
        what = {"decode": "decode tokens of every step", "pure-decode": "pure decode steps",
                "all": "every token"}[self.phase]
        dp = ", DP ranks routed as one batch" if self.dp_view == "gather" else ""
        return f"{self.source} ({what}{'' if self.verify else ', verification native'}{dp})"


def from_env(environ: Any = None) -> PluginConfig | None:
    """The configuration the environment asks for, or None when it asks for nothing.

    Raises ValueError naming the variable for any value it cannot use: a bad spec or JSON, a policy
    file that is missing, empty, not UTF-8 or unreadable, a similarity file it cannot read, or a
    `MOE_REROUTE_COUNTERS` that is not a yes/no word.
    """
    env = os.environ if environ is None else environ
    for var in (POLICY_ENV, POLICY_FILE_ENV):
        raw = env.get(var)
        if raw is not None and raw != "" and not raw.strip():
            raise ValueError(f"{var} is set to white space only ({raw!r}); give a policy (e.g. oea:k0=3) or "
                             f"unset {var} to serve without re-routing")
    text = env.get(POLICY_ENV, "").strip()
    path = env.get(POLICY_FILE_ENV, "").strip()
    if text and path:
        raise ValueError(f"set {POLICY_ENV} or {POLICY_FILE_ENV}, not both")
    if path:
        text = _read_policy_file(path)
    if not text:
        return None
    counters = counters_from_env(env)
    return parse_checked(text, counters=counters, origin=POLICY_FILE_ENV if path else POLICY_ENV)


def parse_checked(text: str, counters: bool = False, origin: str = "policy") -> PluginConfig:
    """`parse`, with any failure to build the policy (a similarity file that cannot be read, ...) raised as
    one ValueError naming `origin` (the variable, or the call that switches a live engine's policy)."""
    try:
        return parse(text, counters=counters, origin=origin)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to build the policy is refused with its origin named
        raise ValueError(f"{origin}: cannot use {text[:80]!r} ({type(e).__name__}: {e})") from None


_READ: dict[tuple[str, str, str], PluginConfig | None] = {}


def from_env_once(environ: Any = None) -> PluginConfig | None:
    """`from_env`, computed once per process for each value of the three variables: a policy file is read
    once, so a file edited while an engine builds its layers cannot give layers different policies."""
    env = os.environ if environ is None else environ
    key = tuple(env.get(v, "") for v in (POLICY_ENV, POLICY_FILE_ENV, COUNTERS_ENV))
    if key not in _READ:
        _READ[key] = from_env(env)
    return _READ[key]


COUNTERS_ON = ("1", "true", "yes", "on")
COUNTERS_OFF = ("", "0", "false", "no", "off")


def counters_from_env(environ: Any = None) -> bool:
    """`MOE_REROUTE_COUNTERS` as a bool; a value that is neither yes nor no raises, naming the variable."""
    env = os.environ if environ is None else environ
    value = env.get(COUNTERS_ENV, "").strip().lower()
    if value in COUNTERS_ON:
        return True
    if value in COUNTERS_OFF:
        return False
    raise ValueError(f"{COUNTERS_ENV}={env.get(COUNTERS_ENV)!r}: write 1 (record U per layer) or 0 (off); "
                     f"accepted: {', '.join(v for v in COUNTERS_ON + COUNTERS_OFF if v)}")


def _read_policy_file(path: str) -> str:
    from ..policies.spec import read_policy_text

    text = read_policy_text(path, origin=f"{POLICY_FILE_ENV}={path}")
    return text


def parse(text: str, counters: bool = False, origin: str = "policy") -> PluginConfig:
    """A spec (`oea:k0=3`) or a JSON object (`{"name": "oea", "k0": 3, "phase": "decode"}`) -> PluginConfig."""
    from ..policies.spec import describe_object, load_json, policy_from_object, policy_from_spec

    text = text.strip()
    if not text.startswith("{"):
        try:
            policy = policy_from_spec(text, check_inputs=False)
        except ValueError as e:
            raise ValueError(f"{origin}: {e}") from None
        return PluginConfig(policy, text, "decode", counters)
    obj = load_json(text, origin, '{"name": "oea", "k0": 3}')
    policy = policy_from_object(obj, check_inputs=False, origin=origin)
    phase = obj.get("phase", "decode")
    if phase not in PHASES:
        raise ValueError(f"{origin}: phase must be one of {PHASES}, got {phase!r}")
    verify = obj.get("verify", True)
    if not isinstance(verify, bool):
        raise ValueError(f"{origin}: verify must be true (re-route speculative verification) or false, got {verify!r}")
    from .dp import DP_VIEWS

    dp_view = obj.get("dp_view", "local")
    if dp_view not in DP_VIEWS:
        raise ValueError(f"{origin}: dp_view must be \"local\" (each data-parallel rank routes its own tokens) or "
                         f"\"gather\" (the DP ranks route their tokens as one batch), got {dp_view!r}")
    return PluginConfig(policy, describe_object(obj), phase, counters, verify, dp_view)


@dataclass(frozen=True)
class CountLayout:
    """An expert-parallel layout to count per rank by: D ranks and a placement, "contiguous" (expert e on rank
    e*D//E) or a placement file (`moe_reroute.placement`: one rank per expert, or one list per MoE layer; or
    redundant experts, `moe_reroute.replicas`, counted by the slots each rank reads)."""

    ranks: int
    placement: str = "contiguous"

    def spec(self) -> str:
        return f"{self.ranks}:{self.placement}"

    def tensor(self, num_experts: int, layers: int | None = None):
        """[E] or [L, E] int64 placement for a model of E experts (and L MoE layers, when known), or the
        `Replicas` of a file of redundant experts; ValueError naming the variable and the fix when it does
        not fit."""
        from ..placement import check_ranks, contiguous
        from ..replicas import load_placement_file

        try:
            check_ranks(num_experts, self.ranks)
            if self.placement == "contiguous":
                return contiguous(num_experts, self.ranks)
            return load_placement_file(self.placement, num_experts, self.ranks, layers)
        except (ValueError, OSError) as e:
            raise ValueError(f"{COUNT_EP_ENV}={self.spec()}: {e}") from None


def parse_count_layout(text: str, origin: str = COUNT_EP_ENV) -> CountLayout | None:
    """`8`, `8:contiguous` or `8:FILE` -> CountLayout; "" -> None. Its fit to a model is checked when a layer
    is built (`CountLayout.tensor`)."""
    text = (text or "").strip()
    if not text:
        return None
    ranks, _, how = text.partition(":")
    how = how.strip() or "contiguous"
    try:
        d = int(ranks)
    except ValueError:
        d = 0
    if d < 1:
        raise ValueError(f"{origin}={text!r}: give the number of expert-parallel ranks D >= 1 to count by, then "
                         "optionally a placement: 8, 8:contiguous or 8:placement.json")
    if how == "eplb":
        raise ValueError(f"{origin}={text!r}: an eplb placement is computed from expert loads; write one to a file "
                         "(`moe-reroute ep-replay --placement eplb --out DIR` writes placement-eplb-D8.json, or "
                         "`serve-bench --placement eplb` computes it from the engine's own native routing) and give "
                         "its path")
    return CountLayout(d, how)


def count_layout_from_env(environ: Any = None) -> CountLayout | None:
    """`MOE_REROUTE_COUNT_EP` as a CountLayout (None when unset); a bad value raises, naming the variable."""
    env = os.environ if environ is None else environ
    return parse_count_layout(env.get(COUNT_EP_ENV, ""))
