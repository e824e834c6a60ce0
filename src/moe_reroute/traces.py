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

from .contract import RouterSpec
from .metrics import unique_experts
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

    def replay(self, policy: Policy, layers: list[int] | None = None) -> dict[int, torch.Tensor]:
        """U of each step under `policy`: {decoder layer: [S] int64}. Each step's B tokens form one batch;
        the policy is called with each layer's MoE-layer index (`moe_layer`). `layers`: decoder layers."""
        unknown = sorted(set(layers or ()) - set(self.layers))
        if unknown:
            raise ValueError(f"layers {unknown} are not in this trace; it holds layers {self.layers}")
        out = {}
        for layer in layers or self.layers:
            spec = self.specs[layer]
            x = self.logits[layer]
            moe = self.moe_layer(layer)
            out[layer] = torch.stack([
                unique_experts(policy(x[s].float(), spec, self.valid[s], layer=moe), spec.num_experts)
                for s in range(self.steps)
            ])
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
        path = Path(path)
        save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={"moe_reroute": json.dumps(header)})
        return path


WHAT = "a moe-reroute routing trace (written by Trace.save or moe_reroute.hf.Recorder)"


def load(path: str | Path) -> Trace:
    """Read a trace written by `Trace.save`; every header field and tensor is checked, and a problem
    raises ValueError naming the file and the field."""
    from .files import read_safetensors

    path = Path(path)
    tensors, metadata = read_safetensors(path, WHAT)

    def bad(msg: str) -> ValueError:
        return ValueError(f"{path}: {msg}; expected {WHAT}")

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
    valid = tensors.get("valid")
    if valid is None:
        raise bad("no 'valid' tensor")
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise bad(f"'valid' must be a [S, B] bool tensor, got {tuple(valid.shape)} {valid.dtype}")
    if valid.shape[0] == 0 or valid.shape[1] == 0:
        raise bad(f"the trace holds no tokens (valid is {tuple(valid.shape)}: S steps x B sequences)")

    specs, logits = {}, {}
    for key, d in header["specs"].items():
        layer = _layer_key(key)
        if layer is None:
            raise bad(f"spec layer key {key!r} is not a layer number (0, 1, ...)")
        if not isinstance(d, dict):
            raise bad(f"spec of layer {key} must be a mapping of RouterSpec fields, got {type(d).__name__}")
        problem = _spec_problem(d)
        if problem:
            raise bad(f"spec of layer {key}: {problem}")
        bias = tensors.get(f"bias.{key}")
        if bias is not None and (not bias.dtype.is_floating_point or not bool(torch.isfinite(bias).all())):
            raise bad(f"'bias.{key}' must be finite floating point, got {bias.dtype}"
                      + ("" if not bias.dtype.is_floating_point else " with NaN or inf"))
        if bias is None and d.get("arch") == "deepseek_v3":
            raise bad(f"layer {key} routes as DeepSeek-V3 (e_score_correction_bias) but 'bias.{key}' is missing")
        try:
            specs[layer] = RouterSpec(**d, e_score_correction_bias=bias)
        except ValueError as e:
            raise bad(f"spec of layer {key}: {e}") from None
        x = tensors.get(f"logits.{key}")
        if x is None:
            raise bad(f"no 'logits.{key}' tensor for spec layer {key}")
        if not x.dtype.is_floating_point:
            raise bad(f"'logits.{key}' must be floating point router logits, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            step = int(torch.isfinite(x).flatten(1).all(1).logical_not().nonzero()[0, 0]) if x.dim() > 1 else 0
            raise bad(f"'logits.{key}' holds NaN or inf (first at step {step}); record the trace again in float32")
        logits[layer] = x
    extra = sorted(k for k in tensors if k.startswith(("logits.", "bias.")) and k.split(".", 1)[1] not in header["specs"])
    if extra:
        raise bad(f"tensors {extra} have no spec in the header")
    try:
        return Trace(logits, valid, specs, meta)
    except ValueError as e:
        raise bad(str(e)) from None


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
