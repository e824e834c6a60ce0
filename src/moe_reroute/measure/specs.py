"""Policy specs as written on a command line: `name` or `name:param=value,param=value`.

Values are ints, floats, true/false/none, lists in brackets (`oea:k0=[2,3,3,4]`, one value per MoE
layer) or parentheses (`cap:schedule=(2,4,8,3),num_layers=48`), and otherwise plain strings such as a
file path (`sere:similarity=sim.safetensors`).
"""

from __future__ import annotations

from typing import Any

from ..policies import POLICIES, Policy, make_policy


def parse_policy_spec(text: str) -> tuple[str, dict[str, Any]]:
    """("oea", {"k0": 3, "p": 0.9}) from "oea:k0=3,p=0.9"; raises ValueError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty policy spec; write e.g. native, cap:k=4, oea:k0=3 or budget:budget=32")
    label = repr(text) if len(text) <= 80 else repr(text[:60]) + f"... ({len(text)} characters)"
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
            raise ValueError(f"policy spec {label}: {item.strip()!r} is not param=value (e.g. {name}:k0=3)")
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
        if name == "sere" and isinstance(params.get("similarity"), str):
            from ..hf.calibrate import load_similarity

            params["similarity"] = load_similarity(params["similarity"], num_experts=num_experts)
        return make_policy(name, check_inputs=check_inputs, **params)
    except (TypeError, ValueError, OSError) as e:
        raise ValueError(f"policy spec {text!r:.80}: {e}") from None


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
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    if any(ch in raw for ch in "[]()"):
        raise ValueError(f"policy spec {label}: cannot read value {raw!r}; use a number, true/false/none, "
                         "[a,b,...] or a plain string")
    return raw
