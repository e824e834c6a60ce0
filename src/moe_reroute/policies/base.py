"""What every policy shares: a frozen config whose fields may differ per layer, and the call contract.

A field marked `per_layer(...)` accepts one value for every layer, a list indexed by layer, or a
mapping {layer: value}; the policy resolves it with the `layer` argument of each call. Such a field may
also depend on the size of the step, its number of tokens T (rows of the call, padding included): `{"by_batch":
{"1": 8, "4": 4, "32": 3, "max": 2}}` (see `ByBatch`), each bucket's value one value or per layer.

Layers are counted over MoE layers only: `layer` is the 0-based MoE-layer index (0 = the model's first
MoE layer; dense layers such as DeepSeek-V3's first three are not counted), so a list holds one value
per MoE layer. The adapters (transformers, vLLM, SGLang, traces) map decoder layers to that index.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..contract import RouterSpec, Routing, tracing, check_inputs
from .. import kernels
from ..metrics import unique_experts
from ..scoring import check_ties

BACKENDS = ("auto", "torch", "triton")


# No model has more layers than this; bounds per-layer schedules and layer keys.
MAX_LAYERS = 4096


def per_layer(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A config field that may be given per layer (list or mapping by MoE-layer index)."""
    return dataclasses.field(default=default, metadata={"per_layer": True}, **kwargs)


BY_BATCH = "by_batch"
REST = "max"  # the bucket of every step larger than the largest bound


@dataclasses.dataclass(frozen=True, eq=True)
class ByBatch:
    """A parameter whose value depends on the step's number of tokens T.

    `buckets`: ((bound, value), ...) in increasing bound order; a step of T tokens takes the value of the
    first bucket with T <= bound, and `rest` (the "max" bucket) when T exceeds every bound. Written
    `{"by_batch": {"1": 8, "4": 4, "32": 3, "max": 2}}`: T = 1 -> 8, 2..4 -> 4, 5..32 -> 3, more -> 2.
    A value may itself be per layer (a list or {layer: value}). T is the rows of the call, known on
    the host from the logits' shape (under CUDA graphs, the captured size: one graph per size, each with
    its bucket's value; no host synchronisation).
    """

    buckets: tuple[tuple[int, Any], ...]
    rest: Any

    @classmethod
    def parse(cls, name: str, obj: Any) -> ByBatch:
        """From `{"by_batch": {bound: value, ..., "max": value}}` (bounds as ints or plain decimal strings)."""
        example = '{"by_batch": {"1": 8, "4": 4, "max": 2}}'
        table = obj.get(BY_BATCH) if isinstance(obj, Mapping) else None
        if not isinstance(table, Mapping) or set(obj) != {BY_BATCH} or not table:
            raise ValueError(f"{name}: a value by batch size is an object {example}")
        if REST not in table:
            raise ValueError(f"{name}: by_batch needs a \"max\" bucket for steps larger than its largest bound "
                             f"(bounds {sorted(k for k in table if k != REST)}), e.g. {example}")
        buckets = {}
        for key, value in table.items():
            if key == REST:
                continue
            bound = key if is_int(key) else (int(key) if isinstance(key, str) and key.isascii() and key.isdigit()
                                              and str(int(key)) == key else None)
            if bound is None or bound < 1:
                raise ValueError(f"{name}: by_batch bound {key!r} is not a step size; write sizes as plain "
                                 f"positive integers (largest tokens per step of the bucket) or \"max\", e.g. {example}")
            if int(bound) in buckets:
                raise ValueError(f"{name}: by_batch bound {int(bound)} is given twice")
            buckets[int(bound)] = value
        return cls(tuple(sorted(buckets.items())), table[REST])

    def at(self, tokens: int) -> Any:
        """The value for a step of `tokens` rows."""
        for bound, value in self.buckets:
            if tokens <= bound:
                return value
        return self.rest

    def values(self) -> list[Any]:
        """The value of every bucket, "max" last."""
        return [v for _, v in self.buckets] + [self.rest]

    def to_json(self) -> dict[str, Any]:
        return {BY_BATCH: {**{str(b): v for b, v in self.buckets}, REST: self.rest}}


def is_by_batch(value: Any) -> bool:
    return isinstance(value, ByBatch) or (isinstance(value, Mapping) and BY_BATCH in value)


def is_per_layer_value(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, ByBatch)):
        return False
    return isinstance(value, Mapping) or (isinstance(value, Sequence) and not isinstance(value, str))


def layer_values(value: Any) -> list[Any]:
    """Every value a per-layer field may take (for validation), over every batch bucket."""
    if isinstance(value, ByBatch):
        return [v for bucket in value.values() for v in layer_values(bucket)]
    if isinstance(value, Mapping):
        return list(value.values())
    if is_per_layer_value(value):
        return list(value)
    return [value]


# Said wherever a per-layer value does not cover a layer: the numbering is the usual surprise.
COUNTING = "layers count MoE layers only, from 0; dense layers are not counted"


def _buckets(value: Any) -> list[Any]:
    return value.values() if isinstance(value, ByBatch) else [value]


def resolve(name: str, value: Any, layer: int | None) -> Any:
    """The value of a per-layer field at MoE layer `layer`."""
    if not is_per_layer_value(value):
        return value
    if layer is None:
        raise ValueError(f"{name} is given per layer; call the policy with layer=<MoE-layer index>")
    if isinstance(value, Mapping):
        if layer not in value:
            raise ValueError(f"{name} has no value for MoE layer {layer} (it covers MoE layers {sorted(value)}; "
                             f"{COUNTING})")
        return value[layer]
    if not 0 <= layer < len(value):
        raise ValueError(f"{name} lists {len(value)} layers; MoE layer {layer} is out of range ({COUNTING}: "
                         "give one value per MoE layer)")
    return value[layer]


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base of the policies' configs. Subclasses validate their values in `check`; `DERIVED` names the
    attributes a subclass sets at construction beside its fields (the per-layer copies share them)."""

    DERIVED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("per_layer"):
                if is_by_batch(value):
                    if not isinstance(value, ByBatch):
                        value = ByBatch.parse(f.name, value)
                        object.__setattr__(self, f.name, value)
                    buckets = value.values()
                else:
                    buckets = [value]
                for bucket in buckets:
                    if is_by_batch(bucket):
                        raise ValueError(f"{f.name}: by_batch cannot nest; give one by_batch whose buckets "
                                         "hold a value or a per-layer list")
                    if isinstance(bucket, Mapping):
                        bad = [k for k in bucket if not isinstance(k, int) or k < 0]
                        if bad:
                            raise ValueError(f"{f.name}: layer keys must be non-negative ints, got {bad}")
                    if is_per_layer_value(bucket) and len(layer_values(bucket)) == 0:
                        raise ValueError(f"{f.name}: an empty per-layer list or mapping gives no value for any layer")
                for v in layer_values(value):
                    self.check(f.name, v)
            elif is_by_batch(value):
                raise ValueError(f"{f.name} cannot differ by batch size")
            elif is_per_layer_value(value) and not f.metadata.get("sequence"):
                raise ValueError(f"{f.name} cannot differ per layer")
            else:
                self.check(f.name, value)

    def check(self, name: str, value: Any) -> None:
        """Validate one (per-layer resolved) value of field `name`; raise ValueError naming the fix."""

    def layer_keys(self) -> list[tuple[str, list[int]]]:
        """(field, the MoE layers it gives values for) of every value given per layer (each by_batch bucket's)."""
        out = []
        for f in dataclasses.fields(self):
            if f.metadata.get("per_layer"):
                for bucket in _buckets(getattr(self, f.name)):
                    if isinstance(bucket, Mapping):
                        out.append((f.name, sorted(bucket)))
                    elif is_per_layer_value(bucket):
                        out.append((f.name, list(range(len(bucket)))))
        return out

    def layers_note(self, name: str) -> str:
        """Said after a per-layer value of field `name` that does not fit the model's layers (e.g. where it
        came from); "" by default."""
        return ""

    def varies_by_layer(self) -> bool:
        """Whether some value is given per layer, so that a call needs its MoE-layer index."""
        return any(f.metadata.get("per_layer") and any(is_per_layer_value(v) for v in _buckets(getattr(self, f.name)))
                   for f in dataclasses.fields(self))

    def varies_by_batch(self) -> bool:
        """Whether some value depends on the step's number of tokens (`ByBatch`)."""
        return any(isinstance(getattr(self, f.name), ByBatch) for f in dataclasses.fields(self))

    def bucket_sizes(self) -> list[int]:
        """A step size in every batch bucket of every field (the bounds, and one past the largest for
        "max"); [1] when nothing depends on the batch size. For checking every bucket."""
        bounds = sorted({b for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), ByBatch)
                         for b, _ in getattr(self, f.name).buckets})
        return bounds + [bounds[-1] + 1] if bounds else [1]

    def at_layer(self, layer: int | None, tokens: int | None = None) -> PolicyConfig:
        """This config with every per-layer field resolved to its value at `layer` (and every by-batch
        field at a step of `tokens` rows).

        The values were validated at construction, so the copy skips `__post_init__` (which may read
        tensors, a host synchronisation that must not happen inside a CUDA graph).
        """
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata.get("per_layer"):
                continue
            if isinstance(value, ByBatch):
                if tokens is None:
                    raise ValueError(f"{f.name} depends on the batch size; call with the step's tokens")
                value = value.at(int(tokens))
                changes[f.name] = value
            if is_per_layer_value(value):
                changes[f.name] = resolve(f.name, value, layer)
        if not changes:
            return self
        # a shallow copy written out (torch 2.11's dynamo cannot trace copy.copy, nor read __dict__): the fields,
        # then the attributes a subclass sets at construction (`DERIVED`)
        resolved = self.__class__.__new__(self.__class__)
        for f in dataclasses.fields(self):
            object.__setattr__(resolved, f.name, changes[f.name] if f.name in changes else getattr(self, f.name))
        for name in self.DERIVED:
            object.__setattr__(resolved, name, getattr(self, name))
        return resolved


class Policy:
    """A routing policy: `policy(router_logits [T, E], spec, valid=None, layer=None, native=None, fixed=None)
    -> Routing`. router_logits [S, T, E] (valid, fixed [S, T], native [S, T, K]) routes S steps of one
    layer, each as its own batch (the answer of S separate calls), into a Routing of [S, T, K] tensors.

    `layer` is the MoE-layer index (0 = the model's first MoE layer, dense layers not counted); it picks
    the values given per layer and may be None when there are none.

    `fixed` [T] bool marks rows that must keep native routing (an engine's prefill tokens in a step that
    mixes them with decode tokens): they come back exactly as `native` routes them (the engine's `native`
    top-K when given), and their native experts, which are loaded anyway, count as part of the batch's
    expert set, so the other rows may use them (each policy's module says how). None: no row is fixed,
    the routing of a call without it. An invalid row is padding whatever `fixed` says.

    `check_inputs=True` also checks the valid rows' logits for NaN/inf (a host synchronisation); engines
    that run policies inside CUDA graphs turn it off. Shapes, dtypes and parameters are always checked.
    `ties` is whose top-K ranks 1..K follow (see `moe_reroute.scoring`): "model" (torch.topk, as the
    transformers routers) or "lower-id" (the fused kernels' rule). `backend`: "torch" (torch ops),
    "triton" (the fused kernels of `moe_reroute.kernels`), or "auto" (the kernels for CUDA tensors when
    Triton is usable, else torch).
    """

    name: ClassVar[str]
    Config: ClassVar[type[PolicyConfig]]
    has_kernel: ClassVar[bool] = True  # whether `moe_reroute.kernels` has a fused kernel for it

    def __init__(self, config: PolicyConfig, check_inputs: bool = True, ties: str | None = None,
                 backend: str = "auto") -> None:
        if not isinstance(config, self.Config):
            raise TypeError(f"policy {self.name!r} takes a {self.Config.__name__}, got {type(config).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton" and not self.has_kernel:
            kernels.warn_once(f"policy {self.name!r} has no fused kernel; it runs as torch ops (backend='torch'), "
                              "with equal scores to the lower expert id as the kernels order them")
            backend, ties = "torch", ties or "lower-id"
        if backend == "triton":
            if ties == "model":
                raise ValueError("the Triton kernels order equal scores by lower expert id: use ties='lower-id' "
                                 "(or None) with backend='triton', or backend='torch' for the model's torch.topk order")
            ok, why = kernels._triton_status()
            if not ok:
                kernels.warn_once(why)
                backend = "torch"
        self.config = config
        self.check_inputs = check_inputs
        self.backend = backend
        self.ties = check_ties(ties or ("lower-id" if backend == "triton" else "model"))

    def no_kernel_for(self) -> str:
        """Why this policy's options have no fused kernel ("" when they have one): such a policy runs as
        torch ops, with one warning where it would have used the kernels."""
        return ""

    def uses_kernels(self, router_logits: torch.Tensor) -> bool:
        """Whether a call on these logits runs the fused kernels (backend "triton", or "auto" on CUDA)."""
        if self.backend == "torch" or not self.has_kernel or torch.compiler.is_compiling():
            return False  # under torch.compile the torch ops are traced and fused by the compiler
        if why := self.no_kernel_for():
            if self.backend == "triton" or (isinstance(router_logits, torch.Tensor) and router_logits.is_cuda):
                kernels.warn_once(why)
            return False
        if router_logits.dim() >= 1 and (why := kernels.too_many_experts(router_logits.shape[-1])):
            if self.backend == "triton" or router_logits.is_cuda:
                kernels.warn_once(why)
            return False
        if self.backend == "triton":
            ok, why = kernels.available(router_logits.device)
            if not ok:
                raise RuntimeError(f"policy {self.name!r} with backend='triton': {why}")
            return True
        return router_logits.is_cuda and kernels.available(router_logits.device)[0]

    def __call__(
        self,
        router_logits: torch.Tensor,
        spec: RouterSpec,
        valid: torch.Tensor | None = None,
        layer: int | None = None,
        native: tuple[torch.Tensor, torch.Tensor] | None = None,
        fixed: torch.Tensor | None = None,
    ) -> Routing:
        """native: an engine's own top-K (weights [T, K], ids [T, K]) for ranks 1..K, so that "native"
        means the engine's routing, ties included (torch backend; the kernels rank by their own).
        fixed: [T] bool, True on the rows that keep native routing (None: none). With [S, T, E] logits
        every [T, ...] argument gains the leading S."""
        fused, valid, config = self._prepare(router_logits, spec, valid, layer, fixed)
        if fused:
            return kernels.route(self, router_logits, spec, valid, config, layer, fixed)
        if native is not None:
            if (not isinstance(native, (tuple, list)) or len(native) != 2
                    or not all(isinstance(t, torch.Tensor) for t in native)):
                raise TypeError(f"native must be the engine's top-K as a (weights, ids) pair of tensors, got "
                                f"{type(native).__name__}")
            w, ids = native
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise TypeError(f"native ids must be an integer tensor (expert ids), got {ids.dtype}")
            if not w.dtype.is_floating_point:
                raise TypeError(f"native weights must be a floating-point tensor, got {w.dtype}")
            if ids.device != router_logits.device or w.device != router_logits.device:
                raise ValueError(f"native top-K is on {ids.device} / {w.device} but router_logits on "
                                 f"{router_logits.device}; put them on one device")
            want = (*router_logits.shape[:-1], spec.top_k)
            if tuple(ids.shape) != want or tuple(w.shape) != tuple(ids.shape):
                name = "[T, K]" if router_logits.dim() == 2 else "[S, T, K]"
                raise ValueError(f"native top-K must be (weights, ids) of shape {name}={list(want)} ([T, K] for "
                                 f"router_logits [T, E], [S, T, K] for [S, T, E]), got {tuple(w.shape)} and "
                                 f"{tuple(ids.shape)}")
            if self.check_inputs and not tracing():
                _check_native_ids(ids, spec.num_experts, valid)
            native = (w.float(), ids.long())
        return self.route(router_logits, spec, valid, config, layer, native, fixed)

    def unique(
        self,
        router_logits: torch.Tensor,
        spec: RouterSpec,
        valid: torch.Tensor | None = None,
        layer: int | None = None,
        fixed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """U of the routing `self(router_logits, spec, valid, layer, fixed=fixed)` returns, exactly
        `metrics.unique_experts` of it: 0-d int64 for [T, E] logits, [S] for [S, T, E]. The same checks
        as a call; policies that can count U without building the routing do (`count_unique`), which may
        synchronise with the host, so this is for measuring (trace replay), not for CUDA graphs."""
        fused, valid, config = self._prepare(router_logits, spec, valid, layer, fixed)
        if fused:
            return _unique(kernels.route(self, router_logits, spec, valid, config, layer, fixed), spec)
        return self.count_unique(router_logits, spec, valid, config, layer, fixed)

    def count_unique(
        self, router_logits: torch.Tensor, spec: RouterSpec, valid: torch.Tensor, config: Any, layer: int | None,
        fixed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`unique` on checked inputs (as `route` takes them): U of `route`'s routing. Policies override
        it where U follows from less than the routing."""
        return _unique(self.route(router_logits, spec, valid, config, layer, None, fixed), spec)

    def _prepare(self, router_logits, spec, valid, layer, fixed) -> tuple[bool, torch.Tensor | None, Any]:
        """(fused, valid, config) of a call: inputs checked, config resolved at `layer` and the step size."""
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
            raise TypeError(f"layer must be the MoE-layer index (an int >= 0; {COUNTING}) or None, got {layer!r}")
        fused = isinstance(router_logits, torch.Tensor) and self.uses_kernels(router_logits)
        valid = check_inputs(router_logits, spec, valid, self.check_inputs, materialize=not fused, fixed=fixed)
        config = self.config.at_layer(layer, router_logits.shape[-2] if router_logits.dim() >= 2 else None)
        self.check_fit(spec, config, layer)
        return fused, valid, config

    def check_fit(self, spec: RouterSpec, config: Any, layer: int | None) -> None:
        """Raise ValueError if `config` (resolved at `layer`) does not fit the model (e.g. k0 > K)."""

    def check_layers(self, num_layers: int) -> None:
        """Raise ValueError if a value given per layer covers MoE layers a model of `num_layers` MoE layers
        does not have (a list longer than that, a mapping with a larger key): it was meant for another model,
        and its values would land on the wrong layers. Adapters call this once per model; a layer a value
        does not cover fails at that layer's dry run."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be the model's number of MoE layers (an int >= 1), got {num_layers!r}")
        for name, layers in self.config.layer_keys():
            extra = [k for k in layers if k >= num_layers]
            if extra:
                given = (f"lists {len(layers)} layers" if layers == list(range(len(layers)))
                         else f"gives values for MoE layers {extra}")
                raise ValueError(f"{self.name} {name} {given}{self.config.layers_note(name)}, but the model has "
                                 f"{num_layers} MoE layers (0..{num_layers - 1}); give one value per MoE layer of this "
                                 f"model ({COUNTING})")

    def dry_run(self, spec: RouterSpec, layer: int | None, num_layers: int | None = None) -> None:
        """What an engine checks before it serves with this policy: per-layer values against the model's
        `num_layers` MoE layers (when known, `check_layers`), every by_batch bucket at `layer` (`check_model`),
        and one call on two rows of dummy logits (no ties) at the layer's E, on CPU, the correction bias left
        out (it may live on the GPU). Raises the ValueError or TypeError that says what does not fit."""
        if num_layers is not None:
            self.check_layers(num_layers)
        spec = spec.with_bias(None) if spec.e_score_correction_bias is not None else spec
        self.check_model(spec, layer)
        logits = torch.linspace(-1, 1, 2 * spec.num_experts, device="cpu").view(2, -1)  # [2, E], no ties
        self(logits, spec, layer=layer)

    def check_model(self, spec: RouterSpec, layer: int | None) -> None:
        """Raise ValueError if the policy does not fit a layer of the model at some step size: `check_fit`
        on every batch bucket's values at `layer` (the engines' dry runs call this)."""
        for tokens in self.config.bucket_sizes():
            config = self.config.at_layer(layer, tokens)
            try:
                self.check_fit(spec, config, layer)
            except ValueError as e:
                if not self.config.varies_by_batch():
                    raise
                bounds = self.config.bucket_sizes()
                which = '"max"' if tokens == bounds[-1] else f"of steps up to {tokens} tokens"
                raise ValueError(f"{e} (by_batch bucket {which})") from None

    def route(
        self, router_logits: torch.Tensor, spec: RouterSpec, valid: torch.Tensor, config: Any, layer: int | None,
        native: tuple[torch.Tensor, torch.Tensor] | None = None, fixed: torch.Tensor | None = None,
    ) -> Routing:
        """The policy proper, on checked inputs, with `config` resolved at `layer`; `fixed` [T] bool or None."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def _check_native_ids(ids: torch.Tensor, num_experts: int, valid: torch.Tensor | None) -> None:
    """The engine's native ids are expert ids 0..E-1 on every row (each is read), K distinct ones on the
    valid rows (one host synchronisation; with check_inputs only)."""
    out = (ids < 0) | (ids >= num_experts)
    if bool(out.any()):
        raise ValueError(f"native ids must be expert ids 0..{num_experts - 1} (padding rows too), got "
                         f"{ids[out][0].item()}")
    rows = ids if valid is None else ids[valid]
    sorted_ids = rows.sort(dim=-1)[0]
    if bool((sorted_ids[..., 1:] == sorted_ids[..., :-1]).any()):
        raise ValueError("native ids repeat an expert within a row; a native top-K holds K distinct experts")


def _unique(routing: Routing, spec: RouterSpec) -> torch.Tensor:
    return unique_experts(routing, spec.num_experts)


def is_int(value: Any) -> bool:
    """An integral number (int, numpy.int64, a 0-d integer tensor's item...), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def need_int(name: str, value: Any, low: int = 1) -> None:
    if not is_int(value) or value < low:
        kind = "" if is_int(value) else f" (a {type(value).__name__})"
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}{kind}")


def need_at_most(name: str, value: int, limit: int, what: str) -> None:
    if value > limit:
        raise ValueError(f"{name}={value} > {what}={limit}")
