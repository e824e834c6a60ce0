"""The plugin's configuration; it lives in `moe_reroute.serving.config`, shared with the SGLang plugin."""

from ..serving.config import (  # noqa: F401
    COUNT_EP_ENV,
    COUNTERS_ENV,
    COUNTERS_OFF,
    COUNTERS_ON,
    PHASES,
    POLICY_ENV,
    POLICY_FILE_ENV,
    CountLayout,
    PluginConfig,
    count_layout_from_env,
    counters_from_env,
    from_env,
    from_env_once,
    parse,
    parse_count_layout,
)
