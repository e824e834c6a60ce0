"""Routing traces: router logits of a run, saved to disk, replayed through any policy without the model.

A trace holds, per MoE layer, the router logits of S decode steps of B sequences ([S, B, E]) and which
of those tokens were real ([S, B]). Step s of the trace is one decode batch: the B tokens at that step.
Traces of single sequences concatenate (`Trace.concat`) and re-batch (`Trace.rebatch`) into decode
batches of any size, so policies can be studied at any batch size offline.

Layers are keyed by decoder-layer index, as the model's modules are numbered (a DeepSeek-V3 trace starts
at layer 3). A trace holds every MoE layer of its model, as `moe_reroute.hf.Recorder` writes it, so the
n-th of its layers is MoE layer n: replaying a policy calls it with that MoE-layer index
(`Trace.moe_layer`), the index per-layer values are given by.

File format: safetensors with tensors `logits.<layer>` [S, B, E], `valid` [S, B] and, for DeepSeek-style
specs, `bias.<layer>` [E]; its metadata key "moe_reroute" holds a JSON header (model, RouterSpec per
layer, batch composition, dtype, library version).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .contract import BIASED_ROUTERS, RouterSpec
from .policies import Policy

FORMAT = "moe_reroute.trace/1"


@dataclass
class Trace:
    """Router logits of S steps x B sequences for each MoE layer of a model.

    logits: {decoder layer: [S, B, E]}, one entry per MoE layer. valid: [S, B] bool. specs: {decoder
    layer: RouterSpec}. meta: model, dtype, ...
    """

    logits: dict[int, torch.Tensor]
    valid: torch.Tensor
    specs: dict[int, RouterSpec]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.logits:
            raise ValueError("a trace needs the logits of at least one layer")
        if set(self.logits) != set(self.specs):
            raise ValueError(f"trace layers {sorted(self.logits)} and spec layers {sorted(self.specs)} differ")
        if self.valid.dim() != 2 or self.valid.dtype != torch.bool:
            raise ValueError(f"trace valid must be a [S, B] bool tensor, got {tuple(self.valid.shape)} {self.valid.dtype}")
        for layer, x in self.logits.items():
            E = self.specs[layer].num_experts
            if tuple(x.shape) != (*self.valid.shape, E):
                raise ValueError(
                    f"trace layer {layer}: logits {tuple(x.shape)} do not match valid {tuple(self.valid.shape)} and E={E}"
                )

    @property
    def steps(self) -> int:
        return self.valid.shape[0]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[1]

    @property
    def layers(self) -> list[int]:
        """The decoder-layer indices of the trace's MoE layers, in order."""
        return sorted(self.logits)

    def moe_layer(self, layer: int) -> int:
        """The MoE-layer index of decoder layer `layer`: its position among the trace's layers (a trace
        holds every MoE layer of its model). Policies are called with it."""
        if layer not in self.logits:
            raise ValueError(f"layer {layer} is not in this trace; it holds decoder layers {self.layers}")
        return self.layers.index(layer)

    def replay(self, policy: Policy, layers: list[int] | None = None,
               chunk_steps: int | None = None) -> dict[int, torch.Tensor]:
        """U of each step under `policy`: {decoder layer: [S] int64}. Each step's B tokens form one batch;
        the policy is called with each layer's MoE-layer index (`moe_layer`), on `chunk_steps` steps at a
        time ([chunk, B, E], each step its own batch; default: about CHUNK_BYTES of float32 logits).
        `layers`: decoder layers."""
        unknown = sorted(set(layers or ()) - set(self.layers))
        if unknown:
            raise ValueError(f"layers {unknown} are not in this trace; it holds layers {self.layers}")
        _check_chunk(chunk_steps)
        out = {}
        for layer in layers or self.layers:
            spec = self.specs[layer]
            x = self.logits[layer]
            out[layer] = replay_layer(policy, x, self.valid, spec, self.moe_layer(layer), chunk_steps)
        return out

    def rebatch(self, batch_size: int) -> Trace:
        """Decode batches of `batch_size` sequences: sequences are split into groups of `batch_size`
        (the last incomplete group dropped) and the groups' steps follow one another."""
        B = self.batch_size
        if not 1 <= batch_size <= B:
            raise ValueError(
                f"batch size {batch_size} needs 1 <= it <= the trace's {B} sequences; record or concatenate more"
            )
        groups = B // batch_size

        def regroup(x: torch.Tensor) -> torch.Tensor:  # [S, B, ...] -> [groups * S, batch_size, ...]
            x = x[:, : groups * batch_size]
            x = x.reshape(x.shape[0], groups, batch_size, *x.shape[2:]).transpose(0, 1)
            return x.reshape(groups * x.shape[1], batch_size, *x.shape[3:])

        meta = dict(self.meta, rebatched_from=B)
        return Trace({k: regroup(v) for k, v in self.logits.items()}, regroup(self.valid), dict(self.specs), meta)

    @staticmethod
    def concat(traces: list[Trace]) -> Trace:
        """Put the sequences of several traces side by side (same model); shorter ones are padded with
        invalid steps."""
        if not traces:
            raise ValueError("nothing to concatenate")
        first = traces[0]
        for t in traces[1:]:
            first.check_compatible(t.specs, what="a trace being concatenated")
        S = max(t.steps for t in traces)

        def pad(x: torch.Tensor, fill) -> torch.Tensor:
            extra = S - x.shape[0]
            return x if extra == 0 else torch.cat([x, x.new_full((extra, *x.shape[1:]), fill)])

        logits = {k: torch.cat([pad(t.logits[k], 0) for t in traces], dim=1) for k in first.layers}
        valid = torch.cat([pad(t.valid, False) for t in traces], dim=1)
        return Trace(logits, valid, dict(first.specs), dict(first.meta, concatenated=len(traces)))

    def check_compatible(self, specs: dict[int, RouterSpec] | Any, what: str = "this model") -> None:
        """Raise if `specs` (or a model with a transformers config) routes differently from the trace."""
        if not isinstance(specs, dict):
            from .hf.apply import layer_spec, moe_routers

            base = RouterSpec.from_config(specs.config)
            specs = {i: layer_spec(base, r) for i, r in moe_routers(specs)}
        if sorted(specs) != self.layers:
            raise ValueError(f"the trace has MoE layers {self.layers} but {what} has {sorted(specs)}")
        for layer, spec in specs.items():
            mine = self.specs[layer]
            if _spec_dict(spec) != _spec_dict(mine):
                raise ValueError(
                    f"the trace was recorded on a model ({self.meta.get('model', '?')}) whose layer {layer} routes as "
                    f"{_spec_dict(mine)}, but {what} routes as {_spec_dict(spec)}"
                )

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from . import __version__

        tensors = {f"logits.{k}": v.contiguous() for k, v in self.logits.items()}
        tensors["valid"] = self.valid.contiguous()
        for k, spec in self.specs.items():
            if spec.e_score_correction_bias is not None:
                tensors[f"bias.{k}"] = spec.e_score_correction_bias.detach().float().cpu().contiguous()
        header = {
            "format": FORMAT,
            "version": __version__,
            "specs": {str(k): _spec_dict(s) for k, s in self.specs.items()},
            "steps": self.steps,
            "batch_size": self.batch_size,
            "dtype": str(next(iter(self.logits.values())).dtype).removeprefix("torch."),
            "meta": self.meta,
        }
        from .files import write_atomic

        tensors = _unshared({k: v.cpu() for k, v in tensors.items()})
        # written beside `path` and renamed onto it; a device, FIFO or folder at `path` is refused, never replaced
        return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"moe_reroute": json.dumps(header)}))


WHAT = "a moe-reroute routing trace (written by Trace.save or moe_reroute.hf.Recorder)"

# Replay routes this many bytes of float32 logits per policy call (the policy's own tensors take about
# ten times as much): large enough that per-call overhead vanishes, small enough to bound memory.
CHUNK_BYTES = 64 << 20


def default_chunk_steps(batch_size: int, num_experts: int) -> int:
    """Steps per replay chunk: about CHUNK_BYTES of float32 [steps, B, E] logits."""
    return max(1, CHUNK_BYTES // (4 * batch_size * num_experts))


def replay_steps(policy: Policy, logits: torch.Tensor, valid: torch.Tensor, spec: RouterSpec,
                 moe_layer: int) -> torch.Tensor:
    """U of each of S steps ([S, B, E] logits, [S, B] valid), each step one batch, in one policy call. [S]

    `policy.unique`: the U of the policy's routing, counted without building it where the policy can.
    The logits go in as stored, except that GPT-OSS's top-K softmax weighs in the logits' dtype: it
    gets float32, as a replay always gave it (the other scorings work in float32 from any dtype).
    """
    if spec.scoring == "topk_softmax":
        logits = logits.float()
    return policy.unique(logits, spec, valid, layer=moe_layer)


def replay_layer(policy: Policy, logits: Any, valid: torch.Tensor, spec: RouterSpec, moe_layer: int,
                 chunk_steps: int | None = None) -> torch.Tensor:
    """U of each of one layer's S steps, `chunk_steps` steps per policy call (default: about CHUNK_BYTES of
    float32 logits). [S]

    logits: [S, B, E], anything sliced along steps (a tensor, or a safetensors slice read on demand)."""
    S, B = valid.shape
    steps = chunk_steps or default_chunk_steps(B, spec.num_experts)
    return torch.cat([replay_steps(policy, logits[s0:s0 + steps], valid[s0:s0 + steps], spec, moe_layer)
                      for s0 in range(0, S, steps)])


def replay_experts(policy: Policy, logits: torch.Tensor, valid: torch.Tensor, spec: RouterSpec, moe_layer: int,
                   chunk_steps: int | None = None) -> torch.Tensor:
    """Which experts each of one layer's S steps activates under `policy`: [S, E] bool (valid tokens only),
    `chunk_steps` steps per policy call. For what U alone cannot say, such as how a step's experts fall on
    the ranks of expert parallelism (`moe_reroute.metrics.rank_unique`)."""
    from .metrics import used_experts

    _check_chunk(chunk_steps)
    S, B = valid.shape
    steps = chunk_steps or default_chunk_steps(B, spec.num_experts)
    out = []
    for s0 in range(0, S, steps):
        x, v = logits[s0:s0 + steps], valid[s0:s0 + steps]
        if spec.scoring == "topk_softmax":
            x = x.float()
        out.append(used_experts(policy(x, spec, v, layer=moe_layer), spec.num_experts))
    return torch.cat(out)


def replay_file(path: str | Path, policy: Policy, layers: list[int] | None = None,
                chunk_steps: int | None = None) -> dict[int, torch.Tensor]:
    """`load(path).replay(policy, layers)` without loading the trace: one layer at a time, read from the
    file `chunk_steps` steps at a time, so memory holds one chunk whatever the trace's size.

    Returns {decoder layer: [S] int64 U of each step}; `summary` turns it into mean U per layer. The
    header is checked as `load` checks it; the logits' values are not (a NaN reaches the policy, which
    refuses it unless made with check_inputs=False).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_chunk(chunk_steps)
    from .files import regular_file_problem

    problem = regular_file_problem(path, limit=None)
    if problem and problem[0] == "missing":
        raise FileNotFoundError(f"no file at {path}; expected {WHAT}")
    if problem:
        raise ValueError(f"{path} {problem[1]}; expected {WHAT}")
    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); expected {WHAT}") from None
    with f:
        specs, _, valid = _parse(path, dict(f.metadata() or {}), set(f.keys()), f.get_tensor)
        order = sorted(specs)
        unknown = sorted(set(layers or ()) - set(order))
        if unknown:
            raise ValueError(f"layers {unknown} are not in this trace; it holds layers {order}")
        S, B = valid.shape
        stored = {f.get_slice(f"logits.{layer}").get_dtype() for layer in order}
        said = json.loads(f.metadata()["moe_reroute"]).get("dtype")
        if said is not None and stored <= set(_FLOAT_NAMES) and said not in {_FLOAT_NAMES[d] for d in stored}:
            raise _bad(path, f"the header says dtype {said} but the logits are "
                             f"{', '.join(sorted(_FLOAT_NAMES[d] for d in stored))}")
        out = {}
        for layer in layers or order:
            spec = specs[layer]
            x = f.get_slice(f"logits.{layer}")
            if tuple(x.get_shape()) != (S, B, spec.num_experts) or x.get_dtype() not in _FLOAT_DTYPES:
                raise _bad(path, f"'logits.{layer}' must be [S, B, E]=[{S}, {B}, {spec.num_experts}] floating "
                                 f"point router logits, got {x.get_shape()} {x.get_dtype()}")
            out[layer] = replay_layer(policy, x, valid, spec, order.index(layer), chunk_steps)
    return out


# safetensors' names of the floating-point dtypes a trace may hold, and torch's
_FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_FLOAT_DTYPES = tuple(_FLOAT_NAMES)


def _check_chunk(chunk_steps: Any) -> None:
    if chunk_steps is not None and (isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 1):
        raise ValueError(f"chunk_steps must be a positive int (steps per policy call) or None, got {chunk_steps!r}")


def summary(unique: dict[int, torch.Tensor]) -> dict[int, float]:
    """Mean U over the steps of each layer, from `replay` or `replay_file`: {decoder layer: mean U}."""
    return {layer: float(u.float().mean()) for layer, u in unique.items()}


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each sharing memory with an earlier one copied: safetensors refuses shared storage
    (layers given one bias tensor, or logits sliced from one stacked tensor)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone() if storage in seen else t
        seen.add(storage)
    return out


def load(path: str | Path) -> Trace:
    """Read a trace written by `Trace.save`; every header field and tensor is checked, and a problem
    raises ValueError naming the file and the field."""
    from .files import read_safetensors

    path = Path(path)
    tensors, metadata = read_safetensors(path, WHAT)
    specs, meta, valid = _parse(path, metadata, set(tensors), tensors.get)
    logits = {}
    said = json.loads(metadata["moe_reroute"]).get("dtype")
    for layer in specs:
        x = tensors[f"logits.{layer}"]
        name = str(x.dtype).removeprefix("torch.")
        if name not in _FLOAT_NAMES.values():
            raise _bad(path, f"'logits.{layer}' must be floating point router logits "
                             f"({', '.join(_FLOAT_NAMES.values())}), got {name}")
        if not bool(torch.isfinite(x).all()):
            step = int(torch.isfinite(x).flatten(1).all(1).logical_not().nonzero()[0, 0]) if x.dim() > 1 else 0
            raise _bad(path, f"'logits.{layer}' holds NaN or inf (first at step {step}); record the trace again in float32")
        logits[layer] = x
    stored = sorted({str(x.dtype).removeprefix("torch.") for x in logits.values()})
    if said is not None and said not in stored:
        raise _bad(path, f"the header says dtype {said} but the logits are {', '.join(stored)}")
    try:
        return Trace(logits, valid, specs, meta)
    except ValueError as e:
        raise _bad(path, str(e)) from None


def _bad(path: Path, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}; expected {WHAT}")


def _parse(path: Path, metadata: dict[str, str], names: set[str], get: Any
           ) -> tuple[dict[int, RouterSpec], dict[str, Any], torch.Tensor]:
    """(specs, meta, valid) of a trace file from its metadata, tensor names and `get(name)` (a small
    tensor: valid, a bias); checks every header field, and that each spec layer has its logits."""

    def bad(msg: str) -> ValueError:
        return _bad(path, msg)

    raw = metadata.get("moe_reroute")
    try:
        header = json.loads(raw) if raw is not None else None
    except (json.JSONDecodeError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is a safetensors file but not a moe-reroute trace (no trace header)")
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported trace format {header.get('format')!r}; this version reads {FORMAT}")
    if not isinstance(header.get("specs"), dict) or not header["specs"]:
        raise bad(f"header field 'specs' must be a mapping {{layer: RouterSpec fields}}, got {header.get('specs')!r:.60}")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise bad(f"header field 'meta' must be a mapping, got {type(meta).__name__}")
    valid = get("valid") if "valid" in names else None
    if valid is None:
        raise bad("no 'valid' tensor")
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise bad(f"'valid' must be a [S, B] bool tensor, got {tuple(valid.shape)} {valid.dtype}")
    if valid.shape[0] == 0 or valid.shape[1] == 0:
        raise bad(f"the trace holds no tokens (valid is {tuple(valid.shape)}: S steps x B sequences)")
    for key, size in (("steps", valid.shape[0]), ("batch_size", valid.shape[1])):
        if key in header and (isinstance(header[key], bool) or header[key] != size):
            raise bad(f"header field {key!r} is {header[key]!r:.40} but the tensors hold {size} "
                      f"({'steps' if key == 'steps' else 'sequences'}; valid is {tuple(valid.shape)})")
    if "dtype" in header and header["dtype"] not in _FLOAT_NAMES.values():
        raise bad(f"header field 'dtype' is {header['dtype']!r:.40}; traces hold logits in "
                  f"{', '.join(_FLOAT_NAMES.values())}")

    specs = {}
    for key, d in header["specs"].items():
        layer = _layer_key(key)
        if layer is None:
            raise bad(f"spec layer key {key!r} is not a layer number (0, 1, ...)")
        if not isinstance(d, dict):
            raise bad(f"spec of layer {key} must be a mapping of RouterSpec fields, got {type(d).__name__}")
        problem = _spec_problem(d)
        if problem:
            raise bad(f"spec of layer {key}: {problem}")
        bias = get(f"bias.{key}") if f"bias.{key}" in names else None
        if bias is not None and (not bias.dtype.is_floating_point or not bool(torch.isfinite(bias).all())):
            raise bad(f"'bias.{key}' must be finite floating point, got {bias.dtype}"
                      + ("" if not bias.dtype.is_floating_point else " with NaN or inf"))
        if bias is None and d.get("arch") in BIASED_ROUTERS:
            raise bad(f"layer {key} routes as {d['arch']} (with e_score_correction_bias) but 'bias.{key}' is missing")
        try:
            specs[layer] = RouterSpec(**d, e_score_correction_bias=bias)
        except ValueError as e:
            raise bad(f"spec of layer {key}: {e}") from None
        if f"logits.{key}" not in names:
            raise bad(f"no 'logits.{key}' tensor for spec layer {key}")
    extra = sorted(k for k in names if k.startswith(("logits.", "bias.")) and k.split(".", 1)[1] not in header["specs"])
    if extra:
        raise bad(f"tensors {extra} have no spec in the header")
    return specs, meta, valid


# RouterSpec field -> the JSON types a trace header may give it.
_SPEC_TYPES = {"num_experts": (int,), "top_k": (int,), "scoring": (str,), "renormalize": (bool,),
               "n_group": (int,), "topk_group": (int,), "routed_scaling_factor": (int, float),
               "weights_in_logits_dtype": (bool,), "arch": (str,)}


def _layer_key(key: str) -> int | None:
    return int(key) if key.isascii() and key.isdigit() and str(int(key)) == key else None


def _spec_problem(d: dict) -> str | None:
    known = [f.name for f in dataclasses.fields(RouterSpec) if f.name != "e_score_correction_bias"]
    unknown = sorted(set(d) - set(known))
    if unknown:
        return f"unknown fields {unknown}; RouterSpec has {', '.join(known)}"
    missing = [k for k in ("num_experts", "top_k") if k not in d]
    if missing:
        return f"missing {', '.join(missing)}"
    for k, v in d.items():
        types = _SPEC_TYPES.get(k, (object,))
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            want = " or ".join("true/false" if t is bool else t.__name__ for t in types)
            return f"{k} must be {want}, got {v!r}"
    if not math.isfinite(d.get("routed_scaling_factor", 1.0)):
        return f"routed_scaling_factor must be finite, got {d['routed_scaling_factor']!r}"
    return None


def _spec_dict(spec: RouterSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "e_score_correction_bias"}
