"""transformers adapter: apply a policy to a real MoE model, record what its routing did, calibrate SERE.

Needs the `hf` extra (transformers 5.x). Architectures: Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral,
DeepSeek-V3, GPT-OSS.
"""

from .apply import Applied, apply, moe_routers
from .calibrate import calibrate_similarity, load_similarity, save_similarity
from .record import LayerRecord, Recorder, StepRecord

__all__ = [
    "Applied",
    "LayerRecord",
    "Recorder",
    "StepRecord",
    "apply",
    "calibrate_similarity",
    "load_similarity",
    "moe_routers",
    "save_similarity",
]
