"""moe-reroute: re-route tokens within a decode batch so that MoE layers activate fewer experts.

    from moe_reroute import RouterSpec, make_policy
    policy = make_policy("oea", k0=3)
    routing = policy(router_logits, RouterSpec(num_experts=128, top_k=8))  # [T, E] -> Routing

    policy = load_policy("tuned.json")  # a policy file, as MOE_REROUTE_POLICY_FILE takes it
"""

from . import calibration, metrics
from .contract import SUPPORTED_ARCHITECTURES, RouterSpec, Routing
from .policies import POLICIES, Policy, PolicyConfig, load_policy, make_policy

__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "SUPPORTED_ARCHITECTURES",
    "Policy",
    "PolicyConfig",
    "RouterSpec",
    "Routing",
    "__version__",
    "calibration",
    "load_policy",
    "make_policy",
    "metrics",
]
