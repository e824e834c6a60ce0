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
PHASES = ("decode", "all")


@dataclass(frozen=True)
class PluginConfig:
    """A built policy and where it applies.

    phase: "decode" (default): only steps whose every sequence decodes one token; a step holding any
      prefill routes natively. "all": every step, all its tokens as one batch.
    counters: record U per layer and step on the device (`moe_reroute.vllm.counters()`).
    """

    policy: Policy
    source: str
    phase: str = "decode"
    counters: bool = False

    def describe(self) -> str:
        return f"{self.source} ({self.phase} steps)"


def from_env(environ: Any = None) -> PluginConfig | None:
    """The configuration the environment asks for, or None when it asks for nothing."""
    env = os.environ if environ is None else environ
    text = env.get(POLICY_ENV, "").strip()
    path = env.get(POLICY_FILE_ENV, "").strip()
    if text and path:
        raise ValueError(f"set {POLICY_ENV} or {POLICY_FILE_ENV}, not both")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{POLICY_FILE_ENV}={path}: no such file; it should hold a JSON object such as "
                             '{"name": "oea", "k0": [2, 3, 3, 4]}')
        text = p.read_text()
    if not text:
        return None
    counters = env.get(COUNTERS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return parse(text, counters=counters, origin=POLICY_FILE_ENV if path else POLICY_ENV)


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
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{origin}: not valid JSON ({e}); write e.g. " '{"name": "oea", "k0": 3}') from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError(f"{origin}: the JSON must be an object with a \"name\", e.g. " '{"name": "oea", "k0": 3}')
    params = {k: _layer_keys(v) for k, v in obj.items() if k not in ("name", "phase")}
    phase = obj.get("phase", "decode")
    if phase not in PHASES:
        raise ValueError(f"{origin}: phase must be one of {PHASES}, got {phase!r}")
    name = obj["name"]
    try:
        if name == "sere" and isinstance(params.get("similarity"), str):
            from ..hf.calibrate import load_similarity

            params["similarity"] = load_similarity(params["similarity"])
        policy = make_policy(name, check_inputs=False, **params)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"{origin}: {e}") from None
    shown = ", ".join(f"{k}={v}" for k, v in obj.items() if k not in ("name", "phase"))
    return PluginConfig(policy, f"{name}:{shown}" if shown else name, phase, counters)


def _layer_keys(value: Any) -> Any:
    """JSON object keys are strings: {"0": 2, "3": 4} is a per-layer mapping {0: 2, 3: 4}."""
    if isinstance(value, dict) and value and all(isinstance(k, str) and k.isdigit() for k in value):
        return {int(k): v for k, v in value.items()}
    return value
