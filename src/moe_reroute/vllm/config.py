"""The plugin's configuration: which policy, on which steps, read at the engine's edge only.

`MOE_REROUTE_POLICY` holds a policy spec (`oea:k0=3`, as on the command line) or a JSON object
(`{"name": "oea", "k0": 3}`); `MOE_REROUTE_POLICY_FILE` names a JSON file holding that object, for
settings too long for a variable (per-layer values). A JSON object may also say `"phase": "all"`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..policies import Policy

POLICY_ENV = "MOE_REROUTE_POLICY"
POLICY_FILE_ENV = "MOE_REROUTE_POLICY_FILE"
COUNTERS_ENV = "MOE_REROUTE_COUNTERS"
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
    """

    policy: Policy
    source: str
    phase: str = "decode"
    counters: bool = False
    verify: bool = True

    def describe(self) -> str:
        what = {"decode": "decode tokens of every step", "pure-decode": "pure decode steps",
                "all": "every token"}[self.phase]
        return f"{self.source} ({what}{'' if self.verify else ', verification native'})"


def from_env(environ: Any = None) -> PluginConfig | None:
    """The configuration the environment asks for, or None when it asks for nothing.

    Raises ValueError naming the variable for any value it cannot use: a bad spec or JSON, a policy
    file that is missing, empty, not UTF-8 or unreadable, a similarity file it cannot read, or a
    `MOE_REROUTE_COUNTERS` that is not a yes/no word.
    """
    env = os.environ if environ is None else environ
    text = env.get(POLICY_ENV, "").strip()
    path = env.get(POLICY_FILE_ENV, "").strip()
    if text and path:
        raise ValueError(f"set {POLICY_ENV} or {POLICY_FILE_ENV}, not both")
    if path:
        text = _read_policy_file(path)
    if not text:
        return None
    counters = counters_from_env(env)
    origin = POLICY_FILE_ENV if path else POLICY_ENV
    try:
        return parse(text, counters=counters, origin=origin)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to build the policy stops the engine with the variable named
        raise ValueError(f"{origin}: cannot use {text[:80]!r} ({type(e).__name__}: {e})") from None


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
    example = '{"name": "oea", "k0": [2, 3, 3, 4]}'
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{POLICY_FILE_ENV}={path}: no such file; it should hold a JSON object such as {example}")
    try:
        text = p.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{POLICY_FILE_ENV}={path}: not UTF-8 text (byte {e.start}); save it as UTF-8 JSON "
                         f"such as {example}") from None
    except OSError as e:
        raise ValueError(f"{POLICY_FILE_ENV}={path}: cannot read it ({e.strerror or e})") from None
    if not text:
        raise ValueError(f"{POLICY_FILE_ENV}={path}: the file is empty; write a JSON object such as {example}, "
                         f"or unset {POLICY_FILE_ENV} to run without a policy")
    return text


def parse(text: str, counters: bool = False, origin: str = "policy") -> PluginConfig:
    """A spec (`oea:k0=3`) or a JSON object (`{"name": "oea", "k0": 3, "phase": "decode"}`) -> PluginConfig."""
    from ..measure.specs import policy_from_spec
    from ..policies import make_policy

    text = text.strip()
    if not text.startswith("{"):
        try:
            policy = policy_from_spec(text, check_inputs=False)
        except ValueError as e:
            raise ValueError(f"{origin}: {e}") from None
        return PluginConfig(policy, text, "decode", counters)
    obj = load_json(text, origin, '{"name": "oea", "k0": 3}')
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError(f"{origin}: the JSON must be an object with a \"name\", e.g. " '{"name": "oea", "k0": 3}')
    try:
        params = {k: _layer_keys(k, v) for k, v in obj.items() if k not in ("name", "phase", "verify")}
    except ValueError as e:
        raise ValueError(f"{origin}: {e}") from None
    phase = obj.get("phase", "decode")
    if phase not in PHASES:
        raise ValueError(f"{origin}: phase must be one of {PHASES}, got {phase!r}")
    verify = obj.get("verify", True)
    if not isinstance(verify, bool):
        raise ValueError(f"{origin}: verify must be true (re-route speculative verification) or false, got {verify!r}")
    name = obj["name"]
    try:
        if name == "sere" and isinstance(params.get("similarity"), str):
            from ..hf.calibrate import load_similarity

            params["similarity"] = load_similarity(params["similarity"])
        policy = make_policy(name, check_inputs=False, **params)
    except (TypeError, ValueError, OSError) as e:
        raise ValueError(f"{origin}: {e}") from None
    shown = ", ".join(f"{k}={v}" for k, v in obj.items() if k not in ("name", "phase", "verify"))
    return PluginConfig(policy, f"{name}:{shown}" if shown else name, phase, counters, verify)


def load_json(text: str, origin: str, example: str) -> Any:
    """json.loads that rejects a key given twice in one object and nesting too deep to read, saying so."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"key {k!r} is given twice in one object; give each key once")
            out[k] = v
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ValueError(f"{origin}: not valid JSON ({e}); write e.g. {example}") from None
    except RecursionError:
        raise ValueError(f"{origin}: the JSON is nested too deeply to read; write e.g. {example}") from None
    except ValueError as e:
        raise ValueError(f"{origin}: {e}") from None


def _layer_keys(name: str, value: Any) -> Any:
    """JSON object keys are strings: {"0": 2, "3": 4} is a per-layer mapping {0: 2, 3: 4}, by MoE-layer
    index. A key such as "00" or "+1" would name the same layer as another spelling, so layer numbers are
    written plainly."""
    if not isinstance(value, dict) or not value or not all(k.isascii() and k.isdigit() for k in value):
        return value
    odd = [k for k in value if str(int(k)) != k]
    if odd:
        raise ValueError(f"{name}: layer key {odd[0]!r} is not written plainly; write layer numbers without "
                         f"leading zeros, e.g. {str(int(odd[0]))!r}")
    return {int(k): v for k, v in value.items()}
