"""Routing policies, one module each, and the registry that builds them by name."""

from __future__ import annotations

from typing import Any

from .base import Policy, PolicyConfig
from .budget import Budget, BudgetConfig
from .cap import Cap, CapConfig, cap_schedule
from .gain import Gain, GainConfig
from .lynx import Lynx, LynxConfig
from .native import Native, NativeConfig
from .oea import OEA, OEAConfig
from .sere import SERE, SEREConfig
from .xshare import XShare, XShareConfig

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Native, Cap, OEA, SERE, Budget, Gain, XShare, Lynx)}
_BY_CONFIG: dict[type[PolicyConfig], type[Policy]] = {p.Config: p for p in POLICIES.values()}


def make_policy(
    name: str | PolicyConfig,
    *,
    check_inputs: bool = True,
    backend: str = "auto",
    ties: str | None = None,
    **params: Any,
) -> Policy:
    """Build a policy by name and parameters, e.g. `make_policy("oea", k0=3)`, or from a config object.

    check_inputs: also check the valid rows' router logits for NaN/inf on every call (one host synchronisation).
    backend: "auto" (fused Triton kernels for CUDA tensors when Triton is usable, else torch), "torch" or
      "triton" (the kernels always; CPU tensors need TRITON_INTERPRET=1).
    ties: whose top-K order ranks 1..K follow: "model" (torch.topk; the torch default) or "lower-id"
      (equal scores to the lower expert id; the kernels' rule).
    """
    opts = dict(check_inputs=check_inputs, backend=backend, ties=ties)
    if isinstance(name, PolicyConfig):
        if params:
            raise TypeError("make_policy(config) takes no further parameters; put them in the config")
        return _BY_CONFIG[type(name)](name, **opts)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    try:
        config = cls.Config(**params)
    except TypeError as e:
        import dataclasses

        known = [f.name for f in dataclasses.fields(cls.Config)]
        raise TypeError(f"policy {name!r}: {e}; its parameters are: {', '.join(known) or 'none'}") from None
    return cls(config, **opts)


from .spec import load_policy, parse_policy_spec, policy_from_object, policy_from_spec, policy_from_text  # noqa: E402

__all__ = [
    "POLICIES",
    "Budget",
    "BudgetConfig",
    "Cap",
    "CapConfig",
    "Gain",
    "GainConfig",
    "Lynx",
    "LynxConfig",
    "Native",
    "NativeConfig",
    "OEA",
    "OEAConfig",
    "Policy",
    "PolicyConfig",
    "SERE",
    "SEREConfig",
    "XShare",
    "XShareConfig",
    "cap_schedule",
    "load_policy",
    "make_policy",
    "parse_policy_spec",
    "policy_from_object",
    "policy_from_spec",
    "policy_from_text",
]
