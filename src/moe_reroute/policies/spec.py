"""Policies written down: specs as on a command line, JSON objects as in policy files, and `load_policy`.

A spec is `name` or `name:param=value,param=value`. Values are ints, floats, true/false/none, lists in
brackets (`oea:k0=[2,3,3,4]`, one value per MoE layer) or parentheses
(`cap:schedule=(2,4,8,3),num_layers=48`), and otherwise plain strings such as a file path
(`sere:similarity=sim.safetensors`).

A JSON object names the policy and gives its parameters: `{"name": "oea", "k0": [2, 3, 3, 4]}`. A
parameter may be per MoE layer (a list, or an object keyed by layer number: `{"0": 2, "3": 4}`) and per
step size (`{"by_batch": {"1": 8, "4": 4, "max": 2}}`, see `moe_reroute.policies.base.ByBatch`). Two
keys are engine settings, read by the vLLM and SGLang plugins and ignored by `load_policy`: "phase" and
"verify". "about" holds free-form information (what wrote the file, for which model) and is ignored by
every loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import POLICIES, Policy, make_policy

ENGINE_KEYS = ("phase", "verify", "dp_view")  # read by the engine plugins, not parameters of the policy
ABOUT_KEY = "about"  # free-form information, ignored by every loader
EXAMPLE = '{"name": "oea", "k0": 3}'
POLICY_FILE_BYTES = 64 << 20  # a policy file larger than this is refused unread


# a well-formed spec of each policy, for messages
EXAMPLES = {"native": "native", "cap": "cap:k=4", "oea": "oea:k0=3", "sere": "sere:primary=2",
            "budget": "budget:budget=32", "gain": "gain:budget=32", "xshare": "xshare:budget=32",
            "lynx": "lynx:alpha=3,beta=2"}


def parse_policy_spec(text: str) -> tuple[str, dict[str, Any]]:
    """("oea", {"k0": 3, "p": 0.9}) from "oea:k0=3,p=0.9"; raises ValueError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty policy spec; write e.g. native, cap:k=4, oea:k0=3 or budget:budget=32")
    label = repr(text) if len(text) <= 80 else repr(text[:60]) + f"... ({len(text)} characters)"
    if text.lstrip("\ufeff \t\r\n").startswith(("[", '"')):  # JSON that is not an object: say so
        raise ValueError(f"policy spec {label}: JSON that is not an object; a policy is one JSON object with a "
                         f'"name", e.g. {EXAMPLE}, or a spec such as oea:k0=3')
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in POLICIES:
        raise ValueError(f"policy spec {label}: unknown policy {name[:40]!r}; available: {', '.join(POLICIES)}")
    params: dict[str, Any] = {}
    if not rest.strip():
        if ":" in text:
            raise ValueError(f"policy spec {label}: nothing after ':'; write {name}:param=value or just {name}")
        return name, params
    for item in _split_top(rest, label):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key or not value.strip():
            raise ValueError(f"policy spec {label}: {item.strip()!r} is not param=value (e.g. "
                             f"{EXAMPLES.get(name, name + ':param=value')})")
        if not key.isidentifier():
            raise ValueError(f"policy spec {label}: {key!r} is not a parameter name")
        if key in params:
            raise ValueError(f"policy spec {label}: parameter {key!r} given twice")
        params[key] = _value(value.strip(), label)
    return name, params


def policy_from_spec(text: str, check_inputs: bool = True, num_experts: int | None = None) -> Policy:
    """The policy a spec describes; parameter errors name the policy's parameters.

    check_inputs: check router logits for NaN/inf on every call; only an engine that runs the policy
    inside CUDA graphs turns it off.

    A SERE `similarity` given as a string is read as a file of `moe_reroute.hf.save_similarity`
    (checked against `num_experts` when given).
    """
    name, params = parse_policy_spec(text)
    try:
        return _make(name, params, check_inputs, num_experts)
    except (TypeError, ValueError, OSError) as e:
        raise ValueError(f"policy spec {text!r:.80}: {e}") from None


def _make(name: str, params: dict[str, Any], check_inputs: bool, num_experts: int | None) -> Policy:
    """make_policy for a spec's or a JSON object's parameters: a SERE `similarity` string is read as a
    similarity file (checked against `num_experts` when given); `check_inputs` is the caller's, never a
    parameter."""
    if "check_inputs" in params:
        raise ValueError("check_inputs is not a policy parameter: whoever runs the policy sets it (engines turn it "
                         "off inside CUDA graphs; make_policy(..., check_inputs=False) in Python); drop it")
    if name == "sere" and isinstance(params.get("similarity"), str):
        from ..similarity import load_similarity

        params["similarity"] = load_similarity(params["similarity"], num_experts=num_experts)
    return make_policy(name, check_inputs=check_inputs, **params)


def _split_top(rest: str, label: str) -> list[str]:
    """Split on commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(rest):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
            if depth < 0:
                raise ValueError(f"policy spec {label}: unbalanced {ch!r}")
        elif ch == "," and depth == 0:
            items.append(rest[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"policy spec {label}: unclosed bracket")
    items.append(rest[start:])
    return items


def _value(raw: str, label: str) -> Any:
    if raw[0] in "[(":
        close = "]" if raw[0] == "[" else ")"
        if raw[-1] != close:
            raise ValueError(f"policy spec {label}: {raw!r} opens with {raw[0]!r} but does not end with {close!r}")
        inner = raw[1:-1].strip()
        items = [v.strip() for v in _split_top(inner, label)] if inner else []
        if any(not v for v in items):
            raise ValueError(f"policy spec {label}: {raw!r} has an empty item; write one value between "
                             "each pair of commas, e.g. [2,3,3,4]")
        if any(v[0] in "[(" for v in items):  # checked before reading items: no recursion on deep nesting
            raise ValueError(f"policy spec {label}: nested lists are not supported ({raw[:40]!r})")
        values = [_value(v, label) for v in items]
        return values if raw[0] == "[" else tuple(values)
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    digits = raw.lstrip("+-").replace("_", "")
    if digits.isdigit() and len(digits) > 18:  # past int64 (and past what int() reads in one go)
        raise ValueError(f"policy spec {label}: {raw[:20]}{'...' if len(raw) > 20 else ''} is too large a number "
                         "for any parameter")
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    if any(ch in raw for ch in "[]()"):
        raise ValueError(f"policy spec {label}: cannot read value {raw!r}; use a number, true/false/none, "
                         "[a,b,...] or a plain string")
    return raw


def load_json(text: str, origin: str, example: str = EXAMPLE) -> Any:
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
        if "integer string conversion" in str(e):  # a number of thousands of digits
            raise ValueError(f"{origin}: holds an integer of thousands of digits, too large for any parameter; "
                             f"write e.g. {example}") from None
        raise ValueError(f"{origin}: {e}") from None


def policy_params(obj: Any, origin: str = "policy") -> tuple[str, dict[str, Any]]:
    """(name, parameters) of a policy JSON object; engine settings and "about" are left out, layer keys
    ("0", "3") become ints, inside `by_batch` buckets too."""
    if not isinstance(obj, dict):
        raise ValueError(f'{origin}: the JSON holds {_json_kind(obj)}, not an object; a policy is one JSON object '
                         f'with a "name", e.g. {EXAMPLE}')
    if not isinstance(obj.get("name"), str):
        raise ValueError(f'{origin}: the JSON must be an object with a "name", e.g. {EXAMPLE}')
    try:
        params = {k: _json_value(k, v) for k, v in obj.items() if k not in ("name", ABOUT_KEY, *ENGINE_KEYS)}
    except ValueError as e:
        raise ValueError(f"{origin}: {e}") from None
    return obj["name"], params


def _json_kind(obj: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "true/false", int: "a number", float: "a number",
             type(None): "null"}
    return kinds.get(type(obj), type(obj).__name__)


def policy_from_object(obj: Any, check_inputs: bool = True, num_experts: int | None = None,
                       origin: str = "policy") -> Policy:
    """The policy a JSON object describes (`{"name": "oea", "k0": 3}`); a SERE `similarity` given as a
    string is read as a similarity file. Errors name `origin` (the variable or file it came from)."""
    name, params = policy_params(obj, origin)
    try:
        return _make(name, params, check_inputs, num_experts)
    except (TypeError, ValueError, OSError) as e:
        raise ValueError(f"{origin}: {e}") from None


def describe_object(obj: dict[str, Any]) -> str:
    """A short label of a policy JSON object: `oea:k0=3`."""
    shown = ", ".join(f"{k}={v}" for k, v in obj.items() if k not in ("name", ABOUT_KEY, *ENGINE_KEYS))
    return f"{obj['name']}:{shown}" if shown else obj["name"]


def is_policy_file(text: str) -> bool:
    """Whether a `--policy` value names a policy file rather than a spec: it ends in .json, or it is a file
    there and cannot be a spec (not a policy's name, no ':' before parameters, not JSON)."""
    from . import POLICIES

    text = text.strip()
    return text.endswith(".json") or (text not in POLICIES and ":" not in text and not text.startswith("{")
                                      and Path(text).is_file())


def read_policy_text(path: str | Path, origin: str | None = None) -> str:
    """The stripped UTF-8 text of a policy file; missing, unreadable, not UTF-8 or empty files raise
    ValueError naming `origin` (default: the path)."""
    from ..files import read_regular_text

    example = '{"name": "oea", "k0": [2, 3, 3, 4]}'
    origin = origin or str(path)
    text = read_regular_text(path, origin, f"it should hold a JSON object such as {example}",
                             limit=POLICY_FILE_BYTES,
                             how_to_fix=f"save it as UTF-8 JSON such as {example}").strip()
    if not text:
        raise ValueError(f"{origin}: the file is empty; write a JSON object such as {example}")
    return text


def policy_from_text(text: str, check_inputs: bool = True, num_experts: int | None = None,
                     origin: str = "policy") -> Policy:
    """A spec (`oea:k0=3`) or JSON object text (`{"name": "oea", "k0": 3}`) -> the policy."""
    text = text.removeprefix("\ufeff").strip()
    scalar = text in ("null", "true", "false") or text[:1] in tuple("-0123456789")  # JSON, never a policy name
    if text.startswith(("{", "[", '"')) or scalar:  # JSON: only an object names a policy, policy_from_object says so
        return policy_from_object(load_json(text, origin), check_inputs, num_experts, origin)
    try:
        return policy_from_spec(text, check_inputs=check_inputs, num_experts=num_experts)
    except ValueError as e:
        raise ValueError(f"{origin}: {e}") from None


def load_policy(path: str | Path, *, check_inputs: bool = True, num_experts: int | None = None) -> Policy:
    """The policy a policy file describes: the JSON object `MOE_REROUTE_POLICY_FILE` takes (as
    `moe-reroute tune` writes it), or a spec on one line. For `moe_reroute.hf.apply` and direct calls.

    Engine settings in the file ("phase", "verify") are for the engine plugins and are not part of the
    returned policy. Raises ValueError naming the file for anything it cannot use.
    """
    return policy_from_text(read_policy_text(path), check_inputs=check_inputs, num_experts=num_experts,
                            origin=str(path))


def _json_value(name: str, value: Any) -> Any:
    """A parameter's JSON value as the policy configs take it: layer keys of a per-layer object become
    ints (JSON keys are strings), at the top and inside `by_batch` buckets."""
    if isinstance(value, dict) and set(value) == {"by_batch"} and isinstance(value["by_batch"], dict):
        return {"by_batch": {k: _layer_keys(name, v) for k, v in value["by_batch"].items()}}
    return _layer_keys(name, value)


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
