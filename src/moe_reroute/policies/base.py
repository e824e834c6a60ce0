"""What every policy shares: a frozen config whose fields may differ per layer, and the call contract.

A field marked `per_layer(...)` accepts one value for every layer, a list indexed by layer, or a
mapping {layer: value}; the policy resolves it with the `layer` argument of each call.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..contract import RouterSpec, Routing, check_inputs


def per_layer(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A config field that may be given per layer (list or mapping by layer index)."""
    return dataclasses.field(default=default, metadata={"per_layer": True}, **kwargs)


def is_per_layer_value(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return False
    return isinstance(value, Mapping) or (isinstance(value, Sequence) and not isinstance(value, str))


def layer_values(value: Any) -> list[Any]:
    """Every value a per-layer field may take (for validation)."""
    if isinstance(value, Mapping):
        return list(value.values())
    if is_per_layer_value(value):
        return list(value)
    return [value]


def resolve(name: str, value: Any, layer: int | None) -> Any:
    """The value of a per-layer field at `layer`."""
    if not is_per_layer_value(value):
        return value
    if layer is None:
        raise ValueError(f"{name} is given per layer; call the policy with layer=<layer index>")
    if isinstance(value, Mapping):
        if layer not in value:
            raise ValueError(f"{name} has no value for layer {layer} (it covers layers {sorted(value)})")
        return value[layer]
    if not 0 <= layer < len(value):
        raise ValueError(f"{name} lists {len(value)} layers; layer {layer} is out of range")
    return value[layer]


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base of the policies' configs. Subclasses validate their values in `check`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("per_layer"):
                if isinstance(value, Mapping):
                    bad = [k for k in value if not isinstance(k, int) or k < 0]
                    if bad:
                        raise ValueError(f"{f.name}: layer keys must be non-negative ints, got {bad}")
                if is_per_layer_value(value) and len(layer_values(value)) == 0:
                    raise ValueError(f"{f.name}: an empty per-layer list or mapping gives no value for any layer")
                for v in layer_values(value):
                    self.check(f.name, v)
            elif is_per_layer_value(value) and not f.metadata.get("sequence"):
                raise ValueError(f"{f.name} cannot differ per layer")
            else:
                self.check(f.name, value)

    def check(self, name: str, value: Any) -> None:
        """Validate one (per-layer resolved) value of field `name`; raise ValueError naming the fix."""

    def at_layer(self, layer: int | None) -> PolicyConfig:
        """This config with every per-layer field resolved to its value at `layer`.

        The values were validated at construction, so the copy skips `__post_init__` (which may read
        tensors, a host synchronisation that must not happen inside a CUDA graph).
        """
        changes = {
            f.name: resolve(f.name, getattr(self, f.name), layer)
            for f in dataclasses.fields(self)
            if f.metadata.get("per_layer") and is_per_layer_value(getattr(self, f.name))
        }
        if not changes:
            return self
        resolved = copy.copy(self)
        for name, value in changes.items():
            object.__setattr__(resolved, name, value)
        return resolved


class Policy:
    """A routing policy: `policy(router_logits [T, E], spec, valid=None, layer=None) -> Routing`.

    `check_inputs=True` also checks the logits for NaN/inf (a host synchronisation); engines that
    run policies inside CUDA graphs turn it off. Shapes, dtypes and parameters are always checked.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PolicyConfig]]

    def __init__(self, config: PolicyConfig, check_inputs: bool = True) -> None:
        if not isinstance(config, self.Config):
            raise TypeError(f"policy {self.name!r} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.check_inputs = check_inputs

    def __call__(
        self,
        router_logits: torch.Tensor,
        spec: RouterSpec,
        valid: torch.Tensor | None = None,
        layer: int | None = None,
    ) -> Routing:
        valid = check_inputs(router_logits, spec, valid, self.check_inputs)
        return self.route(router_logits, spec, valid, self.config.at_layer(layer), layer)

    def route(
        self, router_logits: torch.Tensor, spec: RouterSpec, valid: torch.Tensor, config: Any, layer: int | None
    ) -> Routing:
        """The policy proper, on checked inputs, with `config` resolved at `layer`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def need_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def need_at_most(name: str, value: int, limit: int, what: str) -> None:
    if value > limit:
        raise ValueError(f"{name}={value} > {what}={limit}")
