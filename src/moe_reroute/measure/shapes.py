"""MoE layer shapes of real models, for latency measurements at their true dimensions.

Experts are SwiGLU MLPs: gate and up projections [I, H] each and a down projection [H, I], so one
expert holds 3·H·I parameters. H = hidden size, I = expert intermediate size, E = routed experts,
K = experts per token. Shared experts and attention are not part of the shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer's routed experts: E SwiGLU experts of hidden H and intermediate I, top-K routing."""

    name: str
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        for field_name in ("hidden", "intermediate", "num_experts", "top_k"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LayerShape {self.name!r}: {field_name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"LayerShape {self.name!r}: top_k K={self.top_k} > num_experts E={self.num_experts}; "
                "a token cannot use more experts than exist"
            )

    @property
    def params_per_expert(self) -> int:
        return 3 * self.hidden * self.intermediate

    def bytes_per_expert(self, dtype: torch.dtype) -> int:
        """Bytes of one expert's weights (gate, up and down) stored in `dtype`."""
        return self.params_per_expert * _itemsize(dtype)

    def layer_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of all E experts of the layer in `dtype`."""
        return self.num_experts * self.bytes_per_expert(dtype)

    def dims(self) -> str:
        return f"H={self.hidden}, I={self.intermediate}, E={self.num_experts}, K={self.top_k}"


SHAPES: dict[str, LayerShape] = {
    s.name: s
    for s in (
        LayerShape("qwen3-30b-a3b", 2048, 768, 128, 8),
        LayerShape("qwen3-235b-a22b", 4096, 1536, 128, 8),
        LayerShape("deepseek-v3", 7168, 2048, 256, 8),
        LayerShape("mixtral-8x7b", 4096, 14336, 8, 2),
        LayerShape("olmoe-1b-7b", 2048, 1024, 64, 8),
        LayerShape("gpt-oss-120b", 2880, 2880, 128, 4),
        LayerShape("reference", 192, 56, 128, 8),  # the project's shipped small model
    )
}


# The rest of each model's configuration, for `moe-reroute synth-model` (transformers config names; the MoE
# dimensions above are filled in from SHAPES). `layers` and `dense_layers` are the real model's decoder
# layers and leading dense layers. Values are those of the models' published config.json files.
ARCHITECTURES: dict[str, dict] = {
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", layers=48, dense_layers=0, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, intermediate_size=6144, norm_topk_prob=True,
                          rope_theta=1e6),
    "qwen3-235b-a22b": dict(model_type="qwen3_moe", layers=94, dense_layers=0, num_attention_heads=64,
                            num_key_value_heads=4, head_dim=128, intermediate_size=12288, norm_topk_prob=True,
                            rope_theta=1e6),
    "deepseek-v3": dict(model_type="deepseek_v3", layers=61, dense_layers=3, num_attention_heads=128,
                        num_key_value_heads=128, intermediate_size=18432, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=1,
                        n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
                        topk_method="noaux_tc", scoring_func="sigmoid"),
    "mixtral-8x7b": dict(model_type="mixtral", layers=32, dense_layers=0, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, rope_theta=1e6, sliding_window=None),
    "olmoe-1b-7b": dict(model_type="olmoe", layers=16, dense_layers=0, num_attention_heads=16,
                        num_key_value_heads=16, norm_topk_prob=False, rope_theta=10000.0),
    "gpt-oss-120b": dict(model_type="gpt_oss", layers=36, dense_layers=0, num_attention_heads=64,
                         num_key_value_heads=8, head_dim=64, sliding_window=128),  # yarn rope: the default
}


def get_shape(name: str) -> LayerShape:
    """The named shape, e.g. `get_shape("qwen3-30b-a3b")`."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}; or give --dims H,I,E,K")
    return SHAPES[name]


def custom_shape(dims: str | tuple[int, int, int, int], name: str | None = None) -> LayerShape:
    """A shape from "H,I,E,K" (as given to `--dims`) or a 4-tuple, e.g. `custom_shape("2048,768,128,8")`."""
    if isinstance(dims, str):
        parts = [p.strip() for p in dims.split(",")]
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise ValueError(
                f"dims must be four positive integers H,I,E,K (hidden, intermediate, experts, top-k), "
                f"e.g. 2048,768,128,8; got {dims!r}"
            )
        values = tuple(int(p) for p in parts)
    else:
        values = tuple(dims)
        if len(values) != 4:
            raise ValueError(f"dims must be (H, I, E, K), got {dims!r}")
    H, I, E, K = values
    return LayerShape(name or f"custom-{H}x{I}x{E}x{K}", H, I, E, K)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
