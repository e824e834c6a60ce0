"""transformers adapter: apply a policy to a real MoE model and record what its routing did.

Needs the `hf` extra (transformers 5.x). Architectures: Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral,
DeepSeek-V3, GPT-OSS.
"""

from .apply import Applied, apply, moe_routers
from .record import LayerRecord, Recorder, StepRecord

__all__ = ["Applied", "LayerRecord", "Recorder", "StepRecord", "apply", "moe_routers"]
