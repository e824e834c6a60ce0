"""The routing contract: what a model's router does (`RouterSpec`) and what a policy returns (`Routing`).

Shape letters used throughout the package: T = tokens in the batch, E = routed experts,
K = experts per token (the model's top-k), L = layers, S = steps.

Steps: a policy call takes one batch, router logits [T, E], or S batches at once, [S, T, E] (valid and
fixed [S, T]): each step is routed as its own batch, exactly as S separate calls would route it, and
the Routing holds [S, T, K] tensors. Trace replay uses this to route many decode steps per call.

Layer numbering: the `layer` a policy is called with is the 0-based MoE-layer index, the n-th decoder
layer that holds a routed MoE block, dense layers not counted (`moe_layers` reads which those are from a
config). Every per-layer value (a list, a {layer: value} mapping, a cap schedule, a stacked [L, E, E]
similarity) is indexed that way, and the adapters map each decoder layer to its MoE-layer index.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

SCORINGS = ("softmax", "sigmoid", "topk_softmax")

# model_type of a transformers config -> how to read its router from the config. A multimodal config
# (qwen3_5_moe) is read by its language model's (`text_config`).
SUPPORTED_ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "gpt_oss",
                           "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "glm4_moe", "dots1", "minimax_m2")
# routers of these model_types route as Qwen3-MoE's (softmax, top-K, renormalised if norm_topk_prob) ...
QWEN_ROUTERS = ("qwen3_moe", "qwen2_moe", "olmoe", "qwen3_next")
# ... as Qwen3.5-MoE's (the same, always renormalised) ...
QWEN35_ROUTERS = ("qwen3_5_moe", "qwen3_5_moe_text")
# ... as DeepSeek-V3's (sigmoid + correction bias, groups, scaling factor; the bias lives on the router) ...
DEEPSEEK_ROUTERS = ("deepseek_v3", "glm4_moe", "dots1")
# ... or as MiniMax-M2's (sigmoid + correction bias over all E, renormalised; the bias lives on the MoE block)
BIASED_ROUTERS = DEEPSEEK_ROUTERS + ("minimax_m2",)  # a correction bias in every MoE layer

# model_types whose decoder-layer layout `moe_layers` knows, by the rule that lays them out.
DEEPSEEK_LAYOUT = ("deepseek_v2", "deepseek_v3", "kimi_k2", "glm4_moe", "dots1")  # first_k_dense_replace, moe_layer_freq
QWEN_LAYOUT = ("qwen2_moe", "qwen3_moe", "qwen3_next")  # decoder_sparse_step, mlp_only_layers
EVERY_LAYER_LAYOUT = ("mixtral", "olmoe", "gpt_oss", "qwen3_5_moe", "qwen3_5_moe_text", "minimax_m2")


def text_config(config: Any) -> Any:
    """The language model's config of a multimodal transformers config (`get_text_config()`, e.g. Qwen3.5's
    qwen3_5_moe -> qwen3_5_moe_text); any other config (or config-like object) as it is."""
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            inner = get()
        except Exception:  # a config that cannot name one: read it as it is
            return config
        if inner is not None:
            return inner
    return config


@dataclass(frozen=True)
class RouterSpec:
    """How a model routes one MoE layer: the scoring, E, K and the weight treatment.

    scoring:
      - "softmax": softmax over E in float32, top-K, optionally renormalised (Qwen3-MoE, Qwen2-MoE,
        OLMoE, Mixtral).
      - "sigmoid": sigmoid scores; experts are chosen by score + `e_score_correction_bias` within the
        `topk_group` best of `n_group` groups (a group scores the sum of its top-2); weights are the
        unbiased scores, renormalised if asked, times `routed_scaling_factor` (DeepSeek-V3).
      - "topk_softmax": top-K on the raw logits, then softmax over those K (GPT-OSS).

    `weights_in_logits_dtype` says whether the stock router casts its weights back to the dtype of its
    logits (Qwen, OLMoE, GPT-OSS do; Mixtral and DeepSeek-V3 return float32). `Routing.weights` is
    always float32; `model_weights_dtype` gives the dtype the stock router would hand its experts.
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    e_score_correction_bias: torch.Tensor | None = field(default=None, compare=False, repr=False)
    weights_in_logits_dtype: bool = True
    arch: str = "custom"

    def __post_init__(self) -> None:
        E, K = self.num_experts, self.top_k
        if isinstance(E, bool) or not isinstance(E, int) or E < 1:
            raise ValueError(f"RouterSpec: num_experts must be a positive int, got {E!r}")
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"RouterSpec: top_k must be a positive int, got {K!r}")
        for name in ("renormalize", "weights_in_logits_dtype"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RouterSpec: {name} must be True or False, got {getattr(self, name)!r}")
        for name in ("n_group", "topk_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"RouterSpec: {name} must be an int, got {value!r}")
        r = self.routed_scaling_factor
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"RouterSpec: routed_scaling_factor must be a finite number > 0 (the model config's), "
                             f"got {r!r}")
        if K > E:
            raise ValueError(f"RouterSpec: top_k K={K} > num_experts E={E}; a token cannot use more experts than exist")
        if self.scoring not in SCORINGS:
            raise ValueError(f"RouterSpec: unknown scoring {self.scoring!r}; choose one of {SCORINGS}")
        if self.scoring == "topk_softmax" and not self.renormalize:
            raise ValueError("RouterSpec: scoring='topk_softmax' always normalises over the K chosen; set renormalize=True")
        if self.scoring != "sigmoid":
            if (self.n_group, self.topk_group) != (1, 1) or self.e_score_correction_bias is not None:
                raise ValueError("RouterSpec: n_group, topk_group and e_score_correction_bias apply only to scoring='sigmoid'")
        else:
            G, g = self.n_group, self.topk_group
            if G < 1 or E % G:
                raise ValueError(f"RouterSpec: n_group={G} must divide num_experts E={E}")
            if E // G < 2:
                raise ValueError(f"RouterSpec: each group needs at least 2 experts (groups score their top-2), got E/n_group={E // G}")
            if not 1 <= g <= G:
                raise ValueError(f"RouterSpec: topk_group={g} must be between 1 and n_group={G}")
            if g * (E // G) < K:
                raise ValueError(f"RouterSpec: topk_group*E/n_group={g * (E // G)} experts are too few to pick K={K}")
            b = self.e_score_correction_bias
            if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (E,)):
                got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"RouterSpec: e_score_correction_bias must be a tensor of shape [E]=[{E}], got {got}")
            if b is not None and not b.dtype.is_floating_point:
                raise ValueError(f"RouterSpec: e_score_correction_bias must be floating point, got {b.dtype}")

    @property
    def E(self) -> int:
        return self.num_experts

    @property
    def K(self) -> int:
        return self.top_k

    def with_bias(self, bias: torch.Tensor | None) -> RouterSpec:
        """The same spec with one layer's `e_score_correction_bias` (DeepSeek-V3 keeps one per layer)."""
        return dataclasses.replace(self, e_score_correction_bias=bias)

    def model_weights_dtype(self, logits_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the weights the stock router hands its experts, for logits of `logits_dtype`."""
        return logits_dtype if self.weights_in_logits_dtype else torch.float32

    @classmethod
    def from_config(cls, config: Any) -> RouterSpec:
        """Read the routing of a transformers config (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, DeepSeek-V3, GPT-OSS,
        Qwen3-Next, Qwen3.5-MoE, GLM-4.5 (glm4_moe), dots.llm1, MiniMax-M2).

        The sigmoid routers' correction bias is per layer and lives in the weights: attach it with `with_bias`.
        """
        config = text_config(config)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"RouterSpec.from_config: unsupported model_type {model_type!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}. For another model, build RouterSpec(...) by hand."
            )
        K = int(config.num_experts_per_tok)
        if model_type in QWEN_ROUTERS:
            return cls(int(config.num_experts), K, "softmax", bool(config.norm_topk_prob), arch=model_type)
        if model_type in QWEN35_ROUTERS:
            return cls(int(config.num_experts), K, "softmax", True, arch=model_type)
        if model_type == "mixtral":
            return cls(int(config.num_local_experts), K, "softmax", True, weights_in_logits_dtype=False, arch=model_type)
        if model_type == "gpt_oss":
            return cls(int(config.num_local_experts), K, "topk_softmax", True, arch=model_type)
        if model_type == "minimax_m2":
            return cls(int(config.num_local_experts), K, "sigmoid", True, weights_in_logits_dtype=False, arch=model_type)
        return cls(  # DEEPSEEK_ROUTERS
            int(config.n_routed_experts),
            K,
            "sigmoid",
            bool(config.norm_topk_prob),
            n_group=int(config.n_group or 1),
            topk_group=int(config.topk_group or 1),
            routed_scaling_factor=float(config.routed_scaling_factor),
            weights_in_logits_dtype=False,
            arch=model_type,
        )


def moe_layers(config: Any) -> list[int] | None:
    """The decoder layers that hold a routed MoE block, in order, from a transformers-style config (any
    object with its attributes), or None when the layout of its model_type is not known.

    Position n of the list is MoE layer n: the `layer` index policies are called with, which every
    per-layer value counts (dense layers are not counted). The rules are the ones vLLM and transformers
    build the models by:
      - DeepSeek-V2/V3, Kimi-K2, GLM-4.5 (glm4_moe), dots.llm1: layer i is MoE when i >= first_k_dense_replace
        and i % moe_layer_freq == 0 (transformers ignores moe_layer_freq, which is 1 in every released
        checkpoint; vLLM reads it where the model has one).
      - Qwen2-MoE, Qwen3-MoE, Qwen3-Next: when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
      - Mixtral, OLMoE, GPT-OSS, Qwen3.5-MoE, MiniMax-M2: every layer.
    A multimodal config is read by its language model's (`text_config`).
    """
    config = text_config(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in DEEPSEEK_LAYOUT + QWEN_LAYOUT + EVERY_LAYER_LAYOUT:
        return None
    L = _config_int(config, "num_hidden_layers", None, model_type)
    if model_type in EVERY_LAYER_LAYOUT:
        return list(range(L))
    if model_type in DEEPSEEK_LAYOUT:
        if getattr(config, "n_routed_experts", None) is None:
            return []
        first = _config_int(config, "first_k_dense_replace", 0, model_type)
        freq = _config_int(config, "moe_layer_freq", 1, model_type, low=1)
        return [i for i in range(L) if i >= first and i % freq == 0]
    if not getattr(config, "num_experts", 0):
        return []
    step = _config_int(config, "decoder_sparse_step", 1, model_type, low=1)
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    return [i for i in range(L) if i not in dense and (i + 1) % step == 0]


def _config_int(config: Any, name: str, default: int | None, model_type: str, low: int = 0) -> int:
    value = getattr(config, name, None)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"the {model_type} config's {name} must be an int >= {low}, got {value!r}; "
                         "check the model's config.json")
    return value


def moe_count(config: Any) -> int | None:
    """The number of MoE layers of a model's config by `moe_layers`, or None where that is not known (no
    config, an unknown layout, a config it cannot read)."""
    if config is None:
        return None
    try:
        layers = moe_layers(config)
    except ValueError:
        return None
    return len(layers) if layers else None


def moe_index(config: Any, decoder_layer: int | None) -> tuple[int | None, str]:
    """(the MoE-layer index of `decoder_layer` by `moe_layers(config)`, ""), or (None, why it has none):
    the config is missing, its model_type's layout is unknown, or that decoder layer is not one of its
    MoE layers (e.g. a draft model's layer past the model's own)."""
    if decoder_layer is None:
        return None, "its module name holds no decoder-layer index"
    if config is None:
        return None, "the model's config could not be read"
    layers = moe_layers(config)
    if layers is None:
        known = ", ".join(DEEPSEEK_LAYOUT + QWEN_LAYOUT + EVERY_LAYER_LAYOUT)
        return None, (f"which decoder layers of model_type {getattr(config, 'model_type', None)!r} are MoE layers "
                      f"is not known (known: {known})")
    if decoder_layer not in layers:
        return None, f"decoder layer {decoder_layer} is not a MoE layer of the model's config ({_spans(layers)})"
    return layers.index(decoder_layer), ""


def layer_name(decoder_layer: int | None, moe_layer: int | None) -> str:
    """How messages name a layer: "MoE layer 0 (decoder layer 3)", or "decoder layer 3" without a MoE index."""
    if moe_layer is None:
        return f"decoder layer {decoder_layer}"
    return f"MoE layer {moe_layer} (decoder layer {decoder_layer})"


def _spans(layers: list[int]) -> str:
    """MoE layers [3, 4, ..., 60] as "MoE layers: decoder layers 3-60" (runs of consecutive layers joined)."""
    if not layers:
        return "it has no MoE layers"
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return "MoE layers: decoder layers " + ", ".join(runs)


def engine_spec(
    num_experts: int,
    top_k: int,
    scoring: str,
    renormalize: bool,
    *,
    has_bias: bool,
    grouped: bool,
    n_group: int,
    topk_group: int,
    **extra: Any,
) -> tuple[RouterSpec | None, str]:
    """The RouterSpec an engine's router (vLLM, SGLang) routes by, or (None, why it is not supported).

    Softmax top-K without bias or groups; sigmoid top-K with a correction bias, or without groups. Engines
    score unbiased groups by their maximum, a rule RouterSpec does not have. `extra` goes to RouterSpec
    (arch, routed_scaling_factor, e_score_correction_bias, ...).
    """
    try:
        if scoring == "softmax" and not has_bias and not grouped:
            return RouterSpec(num_experts, top_k, "softmax", renormalize, **extra), ""
        if scoring == "sigmoid" and (has_bias or not grouped):
            if grouped and num_experts % n_group:
                return None, f"{num_experts} experts do not split into {n_group} groups"
            spec = RouterSpec(num_experts, top_k, "sigmoid", renormalize, n_group=n_group, topk_group=topk_group,
                              weights_in_logits_dtype=False, **extra)
            return spec, ""
    except ValueError as e:
        return None, str(e)
    what = f"scoring {scoring!r}" + (" with a correction bias" if has_bias else "")
    return None, what + (" with group-limited selection" if grouped else "")


@dataclass(frozen=True)
class Routing:
    """One layer's routing of one batch: exactly K slots per token (or of S batches: [S, T, ...] tensors).

    weights: [T, K] float32. ids: [T, K] int64. valid: [T] bool (None: every row is a real token).
    A slot a policy dropped repeats an expert its token already uses, with weight 0.
    """

    weights: torch.Tensor
    ids: torch.Tensor
    valid: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """T, the tokens of one batch (of each step, for [S, T, K] routing)."""
        return self.ids.shape[-2]

    @property
    def top_k(self) -> int:
        return self.ids.shape[-1]


def check_inputs(
    router_logits: torch.Tensor,
    spec: RouterSpec,
    valid: torch.Tensor | None,
    check_values: bool,
    materialize: bool = True,
    fixed: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Validate a policy call and return `valid` as a bool tensor of the logits' rows ([T], or [S, T] for
    [S, T, E] logits) on the logits' device (None stays None unless `materialize`).

    Shapes and dtypes are checked always (free); values (NaN/inf) of the valid rows only when
    `check_values`, since that needs a host synchronisation, and never while compiling or capturing a
    CUDA graph. Invalid (padding) rows may hold anything: no policy lets them change a valid row.
    `fixed` (None, or the bool mask of rows that keep native routing, shaped as `valid`) is checked like `valid`.
    """
    if not isinstance(spec, RouterSpec):
        raise TypeError(f"spec must be a RouterSpec, got {type(spec).__name__}; build one with RouterSpec.from_config(config)")
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits must be a torch.Tensor [T, E] or [S, T, E], got {type(router_logits).__name__}")
    if router_logits.dim() not in (2, 3):
        raise ValueError(
            f"router_logits must be 2-D [T, E] (one batch) or 3-D [S, T, E] (S steps, each its own batch), got "
            f"shape {tuple(router_logits.shape)}; flatten batch and sequence of a step first: logits.reshape(-1, E)"
        )
    E = router_logits.shape[-1]
    T = router_logits.shape[-2]
    rows = tuple(router_logits.shape[:-1])  # (T,) or (S, T)
    if E != spec.num_experts:
        raise ValueError(f"router_logits has E={E} experts but the RouterSpec says num_experts={spec.num_experts}")
    if T < 1 or router_logits.numel() == 0:
        raise ValueError(f"router_logits has no tokens (shape {tuple(router_logits.shape)})")
    if router_logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"router_logits must be float16, bfloat16, float32 or float64, got {router_logits.dtype}; "
                        "cast them first (router_logits.float())")
    if valid is None:
        if materialize:
            valid = torch.ones(rows, dtype=torch.bool, device=router_logits.device)
    else:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor {_rows_name(rows)}, got "
                            f"{getattr(valid, 'dtype', type(valid).__name__)}")
        if tuple(valid.shape) != rows:
            raise ValueError(f"valid must have shape {_rows_name(rows)}={list(rows)}, one flag per router-logits row, "
                             f"got {tuple(valid.shape)}; {_FORMS}")
        if valid.device != router_logits.device:
            raise ValueError(f"valid is on {valid.device} but router_logits on {router_logits.device}; put both on one device")
    if fixed is not None:
        check_fixed(fixed, rows, router_logits.device)
    bias = spec.e_score_correction_bias
    if bias is not None and bias.device != router_logits.device:
        raise ValueError(
            f"spec.e_score_correction_bias is on {bias.device} but router_logits on {router_logits.device}; "
            "move it with spec.with_bias(bias.to(device))"
        )
    if check_values and not tracing() and not all_finite(router_logits):
        bad_rows = (~torch.isfinite(router_logits)).any(-1)
        if valid is not None:
            bad_rows = bad_rows & valid  # padding rows may hold anything
        if bool(bad_rows.any()):
            bad = bad_rows.nonzero()[:5]
            bad = bad.flatten().tolist() if bad_rows.dim() == 1 else [tuple(r) for r in bad.tolist()]
            where = "token rows" if bad_rows.dim() == 1 else "(step, token row)s"
            raise ValueError(
                f"router_logits contain NaN or inf (first bad {where}: {bad}); "
                "the model produced non-finite router logits, check its dtype and inputs"
            )
    if check_values and bias is not None and not tracing() and not all_finite(bias):
        raise ValueError("spec.e_score_correction_bias contains NaN or inf; check the model's weights")
    return valid


LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of `x` is finite (one host synchronisation).

    One pass over `x`: its smallest and largest element are finite iff every element is (aminmax
    propagates NaN, and an inf is an extreme), several times cheaper than `isfinite` per element on
    16-bit logits. Padding rows count here, so a False sends the caller to the per-row check.
    """
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


# How the masks' shapes follow the logits', said by every shape error.
_FORMS = "router_logits [T, E] takes valid and fixed [T]; router_logits [S, T, E] takes them [S, T]"


def _rows_name(rows: tuple[int, ...]) -> str:
    return "[T]" if len(rows) == 1 else "[S, T]"


def check_fixed(fixed: Any, rows: int | tuple[int, ...], device: torch.device) -> None:
    """Raise ValueError, saying how to fix it, unless `fixed` is a bool tensor of shape `rows` ([T], or
    [S, T] for [S, T, E] logits; an int T means [T]) on `device`.

    fixed bool: True on the rows that keep the model's own routing (an engine's prefill tokens in a
    step that mixes prefill and decode). No tensor op, no host synchronisation: safe in a CUDA graph.
    """
    rows = (rows,) if isinstance(rows, int) else tuple(rows)
    name = _rows_name(rows)
    if not isinstance(fixed, torch.Tensor):
        raise ValueError(f"fixed must be a {name} bool tensor (True: the row keeps native routing) or None, got "
                         f"{type(fixed).__name__}; build it with torch.tensor(mask, dtype=torch.bool)")
    if fixed.dtype != torch.bool:
        raise ValueError(f"fixed must be a bool tensor {name}, got {fixed.dtype}; pass fixed.bool() "
                         "(True: the row keeps native routing)")
    if tuple(fixed.shape) != rows:
        raise ValueError(f"fixed must have shape {name}={list(rows)}, one flag per router-logits row, got "
                         f"{tuple(fixed.shape)}; {_FORMS}")
    if fixed.device != device:
        raise ValueError(f"fixed is on {fixed.device} but router_logits on {device}; put both on one device "
                         "(fixed.to(router_logits.device))")


def tracing() -> bool:
    """Whether torch.compile is tracing or a CUDA graph is being captured: no host synchronisation then."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
